"""Backtest metrics (models.metrics) against hand-computed examples and scipy."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from models import metrics

# Four customers, no ties: hand computations below use these.
PRED = [0.9, 0.5, 0.3, 0.1]
ACTUAL = [10.0, 0.0, 5.0, 5.0]


def kaggle_normalized_gini(predicted, actual):
    """The usual discrete formula (no ties): (1/N) sum_k (L_k - k/N), L_k = share of the top k."""
    def gini(order_by):
        order = np.argsort(-np.asarray(order_by, float), kind="stable")
        captured = np.cumsum(np.asarray(actual, float)[order]) / np.sum(actual)
        n = len(actual)
        return np.sum(captured - np.arange(1, n + 1) / n) / n
    return gini(predicted) / gini(actual)


# ---- errors ----------------------------------------------------------------------------------------------
def test_errors_by_hand():
    # |errors| = 9.1, 0.5, 4.7, 4.9
    assert metrics.mae(PRED, ACTUAL) == pytest.approx(19.2 / 4)
    assert metrics.rmse(PRED, ACTUAL) == pytest.approx(math.sqrt((9.1 ** 2 + 0.5 ** 2 + 4.7 ** 2 + 4.9 ** 2) / 4))
    # (1.8 - 20) / 20 * 100
    assert metrics.total_error_pct(PRED, ACTUAL) == pytest.approx(-91.0)
    assert metrics.total_error_pct([12.0, 10.0], [10.0, 10.0]) == pytest.approx(10.0)


def test_weights_count_customers():
    # row 1 stands for 3 customers: mae = (3 * 1 + 2) / 4, total error = (3*2 + 5 - (3*1 + 3)) / 6
    assert metrics.mae([2.0, 5.0], [1.0, 3.0], weights=[3, 1]) == pytest.approx(5 / 4)
    assert metrics.rmse([2.0, 5.0], [1.0, 3.0], weights=[3, 1]) == pytest.approx(math.sqrt(7 / 4))
    assert metrics.total_error_pct([2.0, 5.0], [1.0, 3.0], weights=[3, 1]) == pytest.approx(500 / 6)


# ---- spearman ---------------------------------------------------------------------------------------------
def test_spearman_equals_scipy_with_ties():
    predicted = [3.0, 1.0, 1.0, 2.0, 5.0, 5.0, 5.0, 0.0]
    actual = [2.0, 0.0, 0.0, 0.0, 7.0, 1.0, 7.0, 0.0]
    assert metrics.spearman(predicted, actual) == pytest.approx(stats.spearmanr(predicted, actual)[0], rel=1e-12)
    rng = np.random.default_rng(3)
    predicted = rng.integers(0, 6, 300).astype(float)
    actual = np.where(rng.random(300) < 0.6, 0.0, rng.gamma(1.0, 50.0, 300).round())
    assert metrics.spearman(predicted, actual) == pytest.approx(stats.spearmanr(predicted, actual)[0], rel=1e-12)


def test_spearman_by_hand():
    # ranks of PRED (ascending): 4, 3, 2, 1; of ACTUAL: 4, 1, 2.5, 2.5 -> Pearson of the ranks
    rank_p, rank_a = np.array([4, 3, 2, 1.0]), np.array([4, 1, 2.5, 2.5])
    dp, da = rank_p - rank_p.mean(), rank_a - rank_a.mean()          # (1.5, .5, -.5, -1.5), (1.5, -1.5, 0, 0)
    assert (dp * da).sum() / math.sqrt((dp ** 2).sum() * (da ** 2).sum()) == pytest.approx(1.5 / math.sqrt(5 * 4.5))
    assert metrics.spearman(PRED, ACTUAL) == pytest.approx(1.5 / math.sqrt(5 * 4.5))


def test_spearman_is_nan_without_variance():
    assert math.isnan(metrics.spearman([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))          # all-zero actuals
    assert math.isnan(metrics.spearman([4.0, 4.0], [1.0, 2.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(stats.spearmanr([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])[0])      # scipy agrees


# ---- gini and capture ------------------------------------------------------------------------------------
def test_normalized_gini_by_hand():
    # by prediction the top 1..4 capture 0.5, 0.5, 0.75, 1 -> Gini = (0.25 + 0 + 0 + 0) / 4 = 1/16
    # by actual (10, 5, 5, 0) they capture 0.5, 0.75, 1, 1 -> Gini = (0.25 + 0.25 + 0.25 + 0) / 4 = 3/16
    assert metrics.normalized_gini(PRED, ACTUAL) == pytest.approx(1 / 3)
    assert metrics.normalized_gini(ACTUAL, ACTUAL) == pytest.approx(1.0)
    # reversed order (5, 5, 0, 10): 0.25, 0.5, 0.5, 1 -> Gini = (0 + 0 - 0.25 + 0) / 4 = -1/16
    assert metrics.normalized_gini([-p for p in PRED], ACTUAL) == pytest.approx(-1 / 3)


def test_normalized_gini_matches_the_discrete_formula_without_ties():
    rng = np.random.default_rng(5)
    predicted = rng.random(500)
    actual = rng.gamma(0.5, 100.0, 500)
    assert metrics.normalized_gini(predicted, actual) == pytest.approx(kaggle_normalized_gini(predicted, actual),
                                                                       rel=1e-10)


def test_normalized_gini_averages_tied_predictions():
    # customers 1 and 2 tie: the two orders give Gini 1/6 and -1/12 (discrete formula), average 1/24;
    # by actual (3, 1, 0): Gini 1/4 -> normalized 1/6
    predicted, actual = [1.0, 1.0, 0.0], [3.0, 0.0, 1.0]
    both_orders = [kaggle_normalized_gini([1.1, 1.0, 0.0], actual), kaggle_normalized_gini([1.0, 1.1, 0.0], actual)]
    assert metrics.normalized_gini(predicted, actual) == pytest.approx(1 / 6)
    assert metrics.normalized_gini(predicted, actual) == pytest.approx(np.mean(both_orders))
    # row order does not matter
    assert metrics.normalized_gini(predicted[::-1], actual[::-1]) == pytest.approx(1 / 6)


def test_top_share_capture_by_hand():
    # ten customers, no ties: the top 10% is the best-predicted customer, the top 20% the best two
    predicted = np.arange(10.0, 0.0, -1.0)
    actual = np.array([5.0, 0.0, 20.0, 0.0, 0.0, 10.0, 5.0, 0.0, 0.0, 60.0])
    assert metrics.top_share_capture(predicted, actual, 0.1) == pytest.approx(0.05)
    assert metrics.top_share_capture(predicted, actual, 0.2) == pytest.approx(0.05)
    assert metrics.top_share_capture(predicted, actual, 0.3) == pytest.approx(0.25)
    assert metrics.top_share_capture(predicted, actual, 0.0) == 0.0
    assert metrics.top_share_capture(predicted, actual, 1.0) == 1.0
    # four customers: 10% is 0.4 of the best customer (half of the total) -> 0.2
    assert metrics.top_share_capture(PRED, ACTUAL, 0.1) == pytest.approx(0.2)
    assert metrics.top_share_capture(PRED, ACTUAL, 0.5) == pytest.approx(0.5)


def test_top_share_capture_with_ties_uses_the_group_mean():
    # the top two tie (actuals 8 and 0, mean 4 per customer); 10 customers, total 20
    predicted = [9.0, 9.0] + [1.0] * 8
    actual = [8.0, 0.0] + [1.5] * 8
    assert metrics.top_share_capture(predicted, actual, 0.1) == pytest.approx(4 / 20)
    assert metrics.top_share_capture(predicted, actual, 0.2) == pytest.approx(8 / 20)
    assert metrics.top_share_capture(predicted[::-1], actual[::-1], 0.1) == pytest.approx(4 / 20)
    with pytest.raises(ValueError, match="share"):
        metrics.top_share_capture(predicted, actual, 1.5)


def test_capture_curve_corners():
    u, L = metrics.capture_curve([1.0, 1.0, 0.0], [3.0, 0.0, 1.0])
    assert u.tolist() == pytest.approx([0, 2 / 3, 1]) and L.tolist() == pytest.approx([0, 0.75, 1])


def test_zero_actuals_give_nan_not_a_division_by_zero():
    predicted, zeros = [3.0, 2.0, 1.0], [0.0, 0.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # no RuntimeWarning either
        assert math.isnan(metrics.total_error_pct(predicted, zeros))
        assert math.isnan(metrics.normalized_gini(predicted, zeros))
        assert math.isnan(metrics.top_share_capture(predicted, zeros, 0.1))
        assert math.isnan(metrics.spearman(predicted, zeros))
        assert metrics.mae(predicted, zeros) == 2.0
        table = metrics.decile_table(predicted, zeros)
    assert table.sum_actual.sum() == 0.0
    # equal positive actuals: nothing to rank, so the normalised Gini is NaN as well
    assert math.isnan(metrics.normalized_gini(predicted, [2.0, 2.0, 2.0]))


# ---- deciles ----------------------------------------------------------------------------------------------
def test_decile_table_by_hand():
    predicted = np.arange(20.0)                                          # 19 is the highest
    actual = 2.0 * predicted
    table = metrics.decile_table(predicted, actual)
    assert list(table.columns) == ["decile", "n", "mean_predicted", "mean_actual", "sum_predicted", "sum_actual"]
    assert table.decile.tolist() == list(range(1, 11))
    assert table.n.tolist() == [2.0] * 10
    first = table.iloc[0]                                                # predictions 19 and 18
    assert (first.mean_predicted, first.mean_actual, first.sum_predicted, first.sum_actual) == (18.5, 37.0, 37.0, 74.0)
    assert table.iloc[9].sum_predicted == 1.0                            # predictions 1 and 0
    # 15 customers: rank k goes to decile ceil(10 k / 15)
    assert metrics.decile_table(np.arange(15.0), np.zeros(15)).n.tolist() == [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]


def test_decile_table_keeps_ties_together_by_average_rank():
    # 3 of 10 tie at the top: average rank 2 -> decile 2 (decile 1 empty); the other 7 share rank 7
    table = metrics.decile_table([5.0, 5.0, 5.0] + [1.0] * 7, [1.0, 2.0, 3.0] + [0.0] * 7)
    assert table.n.tolist() == [0, 3, 0, 0, 0, 0, 7, 0, 0, 0]
    assert math.isnan(table.mean_actual.iloc[0]) and table.sum_actual.iloc[0] == 0.0
    assert table.mean_actual.iloc[1] == 2.0


def test_grouped_rows_equal_expanded_rows():
    rng = np.random.default_rng(9)
    predicted = rng.integers(0, 8, 60).astype(float)
    actual = np.where(rng.random(60) < 0.5, 0.0, rng.integers(1, 30, 60).astype(float))
    grouped = pd.DataFrame({"p": predicted, "a": actual}).groupby(["p", "a"]).size().rename("w").reset_index()
    assert len(grouped) < 60
    p, a, w = grouped.p.to_numpy(), grouped.a.to_numpy(), grouped.w.to_numpy()
    for name in ("mae", "rmse", "total_error_pct", "spearman", "normalized_gini"):
        fn = getattr(metrics, name)
        assert fn(p, a, weights=w) == pytest.approx(fn(predicted, actual), rel=1e-12), name
    for share in (0.1, 0.2):
        assert metrics.top_share_capture(p, a, share, weights=w) == pytest.approx(
            metrics.top_share_capture(predicted, actual, share), rel=1e-12)
    pd.testing.assert_frame_equal(metrics.decile_table(p, a, weights=w), metrics.decile_table(predicted, actual))
    assert metrics.spearman(predicted, actual) == pytest.approx(stats.spearmanr(predicted, actual)[0], rel=1e-12)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.mae([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="missing or infinite"):
        metrics.rmse([np.nan], [1.0])
    with pytest.raises(ValueError, match="no customers"):
        metrics.spearman([], [])
    with pytest.raises(ValueError, match="no customers"):
        metrics.mae([1.0], [1.0], weights=[0.0])
    with pytest.raises(ValueError, match=">= 0"):
        metrics.decile_table([1.0, 2.0], [1.0, 2.0], weights=[1.0, -1.0])
