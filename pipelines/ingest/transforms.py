"""Ingest's column functions and DataFrame transforms: no I/O, no config reads (every value comes in as
an argument), each testable on a few rows."""
from __future__ import annotations

from datetime import date
from typing import Iterable, Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.tables import ORDERS, ORDERS_QUARANTINE
from pipelines.ingest.summary import DEFAULT_SOURCE, KIND_CANCELLATION, KIND_DUPLICATE, KIND_ORDER, KIND_QUARANTINED
from pipelines.validation import with_rule_details




# --------------------------------------------------------------------------------------------
# Column functions
# --------------------------------------------------------------------------------------------
# Full-width digits and Japanese minus signs (▲/△ are the accounting "minus") -> ASCII.
_AMOUNT_FROM = "０１２３４５６７８９．－▲△−"
_AMOUNT_TO = "0123456789.----"
# separators, yen signs, 円 suffix, spaces; cp932 stores ¥ as 0x5C, which decodes as a backslash
_AMOUNT_NOISE = "[\\s\u3000,，¥￥円$\\\\]"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)$"     # no exponent, NaN or Infinity: those are not amounts


def is_blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def parse_amount(text: Column) -> Column:
    """``1,234`` / ``¥1,234`` / ``￥1,234`` / ``1234円`` / `` 1 234 `` / ``▲500`` -> double; null if
    blank or not a number (see :func:`is_non_numeric_amount`)."""
    cleaned = F.regexp_replace(F.translate(text, _AMOUNT_FROM, _AMOUNT_TO), _AMOUNT_NOISE, "")
    # plain numbers (the bulk of any export) skip the clean-up
    return (F.when(text.rlike(_NUMBER), text.try_cast("double"))
            .when(cleaned.rlike(_NUMBER), cleaned.try_cast("double")))


def is_non_numeric_amount(text: Column, amount: Column | None = None) -> Column:
    """True when the text holds something that is not an amount (blank is "missing", not this).
    Pass ``amount`` (the parsed column) to avoid parsing twice."""
    return ~is_blank(text) & (parse_amount(text) if amount is None else amount).isNull()


def parse_timestamp(text: Column, formats: Sequence[str], tz: str) -> Column:
    """Local date-time text in zone ``tz`` -> UTC instant; the first format that parses wins, null
    if none does. Assumes a UTC session (``core.spark.build_spark`` sets it)."""
    cleaned = F.trim(text)
    parsed = F.coalesce(*[F.try_to_timestamp(cleaned, F.lit(fmt)) for fmt in formats])
    return F.to_utc_timestamp(parsed, tz)


def local_date(ts: Column, tz: str) -> Column:
    """Calendar day of an instant in zone ``tz`` (UTC session)."""
    return F.to_date(F.from_utc_timestamp(ts, tz))


def as_text(col: Column, dtype: T.DataType) -> Column:
    return col if isinstance(dtype, T.StringType) else col.try_cast("string")


def _amount_value(col: Column, dtype: T.DataType) -> Column:
    if isinstance(dtype, T.NullType):
        return F.lit(None).cast("double")
    if isinstance(dtype, T.NumericType):
        return col.try_cast("double")
    return parse_amount(as_text(col, dtype))


def _instant(col: Column, dtype: T.DataType, formats: Sequence[str], tz: str) -> Column:
    """Order timestamp of any source type -> UTC instant."""
    if isinstance(dtype, T.TimestampType):
        return col                                         # already an instant
    if isinstance(dtype, (T.TimestampNTZType, T.DateType)):
        return F.to_utc_timestamp(col.cast("timestamp"), tz)  # wall time in the source zone
    if isinstance(dtype, T.NullType):
        return F.lit(None).cast("timestamp")
    return parse_timestamp(as_text(col, dtype), formats, tz)


