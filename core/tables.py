"""Every table the engine writes: name, schema, partition columns and merge keys.

Only :mod:`core.storage` reads and writes tables; stages name a table by its spec here.
The schema is the stage's output contract: writes are checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.errors import InternalError


class SchemaContractError(InternalError, ValueError):
    """A DataFrame does not match the declared schema of the table it is written to."""


#: The Delta table property naming the columns with file statistics (Delta >= 3.1, delta-rs >= 0.17).
STATS_COLUMNS_PROPERTY = "delta.dataSkippingStatsColumns"


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: T.StructType
    partition_by: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()          # merge keys (unique per row)
    description: str = ""
    # nullable columns a later release added to a published contract: stored (and read) like the
    # others, but a writer that predates them may leave them out (conform writes null), so code and
    # notebooks building rows of `schema` keep working
    later_fields: tuple[T.StructField, ...] = ()
    # the `cvseg` verb (and nightly step of the same name) that writes the table: the one place
    # that says which stage owns it (pipelines/nightly.py's step outputs, the report's hints)
    produced_by: str = ""
    # columns, besides the keys, that reads filter on by value (not partition columns): with the keys
    # they are the only ones Delta keeps min/max statistics for (:attr:`stats_columns`)
    filter_columns: tuple[str, ...] = ()

    @property
    def stats_columns(self) -> tuple[str, ...]:
        """The columns whose per-file min/max Delta collects (``delta.dataSkippingStatsColumns``): the
        keys and :attr:`filter_columns`, partition columns left out (pruned by their values). Delta's
        default, the first 32 columns, costs a per-row aggregate over every one of them on each write
        (~1 s of a 2M-row customer_scores write of 6 s) for statistics no read of the engine uses."""
        named = [c for c in (*self.keys, *self.filter_columns) if c not in self.partition_by]
        return tuple(dict.fromkeys(named))

    @property
    def table_properties(self) -> dict[str, str]:
        """Delta table properties the engine sets when it creates the table (and maintenance sets on
        tables created before): statistics on :attr:`stats_columns` only."""
        if not self.stats_columns:
            return {}
        return {STATS_COLUMNS_PROPERTY: ",".join(self.stats_columns)}

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]

    @property
    def stored_schema(self) -> T.StructType:
        """What the table holds: ``schema`` plus ``later_fields``."""
        return T.StructType(self.schema.fields + list(self.later_fields)) if self.later_fields else self.schema

    @property
    def stored_columns(self) -> list[str]:
        return [f.name for f in self.stored_schema.fields]


def conform(df: DataFrame, spec: TableSpec) -> DataFrame:
    """Select the table's columns in order with the declared types; fail on missing/extra columns."""
    later = {f.name for f in spec.later_fields}
    df = df.select("*", *[F.lit(None).cast(f.dataType).alias(f.name) for f in spec.later_fields
                          if f.name not in df.columns])
    have = set(df.columns)
    want = spec.stored_columns
    missing = [c for c in want if c not in have and c not in later]
    extra = sorted(have - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra}")
        raise SchemaContractError(f"cannot write table {spec.name!r}: {'; '.join(parts)}")
    current = dict(df.dtypes)
    cols = []
    for field in spec.stored_schema.fields:
        if current[field.name] == field.dataType.simpleString():
            cols.append(F.col(field.name))
        else:
            cols.append(F.col(field.name).cast(field.dataType).alias(field.name))
    return df.select(*cols)


def _f(name: str, dtype: T.DataType, nullable: bool = True) -> T.StructField:
    return T.StructField(name, dtype, nullable)


S, L, I, D, B, TS, DT = (T.StringType(), T.LongType(), T.IntegerType(), T.DoubleType(),
                         T.BooleanType(), T.TimestampType(), T.DateType())

ORDERS = TableSpec(
    name="orders",
    produced_by="ingest",
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
    filter_columns=("order_date", "customer_id"),
    later_fields=(
        # the source's name (sources[].name; "default" for a lone source; null in rows written before
        # sources existed). customer_id is that source's own id: `identity_map` gives the unified one
        _f("source_name", S),
    ),
)

