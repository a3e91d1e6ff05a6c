"""The generator's truth is recoverable: lifetimes fitted on 20,000 generated customers.

Runtime: ~15-25 s on 2 cores (generation in Spark ~8 s, two BG/NBD fits and a Gamma-Gamma fit
~2 s each), so it lives here rather than in tests/unit.

Tolerances, from a study over 12 seeds of 20,000 customers each (numpy path, same code):
- BG/NBD on every order with fractional-day times (the continuous process the generator draws):
  the standardised errors (estimate - truth) / se were mean ~0, sd ~1 for r and alpha and sd ~0.7
  for a and b, max |z| 2.4. We allow 4 standard errors (se from lifetimes' Hessian).
- BG/NBD on distinct purchase *days* (the engine's convention): same-day orders collapse into one
  purchase, so the rate looks lower: alpha came out +3.4% +- 1.9% (max +5.6%), r +1.5% +- 1.2%,
  a and b unbiased within +-7.5%. We allow 10% on r and alpha, 20% on a and b.
- Gamma-Gamma on repeat orders: the implied mean order value p*v/(q-1) was within 1.7% of the
  truth (sd 0.6%); p, q, v individually are weakly identified, |z| up to 3.3 for q. We allow 3% on
  the mean and 4.5 standard errors on each parameter.
"""
from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import pandas as pd
import pytest

from datagen.generate import GeneratorParams, generate_orders

END = dt.date(2026, 9, 30)
PARAMS = GeneratorParams()
N_CUSTOMERS = 20_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def orders(spark):
    """Clean rows of a default export (0.1% defects dropped by their label), as pandas."""
    rows = (generate_orders(spark, N_CUSTOMERS, 2024, END, include_defect_kind=True)
            .filter("injected_defect IS NULL")
            .select("customer_id", "order_datetime", "amount")
            .toPandas())
    start = pd.Timestamp(END - dt.timedelta(days=PARAMS.history_days - 1))
    ts = pd.to_datetime(rows["order_datetime"], format="%Y/%m/%d %H:%M:%S")
    rows["t"] = (ts - start) / pd.Timedelta(days=1)          # days since the window opened
    rows["day"] = np.floor(rows["t"]).astype(int)
    rows["amount"] = rows["amount"].astype(float)
    assert rows["customer_id"].nunique() == N_CUSTOMERS
    return rows


def _bg_nbd(frequency, recency, T):
    from lifetimes import BetaGeoFitter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitter = BetaGeoFitter(penalizer_coef=0.0).fit(frequency.to_numpy(float), recency.to_numpy(float),
                                                       T.to_numpy(float))
    return fitter.params_, fitter.summary["se(coef)"]


def test_bg_nbd_recovers_the_truth_from_every_order(orders):
    per = orders.groupby("customer_id")["t"].agg(["min", "max", "size"])
    params, se = _bg_nbd(per["size"] - 1, per["max"] - per["min"], PARAMS.history_days - per["min"])
    for name in ("r", "alpha", "a", "b"):
        truth = getattr(PARAMS, name)
        assert abs(params[name] - truth) < 4 * se[name], (name, params[name], truth, se[name])


def test_bg_nbd_on_purchase_days_is_close_to_the_truth(orders):
    days = orders.drop_duplicates(["customer_id", "day"])
    per = days.groupby("customer_id")["day"].agg(["min", "max", "size"])
    # Engine convention: T from the first purchase day to the as-of day (end_date).
    params, _ = _bg_nbd(per["size"] - 1, per["max"] - per["min"], PARAMS.history_days - 1 - per["min"])
    for name, tolerance in (("r", 0.10), ("alpha", 0.10), ("a", 0.20), ("b", 0.20)):
        truth = getattr(PARAMS, name)
        assert abs(params[name] / truth - 1) < tolerance, (name, params[name], truth)


def test_gamma_gamma_recovers_the_mean_order_value(orders):
    from lifetimes import GammaGammaFitter

    first = orders.groupby("customer_id")["t"].transform("min")
    repeat = orders[orders["t"] > first].groupby("customer_id")["amount"].agg(["mean", "size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitter = GammaGammaFitter(penalizer_coef=0.0).fit(repeat["size"], repeat["mean"])
    p, q, v = (fitter.params_[k] for k in ("p", "q", "v"))
    assert abs(p * v / (q - 1) / PARAMS.mean_order_value - 1) < 0.03
    se = fitter.summary["se(coef)"]
    for name, truth in (("p", PARAMS.spend_p), ("q", PARAMS.spend_q), ("v", PARAMS.spend_v)):
        assert abs(fitter.params_[name] - truth) < 4.5 * se[name], (name, fitter.params_[name], truth, se[name])