# --------------------------------------------------------------------------------------------
# Transforms (DataFrame -> DataFrame, no I/O)
# --------------------------------------------------------------------------------------------
POSITION = ("_src_file", "_src_block", "_src_pos")   # where a row came from, before row numbers
# _src_key: a unique long per row (monotonically increasing id), the row's identity between passes;
# within a file it grows with the row number, so "first" means first in read order.
TEXT_FIELDS = ("order_id", "customer_id", "status", "channel", "category", "currency")
TYPED_FIELDS = ("order_ts", "gross_amount", "quantity", "unit_price", "cancelled_amount")
KEY_FIELDS = ("email", "phone")   # matching keys: read only by the hashing pass, never as text
CONTENT = (*TEXT_FIELDS, *(f"{n}_in" for n in TYPED_FIELDS))   # "every mapped field"


def source_col(i: int) -> str:
    """Internal name of the i-th source column (source names may clash with canonical ones)."""
    return f"_s{i}"


def map_columns(df: DataFrame, source_names: Sequence[str], mapping: dict[str, str | None],
                keep_extra: bool) -> DataFrame:
    """Add the canonical input columns from the client's columns.

    ``df`` holds the source columns as ``_s0.._sN`` (named ``source_names``). Text fields
    (``order_id``, ``customer_id``, ``status``, ``channel``, ``category``, ``currency``) are trimmed,
    empty -> null; typed inputs keep their type as ``<field>_in``; unmapped fields are null.
    ``extra`` holds the unmapped source columns as text when ``keep_extra``, else null.
    """
    index = {name: i for i, name in enumerate(source_names)}
    cols: list[Column] = []
    for name in TEXT_FIELDS:
        src = mapping.get(name)
        if src is None:
            cols.append(F.lit(None).cast("string").alias(name))
            continue
        c = source_col(index[src])
        dtype = df.schema[c].dataType
        if isinstance(dtype, (T.FloatType, T.DoubleType)):
            # pandas turns integer ids with a gap into floats: 101.0 is customer "101"
            text = (F.when(F.col(c) == F.floor(F.col(c)), F.col(c).try_cast("bigint").try_cast("string"))
                    .otherwise(F.col(c).try_cast("string")))
        else:
            text = F.trim(as_text(F.col(c), dtype))
        if name == "currency":
            text = F.upper(text)
        cols.append(F.when(text != "", text).alias(name))
    for name in TYPED_FIELDS:
        src = mapping.get(name)
        cols.append((F.col(source_col(index[src])) if src is not None else F.lit(None)).alias(f"{name}_in"))
    mapped = {src for src in mapping.values() if src is not None}
    extra_names = [n for n in source_names if n not in mapped]
    if keep_extra and extra_names:
        pairs = []
        for n in extra_names:
            c = source_col(index[n])
            pairs += [F.lit(n), as_text(F.col(c), df.schema[c].dataType)]
        cols.append(F.create_map(*pairs).alias("extra"))
    else:
        cols.append(F.lit(None).cast("map<string,string>").alias("extra"))
    return df.select("*", *cols)


def with_parsed_fields(df: DataFrame, *, timestamp_formats: Sequence[str], source_tz: str,
                       business_tz: str, gross_from_lines: bool) -> DataFrame:
    """Parse the typed inputs: ``order_ts`` (UTC), ``order_date`` (business zone), ``gross_amount``
    (or quantity x unit_price), the partial ``cancelled_input``, and the amount flags the rules read."""
    types = {f.name: f.dataType for f in df.schema.fields}
    ts_type = types["order_ts_in"]

    def text(name: str) -> Column:
        return as_text(F.col(name), types[name])

    def bad(name: str, value: str) -> Column:
        if isinstance(types[name], (T.NumericType, T.NullType)):
            return F.lit(False)
        return is_non_numeric_amount(text(name), F.col(value))

    # values first, flags from the value columns: each text is parsed once
    parsed_df = (df
                 .withColumn("order_ts", _instant(F.col("order_ts_in"), ts_type, timestamp_formats, source_tz))
                 .withColumn("_qty", _amount_value(F.col("quantity_in"), types["quantity_in"]))
                 .withColumn("_price", _amount_value(F.col("unit_price_in"), types["unit_price_in"]))
                 .withColumn("_gross", _amount_value(F.col("gross_amount_in"), types["gross_amount_in"]))
                 .withColumn("cancelled_input", _amount_value(F.col("cancelled_amount_in"),
                                                              types["cancelled_amount_in"])))
    if gross_from_lines:
        gross = F.col("_qty") * F.col("_price")
        gross_bad = bad("quantity_in", "_qty") | bad("unit_price_in", "_price")
        gross_text = F.concat_ws(" x ", F.coalesce(text("quantity_in"), F.lit("")),
                                 F.coalesce(text("unit_price_in"), F.lit("")))
    else:
        gross, gross_bad, gross_text = F.col("_gross"), bad("gross_amount_in", "_gross"), text("gross_amount_in")
    cancelled_bad = bad("cancelled_amount_in", "cancelled_input")
    return (parsed_df
            .withColumn("order_ts_text", as_text(F.col("order_ts_in"), ts_type))
            .withColumn("order_date", local_date(F.col("order_ts"), business_tz))
            .withColumn("gross_amount", gross)
            .withColumn("is_amount_non_numeric", gross_bad | cancelled_bad)
            .withColumn("is_amount_missing", ~F.col("is_amount_non_numeric") & F.col("gross_amount").isNull())
            .withColumn("amount_text", F.when(gross_bad, gross_text)
                        .when(cancelled_bad, text("cancelled_amount_in")).otherwise(gross_text))
            .drop("_qty", "_price", "_gross"))