ORDERS_QUARANTINE = TableSpec(
    name="orders_quarantine",
    produced_by="ingest",
    description="Rejected source rows, each with a reason code, source file and row number.",
    schema=T.StructType([
        _f("source_file", S, False),
        _f("source_row", L, False),
        _f("reason", S, False),              # first failing rule's code
        _f("reasons", T.ArrayType(S), False),  # every failing rule's code
        _f("detail", S),
        _f("order_id", S),
        _f("customer_id", S),
        _f("raw", T.MapType(S, S)),          # the row as read, column -> text (+ "_line" when malformed_row)
        _f("ingest_run_id", S, False),
        _f("run_date", DT, False),           # the day the file was read (what "future" is judged against)
        _f("order_date", DT),                # the row's order day when it parsed: a future row is retried from it
    ]),
    keys=("source_file", "source_row"),
)

INGEST_RUNS = TableSpec(
    name="ingest_runs",
    produced_by="ingest",
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
        _f("future_rows_retried", L),        # rows quarantined as future earlier, read again as their day came
        _f("status_counts", T.MapType(S, L)),    # rows per status value read ("(empty)" for none)
        _f("channel_counts", T.MapType(S, L)),   # rows per channel value read
        _f("category_counts", T.MapType(S, L)),  # rows per category value read
        _f("source_name", S),                # sources[].name (null: written before sources existed)
        # earliest order_date of the orders new or changed (null: none, or written before this column):
        # the trend tables' incremental runs start there without scanning `orders`
        _f("first_order_date", DT),
    ]),
    keys=("ingest_run_id",),
)

#: The trailing windows of customer_features (orders_<m>m, net_<m>m): ``features.trailing_months`` must
#: name these (checked when the config loads); another window is a schema change here.
TRAILING_MONTHS: tuple[int, ...] = (3, 6, 12)

CUSTOMER_FEATURES = TableSpec(
    name="customer_features",
    produced_by="features",
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
        *[field for months in TRAILING_MONTHS
          for field in (_f(f"orders_{months}m", L, False), _f(f"net_{months}m", D, False))],
        _f("acquisition_channel", S),
        _f("top_category", S),
        _f("first_category", S),             # category of the first order
        _f("is_repeat", B, False),
        _f("days_to_second_purchase", I),
        _f("rfm_r", I, False),
        _f("rfm_f", I, False),
        _f("rfm_m", I, False),
        _f("rfm_score", S, False),
        # Net basis (models.purchase_basis): completed orders only; null for a customer who only cancelled.
        _f("net_first_order_date", DT),
        _f("net_frequency", D),
        _f("net_recency", D),
        _f("net_T", D),
        _f("net_monetary_value", D),          # mean net amount per repeat completed purchase day
        # Sources (several order sources, one customer); nullable only for partitions written before them.
        _f("first_source", S),                # source of the first order
        _f("source_set", S),                  # sources bought from, sorted, joined by "+" ("ec+store")
        _f("net_first_6m", D),                # net amount of orders in the six months from the first order
    ]),
    partition_by=("as_of_date",),
    keys=("as_of_date", "customer_id"),
)

CALIBRATION_HOLDOUT = TableSpec(
    name="calibration_holdout",
    produced_by="calibrate",
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
    produced_by="score",
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
        # gross | net: which orders the purchase and spend models saw; "net_rule" for a customer
        # with no completed order under the net basis (no BTYD score: value 0, p_alive 0, placed by rule)
        _f("purchase_basis", S),
        # the 80% interval of the same 6-month net value and its median (models/intervals.py), and
        # P(value = 0); null for the cohort / naive values, customers placed by rule,
        # models.intervals: false, and partitions written before they existed
        _f("predicted_net_value_p10", D),
        _f("predicted_net_value_p50", D),
        _f("predicted_net_value_p90", D),
        _f("p_zero_value", D),
        # what intervals of group totals (segments, channels) add up, models.intervals.group_terms: the
        # value's sd, the sd of its parameter part, and that part's first-order loadings on the fit's
        # whitened parameters (add across customers of one fit); null where the interval is null
        _f("predicted_net_value_sd", D),
        _f("predicted_net_value_param_sd", D),
        _f("predicted_net_value_param_loadings", T.ArrayType(D)),
        # SCORES_CARRIED_COLUMNS: the customer's acquisition as in customer_features at D, copied at
        # scoring so per-channel totals (ltv_by_channel) need no join; null in partitions written before
        _f("acquisition_channel", S),
        _f("first_order_date", DT),
        _f("days_to_second_purchase", I),
    ]),
    partition_by=("as_of_date",),
    keys=("as_of_date", "customer_id"),
)

#: customer_features columns customer_scores holds as they were at scoring (see its schema)
SCORES_CARRIED_COLUMNS = ("acquisition_channel", "first_order_date", "days_to_second_purchase")

