"""Every table the engine writes: name, schema, partition columns and merge keys.

Only :mod:`core.storage` reads and writes tables; stages name a table by its spec here.
The schema is the stage's output contract: writes are checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import types as T


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: T.StructType
    partition_by: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()          # merge keys (unique per row)
    description: str = ""

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]


def _f(name: str, dtype: T.DataType, nullable: bool = True) -> T.StructField:
    return T.StructField(name, dtype, nullable)


S, L, I, D, B, TS, DT = (T.StringType(), T.LongType(), T.IntegerType(), T.DoubleType(),
                         T.BooleanType(), T.TimestampType(), T.DateType())

ORDERS = TableSpec(
    name="orders",
    description="Validated orders, one row per order, amounts before cancellation (gross).",
    schema=T.StructType([
        _f("order_id", S, False),
        _f("customer_id", S, False),
        _f("order_ts", TS, False),           # instant, UTC
        _f("order_date", DT, False),         # calendar day in business.timezone
        _f("gross_amount", D, False),        # pre-cancellation amount
        _f("is_cancelled", B, False),        # whole order cancelled
        _f("cancelled_amount", D, False),    # 0 <= cancelled_amount <= gross_amount
        _f("net_amount", D, False),          # gross_amount - cancelled_amount
        _f("channel", S),
        _f("category", S),
        _f("currency", S),
        _f("extra", T.MapType(S, S)),        # unmapped source columns when extra_columns=keep
        _f("source_file", S, False),
        _f("source_row", L, False),          # 1 = first data row after the header
        _f("ingest_run_id", S, False),
        _f("order_month", S, False),         # yyyy-MM of order_date (partition)
    ]),
    partition_by=("order_month",),
    keys=("order_id",),
)

ORDERS_QUARANTINE = TableSpec(
    name="orders_quarantine",
    description="Rejected source rows, each with a reason code, source file and row number.",
    schema=T.StructType([
        _f("source_file", S, False),
        _f("source_row", L, False),
        _f("reason", S, False),              # first failing rule's code
        _f("reasons", T.ArrayType(S), False),  # every failing rule's code
        _f("detail", S),
        _f("order_id", S),
        _f("customer_id", S),
        _f("raw", T.MapType(S, S)),          # the row as read, column -> text
        _f("ingest_run_id", S, False),
        _f("run_date", DT, False),
    ]),
    keys=("source_file", "source_row"),
)

INGEST_RUNS = TableSpec(
    name="ingest_runs",
    description="One row per ingest run: counts that reconcile input rows with outputs.",
    schema=T.StructType([
        _f("ingest_run_id", S, False),
        _f("run_date", DT, False),
        _f("source_path", S, False),
        _f("input_rows", L, False),
        _f("accepted_rows", L, False),
        _f("quarantined_rows", L, False),
        _f("exact_duplicate_rows", L, False),
        _f("orders_written", L, False),
        _f("reason_counts", T.MapType(S, L)),
        _f("started_at", TS, False),
        _f("finished_at", TS, False),
        _f("status", S, False),              # ok | rejected (above validation.max_rejected_share)
        _f("cancellation_lines_applied", L, False),  # negative lines folded into their orders
    ]),
    keys=("ingest_run_id",),
)

CUSTOMER_FEATURES = TableSpec(
    name="customer_features",
    description="One row per customer with an order on or before as_of_date; nothing after it used.",
    schema=T.StructType([
        _f("as_of_date", DT, False),
        _f("customer_id", S, False),
        _f("time_unit", S, False),           # days | weeks: unit of frequency/recency/T
        _f("first_order_date", DT, False),
        _f("last_order_date", DT, False),
        _f("n_orders", L, False),            # gross orders, cancelled included
        _f("n_cancelled", L, False),
        _f("n_purchase_days", L, False),     # distinct order days (same-day orders = one purchase)
        _f("frequency", D, False),           # repeat purchase days
        _f("recency", D, False),             # first -> last purchase day
        _f("T", D, False),                   # first purchase day -> as_of_date
        _f("monetary_value", D, False),      # mean gross per repeat purchase day (0 if none)
        _f("gross_amount", D, False),
        _f("cancelled_amount", D, False),
        _f("net_amount", D, False),
        _f("avg_order_value", D),            # mean gross of completed (not cancelled) orders
        _f("cancel_rate_count", D, False),
        _f("cancel_rate_amount", D),         # null when gross_amount is 0
        _f("gap_mean_days", D),              # cadence: gaps between purchase days
        _f("gap_std_days", D),
        _f("orders_3m", L, False),
        _f("net_3m", D, False),
        _f("orders_6m", L, False),
        _f("net_6m", D, False),
        _f("orders_12m", L, False),
        _f("net_12m", D, False),
        _f("acquisition_channel", S),
        _f("top_category", S),
        _f("is_repeat", B, False),
        _f("days_to_second_purchase", I),
        _f("rfm_r", I, False),
        _f("rfm_f", I, False),
        _f("rfm_m", I, False),
        _f("rfm_score", S, False),
    ]),
    partition_by=("as_of_date",),
    keys=("as_of_date", "customer_id"),
)

CALIBRATION_HOLDOUT = TableSpec(
    name="calibration_holdout",
    description="Features as of a cutoff joined with each customer's actual orders in (cutoff, cutoff+H].",
    schema=T.StructType(
        CUSTOMER_FEATURES.schema.fields + [
            _f("cutoff_date", DT, False),
            _f("horizon_end", DT, False),
            _f("holdout_orders", L, False),
            _f("holdout_purchase_days", L, False),
            _f("holdout_gross", D, False),
            _f("holdout_net", D, False),
        ]),
    partition_by=("cutoff_date",),
    keys=("cutoff_date", "customer_id"),
)

CUSTOMER_SCORES = TableSpec(
    name="customer_scores",
    description="Every customer's predicted 6-month value as of a date, with the model version used.",
    schema=T.StructType([
        _f("as_of_date", DT, False),
        _f("customer_id", S, False),
        _f("p_alive", D, False),
        _f("expected_purchases", D, False),      # over the horizon
        _f("expected_order_value", D, False),    # gross, Gamma-Gamma
        _f("predicted_gross_value", D, False),
        _f("predicted_cancel_rate", D, False),   # own rate shrunk to the population (beta-binomial)
        _f("predicted_net_value", D, False),     # the 6-month LTV
        _f("value_model", S, False),             # btyd | cohort | naive
        _f("model_version", S, False),           # registered MLflow version (or "unregistered")
        _f("horizon_months", I, False),
    ]),
    partition_by=("as_of_date",),
    keys=("as_of_date", "customer_id"),
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (
    ORDERS, ORDERS_QUARANTINE, INGEST_RUNS, CUSTOMER_FEATURES, CALIBRATION_HOLDOUT, CUSTOMER_SCORES,
)}


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known tables: {', '.join(sorted(TABLES))}") from None
