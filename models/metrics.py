"""Backtest metrics on small numpy inputs: the reference definitions.

The Spark-side (distributed) metrics are tested against these functions, so every definition is
written out here, including ties and degenerate inputs.

**Inputs.** ``predicted`` and ``actual`` are one value per row (e.g. predicted and realised
revenue over the holdout period); ``weights`` (optional) is the number of customers a row stands
for, when customers with the same (predicted, actual) are grouped. Every function gives on
grouped rows exactly what it gives on the rows repeated ``weights`` times (non-integer weights
are allowed and act as fractional customers). ``N = sum(weights)`` is the number of customers.
Inputs must be finite, of equal length, with weights >= 0 and ``N > 0`` (otherwise
``ValueError``); rows with weight 0 are ignored.

**Degenerate inputs give NaN**, never a division-by-zero warning:

* ratios to the actual total (``total_error_pct``, ``normalized_gini``,
  ``top_share_capture``) are NaN when the actual total is <= 0 (e.g. all actuals zero): a share
  of a total that is not positive has no meaning;
* ``spearman`` and ``normalized_gini`` are NaN when there is nothing to rank against: all
  predictions equal or all actuals equal (spearman), or all actuals equal (gini's perfect
  ordering then has no area).

**Ranking and ties.** The ranking metrics order customers by ``predicted``, highest first
(spearman's ranks are ascending, which does not change a correlation). Customers with equal
predictions form a *tie group* that is never broken arbitrarily:

* ``spearman`` gives every member the group's average rank (as ``scipy.stats.spearmanr``);
* the *capture curve* ``L(u)`` -- the share of the actual total captured by the top fraction
  ``u`` of customers -- rises linearly across a tie group, i.e. every member counts with the
  group's mean actual: this is the average over all orders of the tied customers.
  ``normalized_gini`` and ``top_share_capture`` are read off this curve;
* ``decile_table`` puts a whole tie group in one decile (see there).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from models.base import as_float_array, check_same_length

__all__ = ["mae", "rmse", "total_error_pct", "spearman", "normalized_gini", "top_share_capture",
           "capture_curve", "decile_table", "METRIC_COLUMNS", "METRIC_DIRECTION"]

#: The registry of backtest metrics: every metric a backtest reports per model and origin, in the
#: order of ``model_backtest``'s columns (pipelines/backtest.py computes them in Spark, tested
#: against the functions below).
METRIC_COLUMNS = ("mae", "rmse", "total_error_pct", "abs_total_error_pct", "spearman", "normalized_gini",
                  "top_decile_capture", "top20_capture")
#: The metrics a champion can be chosen by (``models.champion_metric``) -> True when higher is
#: better. ``total_error_pct`` is signed, so its absolute value stands in for it.
METRIC_DIRECTION = {"mae": False, "rmse": False, "abs_total_error_pct": False, "spearman": True,
                    "normalized_gini": True, "top_decile_capture": True, "top20_capture": True}


def _inputs(predicted, actual, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float arrays, rows with weight 0 removed; ValueError saying what to fix."""
    predicted = as_float_array("predicted", predicted)
    actual = as_float_array("actual", actual)
    weights = np.ones_like(predicted) if weights is None else as_float_array("weights", weights)
    check_same_length(predicted=predicted, actual=actual, weights=weights)
    if np.any(weights < 0):
        raise ValueError("weights (customers per row) must be >= 0")
    keep = weights > 0
    if not np.any(keep):
        raise ValueError("no customers: the inputs are empty or every weight is 0")
    return predicted[keep], actual[keep], weights[keep]


# ---- errors ------------------------------------------------------------------------------------------
def mae(predicted, actual, weights=None) -> float:
    """Mean absolute error per customer: ``sum(w |predicted - actual|) / sum(w)``."""
    predicted, actual, weights = _inputs(predicted, actual, weights)
    return float(np.sum(weights * np.abs(predicted - actual)) / np.sum(weights))


def rmse(predicted, actual, weights=None) -> float:
    """Root mean squared error per customer: ``sqrt(sum(w (predicted - actual)^2) / sum(w))``."""
    predicted, actual, weights = _inputs(predicted, actual, weights)
    return float(math.sqrt(np.sum(weights * (predicted - actual) ** 2) / np.sum(weights)))