FEATURES_RUNS = TableSpec(
    name="features_runs",
    produced_by="features",
    description="One row per customer_features partition written: the orders version it read and "
                "whether it was computed in full or updated from an earlier date.",
    schema=T.StructType([
        _f("as_of_date", DT, False),
        _f("orders_version", L, False),      # Delta version of `orders` the features were computed from
        _f("time_unit", S, False),
        _f("trailing_months", T.ArrayType(I), False),
        _f("mode", S, False),                # full | incremental
        _f("base_as_of_date", DT),           # incremental: the earlier partition it was updated from
        _f("full_as_of_date", DT, False),    # the last full computation in this chain
        _f("customers", L, False),
        _f("recomputed_customers", L, False),   # customers whose orders were read (all, when full)
        _f("computed_at", TS, False),
        _f("identity_version", L),           # Delta version of `identity_map` read (null: no identity step)
    ]),
    keys=("as_of_date",),
)

INGESTED_FILES = TableSpec(
    name="ingested_files",
    produced_by="ingest",
    description="Every source file an ingest committed, with the size and modification time it had then; "
                "with source.new_files_only an unchanged file is not read again.",
    schema=T.StructType([
        _f("source_file", S, False),         # as in orders.source_file
        _f("file_size", L, False),           # bytes
        _f("modified_at", TS, False),        # the file system's modification time
        _f("data_rows", L, False),           # rows read from it (header excluded)
        _f("ingest_run_id", S, False),
        _f("ingested_at", TS, False),
        _f("source_name", S),                # sources[].name (null: written before sources existed)
    ]),
    keys=("source_file", "file_size", "modified_at"),
)

PIPELINE_RUNS = TableSpec(
    name="pipeline_runs",
    produced_by="run",
    description="One row per step of `cvseg run` that executed (ok or failed); skipped steps add no row.",
    schema=T.StructType([
        _f("run_id", S, False),
        _f("run_date", DT, False),           # the as-of date D the run is for
        _f("step", S, False),                # ingest | features | score | segments | trends | export | maintain
        _f("status", S, False),              # ok | failed
        _f("started_at", TS, False),
        _f("finished_at", TS, False),
        _f("seconds", D, False),
        _f("output_versions", T.MapType(S, L)),  # table -> Delta version the step committed
        _f("message", S),                    # summary (ok) or the one-line reason (failed)
    ]),
    keys=("run_id", "step"),
)

# -- One customer across sources (pipelines/identity.py, run by `cvseg ingest` after the sources) --
IDENTITY_KEYS = TableSpec(
    name="identity_keys",
    produced_by="ingest",
    description="Matching keys of each source customer id: normalised e-mail / phone, HMAC-SHA256 with "
                "export.hmac_key_env's key (never the clear text).",
    schema=T.StructType([
        _f("source_name", S, False),
        _f("source_customer_id", S, False),
        _f("key_type", S, False),            # email | phone
        _f("key_hash", S, False),            # hex HMAC-SHA256 of the normalised key
        _f("first_seen", DT, False),         # run date of the ingest that first read it
    ]),
    keys=("source_name", "source_customer_id", "key_type", "key_hash"),
)

IDENTITY_MAP = TableSpec(
    name="identity_map",
    produced_by="ingest",
    description="Every source customer id -> the unified customer_id that features, scores, segments, trends "
                "and the export use; how it was linked and since when.",
    schema=T.StructType([
        _f("source_name", S, False),
        _f("source_customer_id", S, False),
        _f("customer_id", S, False),         # unified id
        _f("method", S, False),              # own (linked to nobody) | map (identity.map) | match (shared keys)
        _f("first_seen", DT, False),         # run date the source id was first resolved
        _f("assigned_on", DT, False),        # run date its current customer_id was assigned
        _f("identity_run_id", S, False),
    ]),
    keys=("source_name", "source_customer_id"),
)

IDENTITY_CONFLICTS = TableSpec(
    name="identity_conflicts",
    produced_by="ingest",
    description="Links the identity step did not make, with the reason and the rule that decided.",
    schema=T.StructType([
        _f("identity_run_id", S, False),
        _f("run_date", DT, False),
        _f("reason", S, False),              # map_conflict | match_conflict | key_too_common
        _f("source_name", S),
        _f("source_customer_id", S),
        _f("key_type", S),                   # key_too_common: email | phone
        _f("key_hash", S),                   # key_too_common: the hashed key
        _f("candidates", T.ArrayType(S), False),   # the customer ids (or source ids) that claimed it
        _f("resolution", S, False),          # what was done (the stated rule)
    ]),
    keys=("identity_run_id", "reason", "source_name", "source_customer_id", "key_hash"),
)

