"""Calibration/holdout builder for backtests (table ``calibration_holdout``).

For a cutoff C and horizon H months: the customer features as of C (same definitions as
``customer_features``, nothing after C used) joined with each customer's ACTUAL orders in
(C, C + H]: holdout_orders, holdout_purchase_days, holdout_gross, holdout_net (zeros when the
customer did not buy). Customers first seen after C are not in the calibration population.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.storage import conform
from core.tables import CALIBRATION_HOLDOUT, ORDERS
from pipelines.features import add_months, build_customer_features, to_date


class CalibrationError(ValueError):
    """The holdout cannot be built as asked; the message says what to change."""


def holdout_actuals(orders_df: DataFrame, cutoff_date: dt.date, horizon_end: dt.date) -> DataFrame:
    """Per-customer actual orders and revenue with cutoff < order_date <= horizon_end."""
    window_df = orders_df.where((F.col("order_date") > F.lit(cutoff_date)) & (F.col("order_date") <= F.lit(horizon_end)))
    return window_df.groupBy("customer_id").agg(
        F.count(F.lit(1)).alias("holdout_orders"),
        F.countDistinct("order_date").alias("holdout_purchase_days"),
        F.sum("gross_amount").alias("holdout_gross"),
        F.sum("net_amount").alias("holdout_net"))


def build_calibration_holdout(orders_df: DataFrame, cutoff_date: dt.date | str, horizon_months: int = 6,
                              time_unit: str = "days", trailing_months: Sequence[int] = (3, 6, 12)) -> DataFrame:
    cutoff_date = to_date(cutoff_date)
    horizon_end = add_months(cutoff_date, horizon_months)
    features_df = build_customer_features(orders_df, cutoff_date, time_unit=time_unit,
                                          trailing_months=trailing_months)
    joined_df = features_df.join(holdout_actuals(orders_df, cutoff_date, horizon_end), on="customer_id", how="left")
    return conform(joined_df.select(
        *features_df.columns,
        F.lit(cutoff_date).alias("cutoff_date"), F.lit(horizon_end).alias("horizon_end"),
        F.coalesce("holdout_orders", F.lit(0)).cast("long").alias("holdout_orders"),
        F.coalesce("holdout_purchase_days", F.lit(0)).cast("long").alias("holdout_purchase_days"),
        F.coalesce("holdout_gross", F.lit(0.0)).alias("holdout_gross"),
        F.coalesce("holdout_net", F.lit(0.0)).alias("holdout_net")), CALIBRATION_HOLDOUT)


def run_calibration(storage: Any, cutoff_date: dt.date | str, features_conf: Any,
                    allow_incomplete: bool = False) -> dict[str, Any]:
    """Read ``orders``, write the cutoff partition of ``calibration_holdout``."""
    cutoff_date = to_date(cutoff_date)
    horizon_end = add_months(cutoff_date, features_conf.horizon_months)
    orders_df = storage.read(ORDERS.name)
    last_day = orders_df.agg(F.max("order_date")).first()[0]
    if last_day is None:
        raise CalibrationError("orders is empty; run `cvseg ingest` first")
    if horizon_end > last_day and not allow_incomplete:
        raise CalibrationError(
            f"the holdout (cutoff {cutoff_date} + {features_conf.horizon_months} months = {horizon_end}) runs past the "
            f"last order day {last_day}: actuals would be incomplete; pick a cutoff on or before "
            f"{add_months(last_day, -features_conf.horizon_months)} or pass --allow-incomplete")
    holdout_df = build_calibration_holdout(orders_df, cutoff_date, features_conf.horizon_months,
                                           features_conf.time_unit, features_conf.trailing_months)
    storage.replace_partitions(CALIBRATION_HOLDOUT.name, holdout_df, partitions={"cutoff_date": [cutoff_date]})
    stats = (storage.read(CALIBRATION_HOLDOUT.name).where(F.col("cutoff_date") == F.lit(cutoff_date))
             .agg(F.count(F.lit(1)).alias("customers"), F.sum("holdout_net").alias("net"),
                  F.count_if(F.col("holdout_orders") > 0).alias("buyers")).first())
    return {"cutoff_date": cutoff_date.isoformat(), "horizon_end": horizon_end.isoformat(),
            "customers": int(stats["customers"]), "holdout_buyers": int(stats["buyers"]),
            "holdout_net": float(stats["net"] or 0.0)}