def total_error_pct(predicted, actual, weights=None) -> float:
    """Error of the total in percent: ``(sum(w predicted) - sum(w actual)) / sum(w actual) * 100``.

    Positive = over-prediction. NaN when ``sum(w actual) <= 0`` (no positive total to compare with).
    """
    predicted, actual, weights = _inputs(predicted, actual, weights)
    total_actual = float(np.sum(weights * actual))
    if not total_actual > 0:
        return math.nan
    return float((np.sum(weights * predicted) - total_actual) / total_actual * 100.0)


# ---- ranking ------------------------------------------------------------------------------------------
def _average_ranks(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, int]:
    """Ascending ranks (1-based) of the rows repeated ``weights`` times, averaged within ties.

    A value whose tie group holds ``W`` customers, with ``C`` customers strictly below, has rank
    ``C + (W + 1) / 2`` (for unit weights: ``scipy.stats.rankdata(method="average")``). Also
    returns the number of distinct values.
    """
    codes, distinct = pd.factorize(values, sort=True)
    group_weight = np.bincount(codes, weights, minlength=len(distinct))
    below = np.cumsum(group_weight) - group_weight
    return (below + (group_weight + 1.0) / 2.0)[codes], len(distinct)


def spearman(predicted, actual, weights=None) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks.

    Ranks are those of the customers (rows repeated ``weights`` times), ties sharing their
    average rank, and the correlation is weighted by ``weights``, so grouped rows give the value
    of the expanded rows; for unit weights this is ``scipy.stats.spearmanr``. NaN when all
    predictions or all actuals are equal (a rank vector without variance).
    """
    predicted, actual, weights = _inputs(predicted, actual, weights)
    rank_p, distinct_p = _average_ranks(predicted, weights)
    rank_a, distinct_a = _average_ranks(actual, weights)
    if distinct_p == 1 or distinct_a == 1:
        return math.nan
    total = np.sum(weights)
    dev_p = rank_p - np.sum(weights * rank_p) / total
    dev_a = rank_a - np.sum(weights * rank_a) / total
    var_p, var_a = float(np.sum(weights * dev_p ** 2)), float(np.sum(weights * dev_a ** 2))
    return float(np.clip(np.sum(weights * dev_p * dev_a) / math.sqrt(var_p * var_a), -1.0, 1.0))


def capture_curve(predicted, actual, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Corners ``(u, L)`` of the capture curve, customers ordered by ``predicted``, highest first.

    ``u`` = fraction of customers so far, ``L`` = their share of the actual total, one corner per
    tie group (starting at ``(0, 0)`` and ending at ``(1, 1)``); between corners the curve is
    linear (each tied customer counts with the group's mean actual). ``L`` is NaN when the
    actual total is <= 0.
    """
    predicted, actual, weights = _inputs(predicted, actual, weights)
    return _curve(predicted, actual, weights)


def _curve(predicted, actual, weights) -> tuple[np.ndarray, np.ndarray]:
    codes, distinct = pd.factorize(-predicted, sort=True)             # tie groups, highest first
    customers = np.bincount(codes, weights, minlength=len(distinct))
    captured = np.bincount(codes, weights * actual, minlength=len(distinct))
    total_actual = float(captured.sum())
    u = np.concatenate([[0.0], np.cumsum(customers) / np.sum(customers)])
    if not total_actual > 0:
        return u, np.full(len(u), np.nan)
    L = np.concatenate([[0.0], np.cumsum(captured) / total_actual])
    u[-1], L[-1] = 1.0, 1.0                                            # exact end despite rounding
    return u, L


def _gini(predicted, actual, weights) -> float:
    """Area between the capture curve and the diagonal: ``integral_0^1 (L(u) - u) du``."""
    u, L = _curve(predicted, actual, weights)
    area = float(np.sum(np.diff(u) * (L[1:] + L[:-1]) / 2.0))         # exact: L is piecewise linear
    return area - 0.5