IDENTITY_RUNS = TableSpec(
    name="identity_runs",
    produced_by="ingest",
    description="One row per identity resolution: source ids, unified customers, links, merges, conflicts.",
    schema=T.StructType([
        _f("identity_run_id", S, False),
        _f("run_date", DT, False),
        _f("source_ids", L, False),          # source customer ids resolved
        _f("customers", L, False),           # unified customer ids
        _f("linked_source_ids", L, False),   # source ids whose unified id is another id's (method map or match)
        _f("new_source_ids", L, False),      # first seen in this run
        _f("reassigned_source_ids", L, False),   # whose unified id changed (merged into an older one)
        _f("conflicts", L, False),           # rows written to identity_conflicts
        _f("iterations", I, False),          # label propagation rounds
        _f("write_mode", S, False),          # unchanged | append | overwrite
        _f("identity_map_version", L),       # Delta version of identity_map after the run
        _f("finished_at", TS, False),
        _f("mode", S),                       # full (every source id) | incremental (only what is new)
        _f("full_reason", S),                # why a run resolved every source id
        _f("orders_version", L),             # the orders and identity_keys versions it read:
        _f("keys_version", L),               # the next incremental run starts from them
        _f("settings", S),                   # the identity settings it resolved with (JSON): a change resolves all
    ]),
    keys=("identity_run_id",),
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (
    ORDERS, ORDERS_QUARANTINE, INGEST_RUNS, INGESTED_FILES, CUSTOMER_FEATURES, FEATURES_RUNS, CALIBRATION_HOLDOUT, CUSTOMER_SCORES,
    PIPELINE_RUNS, IDENTITY_KEYS, IDENTITY_MAP, IDENTITY_CONFLICTS, IDENTITY_RUNS,
)}

# -- Stage 3: segment generations and trend tables (pipelines/segments.py, pipelines/trends.py) --
SEGMENTS_CURRENT = TableSpec(
    name="segments_current",
    produced_by="segments",
    description="Every segmented customer's segment in the current generation (read by `cvseg export`).",
    schema=T.StructType([
        _f("customer_id", S, False),
        _f("segment", S, False),
        _f("generation_id", I, False),
        _f("valid_from", DT, False),          # the generation cut, or the night a newcomer was placed
        _f("value_at_assignment", D, False),  # predicted 6-month net value when placed
        _f("p_alive_at_assignment", D, False),
        _f("assigned_as_of", DT, False),      # as-of date of the customer_scores used
    ]),
    keys=("customer_id",),
)

SEGMENTS_HISTORY = TableSpec(
    name="segments_history",
    produced_by="segments",
    description="SCD type 2 history of segments: one row per customer and generation; valid_to null while current.",
    schema=T.StructType([
        _f("customer_id", S, False),
        _f("segment", S, False),
        _f("generation_id", I, False),        # partition
        _f("valid_from", DT, False),
        _f("valid_to", DT),                   # exclusive: the next generation's valid_from
        _f("value_at_assignment", D, False),
        _f("p_alive_at_assignment", D, False),
        _f("assigned_as_of", DT, False),
        _f("assignment", S, False),           # generation (cut) | placement (nightly newcomer)
    ]),
    partition_by=("generation_id",),
    keys=("customer_id", "generation_id"),
)

SEGMENT_GENERATIONS = TableSpec(
    name="segment_generations",
    produced_by="segments",
    description="One row per segment generation with its frozen band definitions and cut points.",
    schema=T.StructType([
        _f("generation_id", I, False),
        _f("valid_from", DT, False),
        _f("valid_to", DT),                   # null while current
        _f("as_of_date", DT, False),          # customer_scores date the cut used
        _f("band_method", S, False),          # quantile | value
        _f("definition", S, False),           # JSON: bands with frozen cut points, lifecycle rules, precedence
        _f("horizon_months", I, False),       # horizon of the predicted values
        _f("customers", L, False),            # customers segmented at the cut
        _f("segment_counts", T.MapType(S, L), False),
    ]),
    keys=("generation_id",),
)