def with_cancellation_flags(df: DataFrame, *, style: str, cancelled_values: Sequence[str] = (),
                            order_id_prefix: str | None = None) -> DataFrame:
    """``is_cancellation_line`` (negative_lines style: id starts with the prefix or, without a
    prefix, the amount is negative), ``is_status_cancelled`` (status style) and
    ``line_cancelled_amount``: the whole gross for a cancelled status, else the partial cancelled
    amount clipped to [0, gross], else 0."""
    if style == "negative_lines":
        is_line = (F.col("order_id").startswith(order_id_prefix) if order_id_prefix
                   else F.col("gross_amount") < 0)
    else:
        is_line = F.lit(False)
    if style == "status" and cancelled_values:
        is_status = F.col("status").isin(list(cancelled_values))
    else:
        is_status = F.lit(False)
    partial = F.least(F.greatest(F.coalesce(F.col("cancelled_input"), F.lit(0.0)), F.lit(0.0)),
                      F.col("gross_amount"))
    return (df.withColumn("is_cancellation_line", F.coalesce(is_line, F.lit(False)))
            .withColumn("is_status_cancelled", F.coalesce(is_status, F.lit(False)))
            .withColumn("line_cancelled_amount",
                        F.when(F.col("is_status_cancelled"), F.col("gross_amount")).otherwise(partial)))


def _null_safe_hash(*names: str) -> Column:
    # xxhash64 skips nulls, so (a, null) and (null, a) would collide: hash a sentinel instead.
    return F.xxhash64(*[F.coalesce(F.col(n).try_cast("string"), F.lit("\u0000")) for n in names])


def with_row_keys(df: DataFrame, *, grain: str, order_id_mapped: bool) -> DataFrame:
    """``_order_key`` (the order id, or the row's position when the export has none),
    ``_header_hash`` (what must agree between rows of one order id: everything at grain order,
    customer and timestamp at grain line) and, at grain line, ``_content_hash`` (every mapped field).

    A malformed row (``_is_malformed``) gets no order key: its values may sit in the wrong
    columns, so it is no duplicate of, and no conflict with, a well-formed row of the same id
    (it is quarantined as ``malformed_row`` whatever it holds)."""
    if not order_id_mapped:
        return df.withColumn("_order_key", F.col("_src_key").cast("string"))
    order_key = F.col("order_id")
    if "_is_malformed" in df.columns:
        order_key = F.when(~F.col("_is_malformed"), order_key)
    out_df = df.withColumn("_order_key", order_key)
    if grain == "line":
        return (out_df.withColumn("_header_hash", _null_safe_hash("customer_id", "order_ts_in"))
                .withColumn("_content_hash", _null_safe_hash(*CONTENT)))
    return out_df.withColumn("_header_hash", _null_safe_hash(*CONTENT))


SET_SPLIT, SET_ORDER, SET_LINE, SET_PROFILE = "split", "order", "line", "profile"
#: Columns whose values ingest counts (summary, ingest_runs): what a client's codes look like.
PROFILED = ("status", "channel", "category")


