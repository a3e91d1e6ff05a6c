"""The plain lifetimes fit the engine is measured against (`bench/quality.py`, the examples): what a
data scientist writes with `lifetimes` alone, on completed orders, with no engine code in between.
(Here, not in `models/`: there only `models/_lifetimes_compat.py` may import lifetimes.)"""
from __future__ import annotations

import datetime as dt
import warnings

import pandas as pd


def plain_lifetimes_value(orders: pd.DataFrame, cutoff: dt.date, horizon_months: int) -> pd.Series:
    """Each customer's value over ``horizon_months`` after ``cutoff`` by lifetimes' own path:
    ``summary_data_from_transaction_data`` on ``orders`` (columns customer_id, order_date, net_amount:
    completed orders up to the cutoff), ``BetaGeoFitter`` + ``GammaGammaFitter`` (no penalizer),
    ``customer_lifetime_value(time=horizon_months, discount_rate=0, freq="D")``. Indexed by customer_id."""
    from lifetimes import BetaGeoFitter, GammaGammaFitter
    from lifetimes.utils import summary_data_from_transaction_data

    orders = orders.assign(order_date=pd.to_datetime(orders["order_date"]))
    summary = summary_data_from_transaction_data(orders, "customer_id", "order_date", monetary_value_col="net_amount",
                                                 observation_period_end=pd.Timestamp(cutoff), freq="D")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # lifetimes' own numpy/pandas deprecations
        bgf = BetaGeoFitter(penalizer_coef=0.0).fit(summary["frequency"], summary["recency"], summary["T"])
        repeat = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
        ggf = GammaGammaFitter(penalizer_coef=0.0).fit(repeat["frequency"], repeat["monetary_value"])
        return ggf.customer_lifetime_value(bgf, summary["frequency"], summary["recency"], summary["T"],
                                           summary["monetary_value"], time=horizon_months, discount_rate=0.0,
                                           freq="D")