GENERATION_REVIEW = TableSpec(
    name="generation_review",
    produced_by="segments",
    description="Closing the loop: per segment of an ended generation, predicted vs actual net revenue.",
    schema=T.StructType([
        _f("generation_id", I, False),        # partition: the generation that ended
        _f("segment", S, False),
        _f("valid_from", DT, False),
        _f("valid_to", DT, False),
        _f("customers", L, False),
        _f("predicted_net_value", D, False),  # sum of value_at_assignment
        _f("actual_net_value", D, False),     # net of orders after assignment, within the generation and horizon
        _f("actual_orders", L, False),
        _f("buyers", L, False),               # customers with at least one such order
        _f("actual_to_predicted", D),         # actual / predicted; null when predicted is 0
        _f("horizon_coverage", D, False),     # mean share of the horizon the generation observed (1 = full)
    ]),
    partition_by=("generation_id",),
    keys=("generation_id", "segment"),
)

SEGMENT_MIGRATION = TableSpec(
    name="segment_migration",
    produced_by="segments",
    description="Customers by (segment in the ended generation, segment in the new one); sums to the customers of both.",
    schema=T.StructType([
        _f("to_generation", I, False),        # partition
        _f("from_generation", I, False),
        _f("from_segment", S, False),         # "(none)": not segmented in from_generation (newcomer)
        _f("to_segment", S, False),           # "(gone)": not in the new generation's scores
        _f("customers", L, False),
    ]),
    partition_by=("to_generation",),
    keys=("to_generation", "from_segment", "to_segment"),
)

TREND_WEEKLY_SEGMENT = TableSpec(
    name="trend_weekly_segment",
    produced_by="trends",
    description="Per week (Monday) and current segment: customer base, active buyers, orders and revenue.",
    schema=T.StructType([
        _f("year", I, False),                 # partition: calendar year of week_start
        _f("week_start", DT, False),          # Monday of the business-timezone order_date
        _f("week_end", DT, False),
        _f("segment", S, False),              # current segment; "(unsegmented)" if none yet
        _f("customers", L, False),            # segment's customers with a first order on or before week_end
        _f("active_buyers", L, False),        # customers with an order that was not fully cancelled
        _f("orders", L, False),
        _f("cancelled_orders", L, False),
        _f("gross", D, False),
        _f("cancelled", D, False),
        _f("net", D, False),
        _f("is_partial_week", B, False),      # the as-of date falls inside the week
    ]),
    partition_by=("year",),
    keys=("week_start", "segment"),
)

TREND_NEW_CUSTOMERS_WEEKLY = TableSpec(
    name="trend_new_customers_weekly",
    produced_by="trends",
    description="New customers (first order) per week and acquisition channel.",
    schema=T.StructType([
        _f("year", I, False),                 # partition: calendar year of week_start
        _f("week_start", DT, False),
        _f("acquisition_channel", S, False),  # channel of the first order; "(unknown)" if none
        _f("new_customers", L, False),
        _f("is_partial_week", B, False),
    ]),
    partition_by=("year",),
    keys=("week_start", "acquisition_channel"),
)

TREND_F2_CONVERSION = TableSpec(
    name="trend_f2_conversion",
    produced_by="trends",
    description="Second-purchase (F2) conversion within 90 and 180 days by acquisition-month cohort.",
    schema=T.StructType([
        _f("cohort_year", I, False),          # partition
        _f("cohort_month", S, False),         # yyyy-MM of the first order
        _f("customers", L, False),
        _f("converted_90d", L, False),        # second purchase day within 90 days of the first
        _f("converted_180d", L, False),
        _f("f2_rate_90d", D, False),
        _f("f2_rate_180d", D, False),
        _f("is_complete_90d", B, False),      # every cohort member has had 90 days by the as-of date
        _f("is_complete_180d", B, False),
    ]),
    partition_by=("cohort_year",),
    keys=("cohort_month",),
)

TREND_COHORT_RETENTION = TableSpec(
    name="trend_cohort_retention",
    produced_by="trends",
    description="Active customers and revenue by acquisition-month cohort and month of activity.",
    schema=T.StructType([
        _f("activity_year", I, False),        # partition
        _f("activity_month", S, False),       # yyyy-MM of the orders
        _f("cohort_month", S, False),         # yyyy-MM of the first order
        _f("months_since_first_order", I, False),  # 0 = the acquisition month
        _f("cohort_customers", L, False),
        _f("active_customers", L, False),     # with an order not fully cancelled in activity_month
        _f("orders", L, False),
        _f("net", D, False),
        _f("retention_rate", D, False),       # active_customers / cohort_customers
    ]),
    partition_by=("activity_year",),
    keys=("activity_month", "cohort_month"),
)