def source_stats(df: DataFrame, *, grain: str, order_id_mapped: bool, profile: Sequence[str] = (),
                 in_read: Column | None = None) -> DataFrame:
    """One aggregation (grouping sets) over the keyed rows giving
    * per file split (``_set`` = split): its rows and first position, for exact row numbers;
    * per order id seen more than once (``order``): rows, min/max header hash, first position;
    * at grain line, per (order id, content) seen more than once (``line``): the exact copies;
    * per combination of the ``profile`` columns' values (``profile``: status, channel, category):
      its rows, so ingest can say which values it saw (a few hundred combinations at most).
    Only those rows are kept, so the result is small unless the export is mostly duplicates.

    ``in_read``: which rows the run reads (default: all). The others count only in a split's
    ``_n_all`` and first position (row numbers are positions in the whole file); ``_n`` and every
    other set hold the rows read."""
    # plain longs, not structs: min over a struct would turn the hash aggregation into a sort
    first = [F.min("_src_key").alias("_first"), F.min("_src_pos").alias("_first_pos")]
    counts = [F.count(F.lit(1)).alias("_n_all"), F.count(F.lit(1)).alias("_n")]
    profile = list(profile)
    if in_read is not None:
        counts[1] = F.count(F.when(F.col("_in_read"), F.lit(1))).alias("_n")
        # a row not read joins no order (its key is null) and no profile value (it counts 0)
        df = df.withColumn("_in_read", F.coalesce(in_read, F.lit(False)))
        if order_id_mapped:
            df = df.withColumn("_order_key", F.when(F.col("_in_read"), F.col("_order_key")))
    if not order_id_mapped and not profile:
        return (df.groupBy("_src_file", "_src_block")
                .agg(*counts, *first)
                .withColumn("_set", F.lit(SET_SPLIT)))
    sets: dict[str, list[str]] = {SET_SPLIT: ["_src_file", "_src_block"]}
    cols = ["_src_file", "_src_block"]
    if order_id_mapped:
        sets[SET_ORDER] = ["_order_key"]
        cols.append("_order_key")
        if grain == "line":
            sets[SET_LINE] = ["_order_key", "_content_hash"]
            cols.append("_content_hash")
    if profile:
        sets[SET_PROFILE] = profile
        cols += profile
    hashes = ([F.min("_header_hash").alias("_hmin"), F.max("_header_hash").alias("_hmax")]
              if order_id_mapped else [])
    stats_df = (df.groupingSets(list(sets.values()), *cols)
                .agg(*counts, *hashes, *first, F.grouping_id().alias("_gid")))
    # grouping_id sets a bit for every grouping column NOT in the set (first column = highest bit)
    width = len(cols)
    gid = {name: sum(1 << (width - 1 - cols.index(c)) for c in cols if c not in members)
           for name, members in sets.items()}
    kind = F.lit(None).cast("string")
    for name in sets:
        kind = F.when(F.col("_gid") == gid[name], F.lit(name)).otherwise(kind)
    keep = (F.col("_set") == SET_SPLIT) | ((F.col("_set") == SET_PROFILE) & (F.col("_n") > 0))
    if order_id_mapped:
        keep = keep | (((F.col("_set") == SET_ORDER) & (F.col("_n") > 1)
                        & ((F.col("_hmin") != F.col("_hmax")) | F.lit(grain == "order")))
                       | ((F.col("_set") == SET_LINE) & (F.col("_n") > 1))) & F.col("_order_key").isNotNull()
    return stats_df.withColumn("_set", kind).filter(keep).drop("_gid")


def value_profile(rows: Iterable, columns: Sequence[str]) -> dict[str, dict[str, int]]:
    """Profile rows of :func:`source_stats` -> {column: {value: rows}}, biggest first; a missing
    value counts as "(empty)"."""
    profile: dict[str, dict[str, int]] = {c: {} for c in columns}
    for r in rows:
        for c in columns:
            value = "(empty)" if r[c] is None else str(r[c])
            profile[c][value] = profile[c].get(value, 0) + int(r["_n"])
    return {c: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for c, v in profile.items()}