def normalized_gini(predicted, actual, weights=None) -> float:
    """Gini of ``actual`` ordered by ``predicted`` divided by the Gini of ``actual`` ordered by itself.

    ``Gini(order) = integral_0^1 (L(u) - u) du``, the area between the capture curve ``L`` (module
    docstring; ties in the order averaged) and the diagonal of a random order. For unit weights
    and no ties it equals the discrete form ``(1/N) sum_k (L_k - k/N)`` with ``L_k`` the share
    captured by the top ``k`` (the common "normalized Gini" of Kaggle competitions). 1 = the
    prediction ranks customers as well as the actuals themselves, 0 = no better than random,
    negative = worse. NaN when the actual total is <= 0 or all actuals are equal.
    """
    predicted, actual, weights = _inputs(predicted, actual, weights)
    best = _gini(actual, actual, weights)
    if not (best > 0):                                                 # NaN or no area: nothing to rank
        return math.nan
    return float(_gini(predicted, actual, weights) / best)


def top_share_capture(predicted, actual, share: float, weights=None) -> float:
    """Share of the actual total captured by the top ``share`` of customers ranked by prediction.

    ``L(share)`` on the capture curve: customers ordered by ``predicted``, highest first; a tie
    group straddling the cut counts with its mean actual per customer, and when ``share * N`` is
    not whole the customer at the cut counts fractionally (linear interpolation). E.g.
    ``share=0.1``: the fraction of next period's revenue that the predicted top 10% bring.
    ``share`` in [0, 1]. NaN when the actual total is <= 0.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within [0, 1], got {share!r}")
    predicted, actual, weights = _inputs(predicted, actual, weights)
    u, L = _curve(predicted, actual, weights)
    return float(np.interp(share, u, L))


# ---- deciles --------------------------------------------------------------------------------------------
def decile_table(predicted, actual, weights=None) -> pd.DataFrame:
    """Customers in ten groups by prediction: decile 1 = highest predicted.

    Customers are ranked by ``predicted``, highest first (rank 1), tied customers sharing their
    average rank ``C + (W + 1) / 2`` (``W`` customers in the tie group, ``C`` predicted strictly
    higher); a customer with average rank ``k`` goes to decile ``ceil(10 k / N)`` (capped to
    1..10). Without ties this is the usual split: decile 1 = ranks 1..N/10 when ``N`` is a
    multiple of 10, sizes differing by at most one customer otherwise. A tie group is never
    split, so ties can make deciles uneven or leave one empty (e.g. 3 of 10 customers tied at the
    top all have rank 2 and go to decile 2, leaving decile 1 empty).

    Returns a DataFrame with one row per decile 1..10 (empty deciles included), columns
    ``decile``, ``n`` (customers), ``mean_predicted``, ``mean_actual`` (NaN when ``n`` is 0),
    ``sum_predicted``, ``sum_actual``.
    """
    predicted, actual, weights = _inputs(predicted, actual, weights)
    codes, distinct = pd.factorize(-predicted, sort=True)             # tie groups, highest first
    group_weight = np.bincount(codes, weights, minlength=len(distinct))
    above = np.cumsum(group_weight) - group_weight
    total = float(np.sum(group_weight))
    # ceil(10 k / N) with k = C + (W + 1) / 2, as -floor(-10 (2C + W + 1) / (2N)): exact for whole weights
    ceiling = -np.floor_divide(-10.0 * (2.0 * above + group_weight + 1.0), 2.0 * total)
    group_decile = np.clip(ceiling, 1, 10).astype(int)
    decile = group_decile[codes]
    n = np.bincount(decile, weights, minlength=11)[1:]
    sum_predicted = np.bincount(decile, weights * predicted, minlength=11)[1:]
    sum_actual = np.bincount(decile, weights * actual, minlength=11)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(n > 0, sum_predicted / np.where(n > 0, n, 1.0), np.nan)
        mean_actual = np.where(n > 0, sum_actual / np.where(n > 0, n, 1.0), np.nan)
    return pd.DataFrame({"decile": np.arange(1, 11), "n": n, "mean_predicted": mean_predicted,
                         "mean_actual": mean_actual, "sum_predicted": sum_predicted, "sum_actual": sum_actual})