TREND_YEARLY = TableSpec(
    name="trend_yearly",
    produced_by="trends",
    description="New vs existing customers and net revenue per calendar year (last trends.years years).",
    schema=T.StructType([
        _f("year", I, False),                 # partition
        _f("new_customers", L, False),        # first order in the year
        _f("existing_customers", L, False),   # first order before the year, active in it
        _f("new_customer_net", D, False),
        _f("existing_customer_net", D, False),
        _f("net", D, False),
        _f("orders", L, False),
        _f("is_partial_year", B, False),
        _f("through_date", DT, False),        # last day counted (the as-of date in the current year)
    ]),
    partition_by=("year",),
    keys=("year",),
)

TREND_YEARLY_CATEGORY = TableSpec(
    name="trend_yearly_category",
    produced_by="trends",
    description="trend_yearly by product category: buyers new in the year vs existing, and net revenue.",
    schema=T.StructType([
        _f("year", I, False),                 # partition
        _f("category", S, False),             # "(unknown)" for orders without one
        _f("new_customers", L, False),        # buyers in the category whose first order is in the year
        _f("existing_customers", L, False),   # buyers in the category acquired in an earlier year
        _f("new_customer_net", D, False),
        _f("existing_customer_net", D, False),
        _f("net", D, False),
        _f("orders", L, False),
        _f("is_partial_year", B, False),
    ]),
    partition_by=("year",),
    keys=("year", "category"),
)

TREND_CHANNEL_SETS = TableSpec(
    name="trend_channel_sets",
    produced_by="trends",
    description="Customers by acquisition week / year, the source of their first order and the set of sources "
                "they bought from by the as-of date (ec, store, ec+store): F2 and 6-month value.",
    schema=T.StructType([
        _f("year", I, False),                 # partition: calendar year of period_start
        _f("period", S, False),               # week | year
        _f("period_start", DT, False),        # Monday of the first order's week, or 1 January
        _f("first_source", S, False),         # source of the first order across all sources
        _f("source_set", S, False),           # sources bought from by the as-of date, sorted, joined by "+"
        _f("customers", L, False),
        _f("converted_90d", L, False),        # second purchase day within 90 days of the first (any source)
        _f("f2_rate_90d", D, False),
        _f("net_6m", D, False),               # net revenue in the 6 months from the first order
        _f("net_6m_per_customer", D, False),
        _f("crossed_customers", L, False),    # bought later from another source than the first order's
        _f("is_complete_90d", B, False),      # every customer of the row has had 90 days by the as-of date
        _f("is_complete_6m", B, False),
    ]),
    partition_by=("year",),
    keys=("period", "period_start", "first_source", "source_set"),
)

TREND_RUNS = TableSpec(
    name="trend_runs",
    produced_by="trends",
    description="One row per trend run that wrote something: what it read and which periods it recomputed.",
    schema=T.StructType([
        _f("run_seq", L, False),
        _f("as_of_date", DT, False),
        _f("mode", S, False),                 # rebuild | incremental
        _f("generation_id", I),               # segment generation the weekly segment trend used
        _f("segments_version", L),            # Delta version of segments_current read
        _f("ingest_run_ids", T.ArrayType(S), False),  # ingest runs that had written orders
        _f("recomputed_from", T.MapType(S, I), False),  # table -> first year recomputed (null: all)
        _f("finished_at", TS, False),
        _f("identity_version", L),            # Delta version of identity_map read (null: no identity step)
        _f("orders_version", L),              # Delta version of orders read (null: runs before it was recorded)
    ]),
    keys=("run_seq",),
)