def with_duplicate_flags(df: DataFrame, stats_df: DataFrame | None, *, grain: str, broadcast: bool = True) -> DataFrame:
    """``is_exact_duplicate`` (every mapped field equals an earlier row's: the first row by source
    position is kept), ``is_order_conflict`` (rows of one order id disagree: all of them are
    quarantined, copies included) and ``conflict_detail``, from :func:`source_stats`."""
    if stats_df is None:  # no order id seen twice (derived ids are unique by construction)
        return (df.withColumn("is_exact_duplicate", F.lit(False))
                .withColumn("is_order_conflict", F.lit(False))
                .withColumn("conflict_detail", F.lit(None).cast("string")))

    def small(x_df: DataFrame) -> DataFrame:
        return F.broadcast(x_df) if broadcast else x_df

    orders_df = small(stats_df.filter(F.col("_set") == SET_ORDER).select(
        "_order_key", F.col("_n").alias("_order_rows"), (F.col("_hmin") != F.col("_hmax")).alias("_conflict"),
        F.col("_first").alias("_order_first")))
    out_df = df.join(orders_df, on="_order_key", how="left")
    is_conflict = F.coalesce(F.col("_conflict"), F.lit(False))
    here = F.col("_src_key")
    if grain == "line":
        copies_df = small(stats_df.filter(F.col("_set") == SET_LINE).select(
            "_order_key", "_content_hash", F.col("_first").alias("_copy_first")))
        out_df = out_df.join(copies_df, on=["_order_key", "_content_hash"], how="left")
        is_copy = F.col("_copy_first").isNotNull() & (here != F.col("_copy_first"))
    else:
        is_copy = F.col("_order_first").isNotNull() & (here != F.col("_order_first"))
    what = "customer or timestamp" if grain == "line" else "content"
    return (out_df
            .withColumn("is_order_conflict", is_conflict)
            .withColumn("is_exact_duplicate", ~is_conflict & is_copy)
            .withColumn("conflict_detail", F.when(is_conflict, F.concat(
                F.lit("order id "), F.col("order_id"), F.lit(" is on "), F.col("_order_rows").cast("string"),
                F.lit(f" rows whose {what} differ; every one is quarantined"))))
            .drop(*[c for c in ("_order_rows", "_conflict", "_order_first", "_copy_first") if c in out_df.columns]))


