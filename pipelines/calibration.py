"""Calibration / holdout builder for backtests (table ``calibration_holdout``).

For a cutoff date ``C`` and a horizon of ``H`` months (default 6):

* the *calibration* part is exactly the customer features as of ``C``
  (:func:`pipelines.features.build_customer_features`, same code, same definitions);
* the *holdout* part is each of those customers' actual orders with
  ``C < order_date <= horizon_end``, ``horizon_end = add_months(C, H)`` (Spark's ``add_months``:
  same day of month, clamped to the month's last day): ``holdout_orders`` (every order, cancelled
  ones too, as in the features), ``holdout_purchase_days`` (distinct order days),
  ``holdout_gross`` and ``holdout_net``;
* the population is the calibration population: customers whose first order is after ``C`` are
  not included (a model fitted at ``C`` has never seen them); customers without holdout orders
  get zeros.

The holdout must be complete: when ``horizon_end`` is after the last order date in the data, the
builder raises :class:`IncompleteHoldoutError` unless ``allow_incomplete=True`` (a backtest on a
truncated holdout would understate every customer's actual value).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Sequence

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.config import FeaturesConf
from core.dates import add_months, to_date
from core.errors import UserError
from core.results import StageResult
from core.storage import Storage
from core.tables import CALIBRATION_HOLDOUT, conform
from pipelines.features import build_customer_features, validate_orders
from pipelines.identity import read_orders

HOLDOUT_COLUMNS = ("holdout_orders", "holdout_purchase_days", "holdout_gross", "holdout_net")


class CalibrationError(UserError, ValueError):
    """The calibration/holdout table cannot be built; the message says what to change."""


class IncompleteHoldoutError(CalibrationError):
    """The data ends before the holdout horizon; the message gives both dates and the way out."""


def holdout_end(cutoff_date: dt.date, horizon_months: int) -> dt.date:
    if horizon_months < 1:
        raise CalibrationError(f"horizon_months must be at least 1 (got {horizon_months})")
    return add_months(cutoff_date, horizon_months)


def check_holdout_complete(orders_df: DataFrame, cutoff_date: dt.date, horizon_end: dt.date) -> dt.date | None:
    """The last order date in the data; raises when it is before ``horizon_end``.

    One small aggregate (max of a column), the only action this module adds.
    """
    last_order_date = orders_df.agg(F.max("order_date").alias("last")).first()["last"]
    if last_order_date is None or last_order_date < horizon_end:
        raise IncompleteHoldoutError(
            f"the holdout window ({cutoff_date} < order_date <= {horizon_end}) runs past the last order "
            f"day in the data ({last_order_date}), so it would be incomplete. Choose a cutoff on or before "
            f"{_latest_complete_cutoff(last_order_date, horizon_end, cutoff_date)}, a shorter horizon, "
            "or pass allow_incomplete=True (--allow-incomplete) to build it anyway")
    return last_order_date


def _latest_complete_cutoff(last_order_date: dt.date | None, horizon_end: dt.date, cutoff_date: dt.date) -> str:
    if last_order_date is None:
        return "(no orders at all)"
    months = (horizon_end.year - cutoff_date.year) * 12 + horizon_end.month - cutoff_date.month
    return add_months(last_order_date, -months).isoformat()


def holdout_actuals(orders_df: DataFrame, cutoff_date: dt.date, horizon_end: dt.date) -> DataFrame:
    """Per customer: orders, distinct order days, gross and net with cutoff < order_date <= end."""
    in_holdout = (F.col("order_date") > F.lit(cutoff_date)) & (F.col("order_date") <= F.lit(horizon_end))
    return (orders_df.where(in_holdout)
            .groupBy("customer_id")
            .agg(F.count(F.lit(1)).alias("holdout_orders"),
                 F.count_distinct("order_date").alias("holdout_purchase_days"),
                 F.sum("gross_amount").alias("holdout_gross"),
                 F.sum("net_amount").alias("holdout_net")))


def build_calibration_holdout(orders_df: DataFrame, cutoff_date: dt.date | str, horizon_months: int = 6,
                              time_unit: str = "days", trailing_months: Sequence[int] = (3, 6, 12),
                              allow_incomplete: bool = False) -> DataFrame:
    """``calibration_holdout`` rows for one cutoff (see the module docstring)."""
    cutoff_date = to_date(cutoff_date)
    horizon_end = holdout_end(cutoff_date, horizon_months)
    validate_orders(orders_df)
    if not allow_incomplete:
        check_holdout_complete(orders_df, cutoff_date, horizon_end)
    features_df = build_customer_features(orders_df, cutoff_date, time_unit=time_unit,
                                          trailing_months=trailing_months)
    actuals_df = holdout_actuals(orders_df, cutoff_date, horizon_end)
    joined_df = (features_df.join(actuals_df, on="customer_id", how="left")
                 .fillna(0, subset=["holdout_orders", "holdout_purchase_days"])
                 .fillna(0.0, subset=["holdout_gross", "holdout_net"])
                 .withColumn("cutoff_date", F.lit(cutoff_date))
                 .withColumn("horizon_end", F.lit(horizon_end)))
    return conform(joined_df, CALIBRATION_HOLDOUT)


@dataclass(frozen=True)
class CalibrationResult(StageResult):
    """The ``calibration_holdout`` partition :func:`run_calibration` wrote."""
    cutoff_date: dt.date
    horizon_end: dt.date
    time_unit: str
    customers: int
    holdout_buyers: int
    holdout_orders: int
    holdout_net: float

    def summary_line(self) -> str:
        return (f"{self.customers:,} customers at cutoff {self.cutoff_date}; holdout to {self.horizon_end}: "
                f"{self.holdout_buyers:,} buyers, {self.holdout_orders:,} orders, net {self.holdout_net:,.2f}")


def run_calibration(storage: Storage, cutoff_date: dt.date, features_conf: FeaturesConf, horizon_months: int,
                    allow_incomplete: bool = False) -> CalibrationResult:
    """Read ``orders``, write the ``cutoff_date`` partition of ``calibration_holdout``: features at the
    cutoff and what each customer did in the ``horizon_months`` after it (``models.horizon_months``)."""
    holdout_df = build_calibration_holdout(
        read_orders(storage), cutoff_date, horizon_months=horizon_months,
        time_unit=features_conf.time_unit, trailing_months=features_conf.trailing_months,
        allow_incomplete=allow_incomplete)
    storage.replace_partitions(CALIBRATION_HOLDOUT, holdout_df, partitions={"cutoff_date": [cutoff_date]})
    # Stats from the written partition: reading it back is cheaper than recomputing the join.
    stats = (storage.read(CALIBRATION_HOLDOUT).where(F.col("cutoff_date") == F.lit(cutoff_date))
             .agg(F.count(F.lit(1)).alias("customers"),
                  F.count_if(F.col("holdout_orders") > 0).alias("holdout_buyers"),
                  F.coalesce(F.sum("holdout_orders"), F.lit(0)).alias("holdout_orders"),
                  F.coalesce(F.sum("holdout_net"), F.lit(0.0)).alias("holdout_net"))
             .first())
    return CalibrationResult(cutoff_date, holdout_end(cutoff_date, horizon_months),
                             features_conf.time_unit, customers=int(stats["customers"]),
                             holdout_buyers=int(stats["holdout_buyers"]),
                             holdout_orders=int(stats["holdout_orders"]), holdout_net=float(stats["holdout_net"]))