LTV_BY_CHANNEL = TableSpec(
    name="ltv_by_channel",
    produced_by="trends",
    description="Per as-of date, acquisition channel and acquisition month: customers, their predicted 6-month "
                "net value (total with its 80% interval, mean) and F2 within 90 days; a snapshot per date.",
    schema=T.StructType([
        _f("as_of_date", DT, False),          # partition: customer_scores date; rewritten whole per date
        _f("acquisition_channel", S, False),  # channel of the first order; "(unknown)" if none
        _f("acquisition_month", S, False),    # yyyy-MM of the first order
        _f("customers", L, False),            # scored customers
        _f("predicted_net_value", D, False),  # sum of customer_scores.predicted_net_value
        _f("predicted_net_value_mean", D, False),
        # 80% interval of the total (models.intervals, group totals); null when a customer with a
        # value has no interval (cohort / naive / hybrid values, models.intervals: false)
        _f("predicted_net_value_p10", D),
        _f("predicted_net_value_p90", D),
        _f("converted_90d", L, False),        # second purchase day within 90 days of the first
        _f("f2_rate_90d", D, False),          # converted_90d / customers
        _f("is_complete_90d", B, False),      # the month's last day + 90 days is on or before the as-of date
        # the interval's sums over the customers (pipelines/value_totals.py), so that rows add up to
        # larger groups (a channel over all months) with an exact interval: process variances, the
        # interaction sds (a bound), the parameter loadings coordinate by coordinate; null without intervals
        _f("predicted_net_value_process_var", D),
        _f("predicted_net_value_interaction_sd", D),
        _f("predicted_net_value_param_loadings", T.ArrayType(D)),
        _f("predicted_net_value_log_p_zero", D),   # log P(the group brings nothing), customers independent
        _f("customers_without_interval", L, False),   # with a value but no interval: P10 / P90 null
        _f("model_version", S, False),        # of the scores (customer_scores.model_version)
        _f("horizon_months", I, False),
    ]),
    partition_by=("as_of_date",),
    keys=("as_of_date", "acquisition_channel", "acquisition_month"),
)

TABLES.update({t.name: t for t in (
    SEGMENTS_CURRENT, SEGMENTS_HISTORY, SEGMENT_GENERATIONS, GENERATION_REVIEW, SEGMENT_MIGRATION,
    TREND_WEEKLY_SEGMENT, TREND_NEW_CUSTOMERS_WEEKLY, TREND_F2_CONVERSION, TREND_COHORT_RETENTION,
    TREND_YEARLY, TREND_YEARLY_CATEGORY, TREND_CHANNEL_SETS, TREND_RUNS, LTV_BY_CHANNEL,
)})
# -- end of stage 3 tables --

# -- Stage 2: backtests (pipelines/backtest.py); a few rows per run, so not partitioned --
MODEL_BACKTEST = TableSpec(
    name="model_backtest",
    produced_by="backtest",
    description="One row per backtest run, origin and model: the holdout metrics (NaN stored as null).",
    schema=T.StructType([
        _f("backtest_run_id", S, False),
        _f("origin_date", DT, False),         # the backtest's as-of date: the holdout ends here
        _f("cutoff_date", DT, False),         # origin - horizon: models see data up to here
        _f("horizon_end", DT, False),
        _f("horizon_months", I, False),
        _f("time_unit", S, False),
        _f("model", S, False),                # bgnbd | paretonbd | mbgnbd (+ _net on the net basis) | cohort | naive
        _f("value_model", S, False),          # btyd | cohort | naive
        _f("purchase_model", S, False),       # BTYD purchase model in the bundle (cohort/naive: for p_alive)
        _f("penalizer_coef", D, False),
        _f("n_customers", L, False),          # customers at the cutoff (predicted and compared)
        _f("actual_total", D, False),         # actual net revenue in (cutoff, horizon_end]
        _f("predicted_total", D, False),
        _f("mae", D),
        _f("rmse", D),
        _f("total_error_pct", D),             # (predicted - actual) / actual total x 100; + = over
        _f("abs_total_error_pct", D),
        _f("spearman", D),
        _f("normalized_gini", D),
        _f("top_decile_capture", D),          # share of actual revenue in the predicted top 10%
        _f("top20_capture", D),
        _f("calibration_holdout_version", L, False),  # Delta version of the input table
        _f("mlflow_run_id", S),
        _f("mlflow_parent_run_id", S),
        _f("model_version", S),               # registered version (newest origin only), else null
        _f("is_champion", B, False),          # best mean champion_metric over the run's origins
        _f("champion_metric", S, False),
        _f("created_at", TS, False),
        _f("purchase_basis", S),              # gross | net: the orders the BTYD models saw
        # share of customers inside their 80% value interval (a realised 0 counted by the randomised
        # PIT, models/intervals.py); the plain closed-interval share; null without intervals
        _f("interval_coverage", D),
        _f("interval_closed_coverage", D),
    ]),
    keys=("backtest_run_id", "origin_date", "model"),
)

MODEL_BACKTEST_DECILES = TableSpec(
    name="model_backtest_deciles",
    produced_by="backtest",
    description="Decile calibration table per backtest run, origin and model (decile 1 = highest predicted).",
    schema=T.StructType([
        _f("backtest_run_id", S, False),
        _f("origin_date", DT, False),
        _f("model", S, False),
        _f("decile", I, False),
        _f("n", L, False),                    # customers (ties are never split, so deciles can be uneven)
        _f("mean_predicted", D),              # null when n is 0
        _f("mean_actual", D),
        _f("sum_predicted", D, False),
        _f("sum_actual", D, False),
        _f("created_at", TS, False),
    ]),
    keys=("backtest_run_id", "origin_date", "model", "decile"),
)