def match_cancellations(cancels_df: DataFrame, orders_df: DataFrame, *, order_id_prefix: str | None,
                        strip_prefix_to_match: bool) -> DataFrame:
    """Give each cancellation line a ``_target_key`` (the ``_order_key`` it cancels, null if none),
    ``_match`` (``id`` or ``heuristic``) and ``has_target_order``.

    ``orders_df``: one row per accepted order (``_order_key``, ``order_id``, ``customer_id``,
    ``order_ts``). By id: the line's order id without the prefix, same customer. Otherwise the
    customer's most recent order at or before the line's timestamp (UCI credit notes do not name
    their invoice).
    """
    if order_id_prefix and strip_prefix_to_match:
        by_id_df = orders_df.select(F.col("_order_key").alias("_id_target"),
                                    F.col("order_id").alias("_match_id"), "customer_id")
        cancels_df = (cancels_df
                      .withColumn("_match_id", F.expr(f"substring(order_id, {len(order_id_prefix) + 1})"))
                      .join(by_id_df, on=["customer_id", "_match_id"], how="left")
                      .drop("_match_id"))
    else:
        cancels_df = cancels_df.withColumn("_id_target", F.lit(None).cast("string"))
    # Heuristic for the rest: carry the latest order key forward along the customer's timeline;
    # orders sort before cancellations at the same instant ("at or before").
    events_df = (orders_df.select("customer_id", F.col("order_ts").alias("_ts"), F.lit(0).alias("_event"),
                                  F.col("_order_key").alias("_event_order"),
                                  F.lit(None).cast("bigint").alias("_src_key"))
                 .unionByName(cancels_df.filter(F.col("_id_target").isNull())
                              .select("customer_id", F.col("order_ts").alias("_ts"), F.lit(1).alias("_event"),
                                      F.lit(None).cast("string").alias("_event_order"), "_src_key")))
    timeline = (Window.partitionBy("customer_id").orderBy("_ts", "_event", "_event_order")
                .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    latest_df = (events_df.withColumn("_heuristic_target", F.last("_event_order", ignorenulls=True).over(timeline))
                 .filter(F.col("_event") == 1).select("_src_key", "_heuristic_target"))
    return (cancels_df.join(latest_df, on="_src_key", how="left")
            .withColumn("_target_key", F.coalesce("_id_target", "_heuristic_target"))
            .withColumn("_match", F.when(F.col("_id_target").isNotNull(), F.lit("id"))
                        .when(F.col("_heuristic_target").isNotNull(), F.lit("heuristic")))
            .withColumn("has_target_order", F.col("_target_key").isNotNull())
            .drop("_id_target", "_heuristic_target"))


def with_row_kind(df: DataFrame) -> DataFrame:
    """``kind``: exact_duplicate, else quarantined (a rule failed), else cancellation, else order.

    The always-true ``spark_partition_id() >= 0`` is a fence: Spark pushes a filter below every
    deterministic projection by inlining what it projects, so a filter on ``kind`` would parse each
    timestamp and amount a second time; a nondeterministic ``kind`` keeps filters above it."""
    kind = (F.when(F.col("is_exact_duplicate"), F.lit(KIND_DUPLICATE))
            .when(F.col("reason").isNotNull(), F.lit(KIND_QUARANTINED))
            .when(F.col("is_cancellation_line"), F.lit(KIND_CANCELLATION))
            .otherwise(F.lit(KIND_ORDER)))
    return df.withColumn("kind", F.when(F.spark_partition_id() >= 0, kind))


def with_source_rows(df: DataFrame, offsets_df: DataFrame) -> DataFrame:
    """``source_file`` and ``source_row`` (1-based data row in its file) from the row's position.

    ``offsets_df`` has one row per file split (``_src_file``, ``_src_block``, ``_first_pos``,
    ``_rows_before``, ``source_file``): positions are monotonically increasing ids (CSV) or row
    indexes (parquet), consecutive within a split, so row = pos - first + rows of earlier splits + 1.
    """
    return (df.join(F.broadcast(offsets_df), on=["_src_file", "_src_block"], how="left")
            .withColumn("source_row", (F.col("_src_pos") - F.col("_first_pos") + F.col("_rows_before") + 1)
                        .cast("bigint"))
            .drop("_first_pos", "_rows_before"))


def derived_order_id(source_file: Column, source_row: Column) -> Column:
    """``<file name>#<row>`` for exports without an order id (CDNOW)."""
    return F.concat(F.element_at(F.split(source_file, "/"), -1), F.lit("#"), source_row.cast("string"))


def build_orders(lines_df: DataFrame, cancels_df: DataFrame | None, *, grain: str, order_id_mapped: bool,
                 ingest_run_id: str, source_name: str = DEFAULT_SOURCE, order_id_prefix: str = "") -> DataFrame:
    """Accepted rows (with ``source_row``) plus applied cancellation lines -> ORDERS rows.
    ``order_id_prefix`` (``<source>:`` with several sources) keeps two systems' order numbers apart.

    Grain line: lines are summed per order; channel and source row are the first-seen line's,
    category is the category of the order's largest line (first seen on ties).
    """
    if grain == "line":
        first = F.struct("source_file", "source_row")
        largest = F.struct(F.col("gross_amount"), -F.col("source_row"))
        orders_df = lines_df.groupBy("_order_key").agg(
            F.min_by("order_id", first).alias("order_id"),
            F.min_by("customer_id", first).alias("customer_id"),
            F.min_by("order_ts", first).alias("order_ts"),
            F.min_by("order_date", first).alias("order_date"),
            F.sum("gross_amount").alias("gross_amount"),
            F.sum("line_cancelled_amount").alias("line_cancelled_amount"),
            F.bool_and("is_status_cancelled").alias("is_status_cancelled"),
            F.min_by("channel", first).alias("channel"),
            F.max_by("category", largest).alias("category"),
            F.min_by("currency", first).alias("currency"),
            F.min_by("extra", first).alias("extra"),
            F.min("source_file").alias("source_file"),
            F.min_by("source_row", first).alias("source_row"))
    else:
        orders_df = lines_df
    if cancels_df is not None:
        sums_df = (cancels_df.groupBy(F.col("_target_key").alias("_order_key"))
                   .agg(F.sum(F.abs("gross_amount")).alias("_lines_cancelled")))
        orders_df = orders_df.join(sums_df, on="_order_key", how="left")
    else:
        orders_df = orders_df.withColumn("_lines_cancelled", F.lit(None).cast("double"))
    cancelled = F.least(F.col("gross_amount"), F.greatest(F.lit(0.0), F.col("line_cancelled_amount")
                                                         + F.coalesce("_lines_cancelled", F.lit(0.0))))
    order_id = F.col("order_id") if order_id_mapped else derived_order_id(F.col("source_file"), F.col("source_row"))
    if order_id_prefix:
        order_id = F.concat(F.lit(order_id_prefix), order_id)
    return (orders_df
            .withColumn("order_id", order_id)
            .withColumn("source_name", F.lit(source_name))
            .withColumn("cancelled_amount", cancelled)
            # a free order (gross 0) is not "cancelled" just because 0 >= 0
            .withColumn("is_cancelled", F.col("is_status_cancelled")
                        | ((F.col("cancelled_amount") > 0) & (F.col("cancelled_amount") >= F.col("gross_amount"))))
            .withColumn("net_amount", F.col("gross_amount") - F.col("cancelled_amount"))
            .withColumn("ingest_run_id", F.lit(ingest_run_id))
            .withColumn("order_month", F.date_format("order_date", "yyyy-MM"))
            .select(*ORDERS.stored_columns))


def with_quarantine_text(df: DataFrame, rules: list, *, field_count: Column | None, line_key: str | None) -> DataFrame:
    """``detail`` (the message of the row's reason, see :func:`pipelines.validation.with_rule_details`)
    and, for a malformed row, its line as read in ``raw`` under ``line_key`` (its fields are shifted
    or cut). For the few rows kept after pass 2, not in the scan. ``field_count``: the fields of
    ``_line`` (an expression of it), for the ``malformed_row`` message."""
    out_df = (df.withColumn("_field_count", (field_count if field_count is not None else F.lit(None)).cast("int"))
              .transform(with_rule_details, rules).drop("_field_count"))
    if line_key is None:
        return out_df
    with_line = F.map_concat(F.col("raw"), F.create_map(F.lit(line_key), F.col("_line")))
    return out_df.withColumn("raw", F.when(F.col("_is_malformed") & F.col("raw").isNotNull(), with_line)
                             .otherwise(F.col("raw")))


def build_quarantine(rows_df: DataFrame, *, order_id_mapped: bool, ingest_run_id: str, run_date: date) -> DataFrame:
    """Quarantined rows (with ``source_row`` and ``raw``) -> ORDERS_QUARANTINE rows (their source:
    ``ingest_run_id`` -> ``ingest_runs.source_name``, and the file)."""
    order_id = (F.col("order_id") if order_id_mapped
                else derived_order_id(F.col("source_file"), F.col("source_row")))
    return (rows_df.filter(F.col("kind") == KIND_QUARANTINED)
            .withColumn("order_id", order_id)
            .withColumn("ingest_run_id", F.lit(ingest_run_id))
            .withColumn("run_date", F.lit(run_date))
            .select(*ORDERS_QUARANTINE.columns))


def order_content_hash(df: DataFrame) -> Column:
    """Hash of what an order says (not where or when it was read): equal hash = nothing to rewrite."""
    lineage = {"source_file", "source_row", "ingest_run_id"}
    cols = []
    for name in ORDERS.columns:
        if name in lineage:
            continue
        c = F.col(name)
        if isinstance(df.schema[name].dataType, T.MapType):
            c = F.array_sort(F.map_entries(c))  # maps are not hashable; sorted entries are
        cols.append(F.coalesce(c.try_cast("string"), F.lit("\u0000")))
    return F.xxhash64(*cols)