TABLES.update({t.name: t for t in (MODEL_BACKTEST, MODEL_BACKTEST_DECILES)})
# -- end of backtest tables --

# -- The hybrid's explanation (pipelines/hybrid.py, written by `cvseg backtest`); a few rows per hybrid --
MODEL_IMPORTANCES = TableSpec(
    name="model_importances",
    produced_by="backtest",
    description="Per backtest run and hybrid model: each input's permutation importance on the newest "
                "origin's holdout (how much the MAE per customer grows when the input is shuffled).",
    schema=T.StructType([
        _f("backtest_run_id", S, False),
        _f("origin_date", DT, False),
        _f("cutoff_date", DT, False),         # the hybrid scored customers as of this date
        _f("model", S, False),                # hybrid | hybrid_net
        _f("feature", S, False),
        _f("rank", I, False),                 # 1 = most important
        _f("importance", D, False),           # MAE increase per customer, in currency
        _f("importance_std", D, False),       # spread over the shuffles
        _f("split_gain_share", D),            # share of the trees' split gain (what the fit used)
        _f("training_cutoff", DT, False),     # training inputs as of this date, target in (it, cutoff]
        _f("training_rows", L, False),        # the training sample's size
        _f("holdout_rows", L, False),         # the rows the importance was measured on
        _f("base_model", S, False),           # the BTYD model whose outputs the trees read, e.g. bgnbd
        _f("base_params", S, False),          # its parameters and Gamma-Gamma's (JSON), shown beside
        _f("created_at", TS, False),
    ]),
    keys=("backtest_run_id", "model", "feature"),
)
TABLES[MODEL_IMPORTANCES.name] = MODEL_IMPORTANCES

# -- Table maintenance (pipelines/maintenance.py, `cvseg maintain`); a few rows per run --
MAINTENANCE_RUNS = TableSpec(
    name="maintenance_runs",
    produced_by="maintain",
    description="One row per table and maintenance run: files and bytes before/after, partitions "
                "pruned by retention (what tells a reader its date was pruned), files vacuumed.",
    schema=T.StructType([
        _f("run_id", S, False),
        _f("as_of_date", DT, False),          # retention is counted back from this date
        _f("table_name", S, False),
        _f("backend", S, False),              # delta-spark | deltalake
        _f("files_before", L, False),         # data files the latest version references
        _f("files_after", L, False),
        _f("disk_files_before", L, False),    # every file under the table's folder (log, old versions)
        _f("disk_files_after", L, False),
        _f("bytes_before", L, False),         # bytes under the table's folder
        _f("bytes_after", L, False),
        _f("files_compacted", L, False),      # small files rewritten into larger ones
        _f("partitions_pruned", T.ArrayType(S), False),  # partition values removed by retention
        _f("retention_setting", S),           # e.g. retention.customer_features_days; null: none applies
        _f("retention_days", I),
        _f("files_vacuumed", L, False),
        _f("retention_hours", L, False),      # VACUUM retention (storage.retention_hours)
        _f("checkpoint", B, False),           # an explicit checkpoint was written
        _f("seconds", D, False),
        _f("finished_at", TS, False),
    ]),
    keys=("run_id", "table_name"),
)

TABLES[MAINTENANCE_RUNS.name] = MAINTENANCE_RUNS
# -- end of maintenance tables --



#: verbs whose command needs the as-of date to rebuild a table (ingest reads files, not a date)
_DATED_VERBS = ("features", "score", "segments", "trends", "backtest", "run")


def tables_produced_by(verb: str) -> tuple[str, ...]:
    """Every table ``cvseg <verb>`` (or the nightly step of that name) writes, in catalogue order."""
    return tuple(name for name, spec in TABLES.items() if spec.produced_by == verb)


def producing_command(name: str, as_of: object | None = None) -> str:
    """The command that writes table ``name`` (for "run this first" messages)."""
    verb = table_spec(name).produced_by
    if verb == "calibrate":
        return "cvseg calibrate --cutoff <date>"
    date = f" --as-of {as_of}" if as_of is not None else " --as-of <date>"
    return f"cvseg {verb}{date if verb in _DATED_VERBS else ''}"


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known tables: {', '.join(sorted(TABLES))}") from None
