"""Ingest: a client's order export -> the canonical ``orders`` table, bad rows -> ``orders_quarantine``.

Layout (STYLE.md): column functions and DataFrame transforms first (no I/O, no config reads: every
value comes in as an argument), then the source readers, then ONE stage runner, :func:`run_ingest`,
which reads the source, composes the transforms and writes through :class:`core.storage.Storage`.

How a run goes
1. Read the export with every column as text (CSV) or as stored (parquet/Delta); each row keeps its
   file and position, so ``source_row`` (1 = first data row after the header) is exact without
   collecting rows: ``_metadata.row_index`` for parquet, and for CSV ``monotonically_increasing_id``
   turned into per-file ordinals with one small count per file split. A CSV row with more or fewer
   fields than the header is flagged ``_is_malformed`` as it is read (Spark's corrupt-record column,
   which also gives its line; for whitespace exports, the word count): its values may sit in the
   wrong columns, so it is quarantined as ``malformed_row`` and takes no part in duplicate checks.
2. Map client columns onto canonical names (``source.columns``), parse amounts, timestamps (local
   text in ``source_timezone`` -> UTC instant; ``order_date`` is the day in the business zone) and
   the cancellation style.
3. Duplicates: one aggregation (pass 1) finds the order ids seen more than once. Exact duplicates
   (every mapped field equal) are counted and dropped, the first in read order kept; when the rows
   of an order id differ, all of them (copies included) are quarantined as
   ``duplicate_order_conflict``. At grain line, lines of one order must agree on customer and time.
4. Negative "cancellation lines" (UCI Online Retail style) are folded into an order: the one whose id
   is the line's id without the prefix (same customer) or, failing that, the customer's most recent
   order at or before the cancellation (UCI credit notes do not reference their invoice, so this is
   a documented heuristic). A line with no such order is quarantined. Lines are matched within one
   ingest only.
5. Rules from :mod:`pipelines.validation` give every row a kind (order, cancellation line applied,
   quarantined, exact duplicate). Pass 2 keeps only the rows that are not plain orders (few) and
   counts them in ONE aggregation (their messages are made from the kept rows, not in the scan);
   accepted = input - the rest, so
   ``input rows = accepted + cancellation lines applied + quarantined + exact duplicates`` holds by
   construction and is printed.
6. Above ``validation.max_rejected_share`` the quarantine and the ``ingest_runs`` row are written but
   not the orders (no half-written orders) and :class:`IngestRejectedError` says what to inspect.
   Otherwise (pass 3) orders are merged by ``order_id``: orders whose content is unchanged are not
   rewritten, so re-ingesting a file adds nothing; a changed order from a later export replaces the
   earlier one (corrections arrive as re-exports). Quarantine rows merge by (source_file, source_row).

New files only (``source.new_files_only``, the default): the files Spark lists for the source are
described by the file system (path, size, modification time; no data read) and those already in
``ingested_files`` unchanged are skipped, so a nightly run over a folder that gains one file a day
reads that file, not the whole history. A run with nothing new records an ``unchanged`` run and
writes nothing else. A Delta source is read whole when any of its files is new. Files are recorded
after the orders are committed (a crash in between only means they are read again: the merge
makes that harmless), and never for a rejected run, so they are retried once the cause is fixed.

Why three passes over the export and no cache of every row: on this engine's target machines
(2 cores) building an in-memory cache of all parsed rows cost more than parsing the export again,
and a window over all rows (a full sort) cost more than an aggregation of keys.
"""
from __future__ import annotations

import difflib
import glob
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Sequence
from urllib.parse import unquote

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import SourceConf, ValidationConf
from core.errors import UserError
from core.storage import Storage
from core.tables import IDENTITY_KEYS, INGEST_RUNS, INGESTED_FILES, ORDERS, ORDERS_QUARANTINE
from pipelines.identity import hashed_keys
from pipelines.validation import FUTURE_TIMESTAMP, REASON_CODES, order_rules, with_rule_details, with_rule_results

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Errors and the run summary
# --------------------------------------------------------------------------------------------
class IngestError(UserError, ValueError):
    """The source cannot be ingested as configured; the message says what to fix."""


class IngestRejectedError(IngestError):
    """Too many rows were quarantined; the quarantine and the run record were written, orders not."""

    def __init__(self, message: str, summary: "IngestSummary"):
        super().__init__(message)
        self.summary = summary


DEFAULT_SOURCE = "default"   # the name of a lone `source` (core.config.SourceConf.name)

# Row kinds: every input row is exactly one of these.
KIND_ORDER, KIND_CANCELLATION, KIND_QUARANTINED, KIND_DUPLICATE = (
    "order", "cancellation", "quarantined", "exact_duplicate")


@dataclass(frozen=True)
class IngestSummary:
    ingest_run_id: str
    source_name: str
    run_date: date
    source_path: str
    status: str                      # ok | rejected | unchanged (every file already ingested)
    input_rows: int
    accepted_rows: int               # accepted order rows (order lines when grain is line)
    cancellation_lines_applied: int
    quarantined_rows: int
    exact_duplicate_rows: int
    orders_accepted: int             # orders built from the accepted rows
    orders_written: int              # orders new or changed in `orders` (0 when rejected)
    reason_counts: dict[str, int] = field(default_factory=dict)
    max_rejected_share: float = 0.05
    source_files: int = 0
    cancellation_lines_by_heuristic: int = 0
    encoding_suspect_rows: int = 0
    skipped_files: int = 0           # already ingested with the same size and modification time
    future_rows_retried: int = 0     # rows quarantined as future by an earlier read, read again now that their day came
    value_counts: dict[str, dict[str, int]] = field(default_factory=dict)   # status/channel/category -> value -> rows
    unknown_statuses: tuple[str, ...] = ()   # never seen before, in neither cancelled_values nor live_values
    key_rows: int = 0                # matching keys (identity.match_on) hashed and new in identity_keys
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def rejected_share(self) -> float:
        return self.quarantined_rows / self.input_rows if self.input_rows else 0.0

    @property
    def is_reconciled(self) -> bool:
        return self.input_rows == (self.accepted_rows + self.cancellation_lines_applied
                                   + self.quarantined_rows + self.exact_duplicate_rows)

    def to_lines(self) -> list[str]:
        n = "{:,}".format
        if self.status == "unchanged":
            return [f"ingest {self.ingest_run_id} (unchanged) of {self._what}, run date {self.run_date}",
                    f"  no new files: all {self.skipped_files} file(s) were ingested before with the same size and "
                    "modification time (source.new_files_only; `cvseg ingest --all-files` reads them again)"]
        lines = [
            f"ingest {self.ingest_run_id} ({self.status}) of {self._what}, run date {self.run_date}",
            f"  input rows {n(self.input_rows)} from {self.source_files} file(s)"
            f" = accepted order rows {n(self.accepted_rows)}"
            f" + cancellation lines applied {n(self.cancellation_lines_applied)}"
            f" + quarantined {n(self.quarantined_rows)}"
            f" + exact duplicates dropped {n(self.exact_duplicate_rows)}"
            + ("" if self.is_reconciled else "  (DOES NOT RECONCILE: please report this)"),
            f"  orders: {n(self.orders_accepted)} accepted, {n(self.orders_written)} new or changed in `orders`",
            f"  rejected share {self.rejected_share:.1%} (limit validation.max_rejected_share="
            f"{self.max_rejected_share:.0%})",
        ]
        if self.skipped_files:
            lines.append(f"  {self.skipped_files} file(s) ingested before unchanged were skipped (source.new_files_only)")
        for column, counts in self.value_counts.items():
            shown = ", ".join(f"{value} {n(count)}" for value, count in list(counts.items())[:8])
            more = f" (+{len(counts) - 8} more)" if len(counts) > 8 else ""
            lines.append(f"  {column} values: {shown}{more}")
        if self.unknown_statuses:
            lines.append(f"  warning: status value(s) {', '.join(repr(v) for v in self.unknown_statuses)} never seen "
                         "before are counted as live orders (not in source.cancellation.cancelled_values); list "
                         "them in cancelled_values or live_values")
        if self.future_rows_retried:
            lines.append(f"  {n(self.future_rows_retried)} row(s) quarantined as future_timestamp by an earlier ingest "
                         f"were read again (their order day has come): their file(s) are among those read")
        if self.cancellation_lines_by_heuristic:
            lines.append(f"  {n(self.cancellation_lines_by_heuristic)} cancellation line(s) matched no order id and "
                         "were applied to the customer's latest earlier order")
        if self.reason_counts:
            lines.append("  quarantined by reason:")
            for code, count in sorted(self.reason_counts.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    {code:<28} {n(count)}")
        if self.encoding_suspect_rows:
            lines.append(f"  warning: {n(self.encoding_suspect_rows)} row(s) hold undecodable characters (\ufffd); "
                         "check source.csv.encoding (cp932 for most Japanese back-office exports)")
        if self.key_rows:
            lines.append(f"  {n(self.key_rows)} new matching key(s) hashed into identity_keys (identity.match_on)")
        if self.quarantined_rows:
            lines.append("  inspect with `cvseg show orders_quarantine`")
        return lines

    @property
    def _what(self) -> str:
        return self.source_path if self.source_name == DEFAULT_SOURCE else f"source {self.source_name} ({self.source_path})"

    def __str__(self) -> str:
        return "\n".join(self.to_lines())


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


def _text(col: Column, dtype: T.DataType) -> Column:
    return col if isinstance(dtype, T.StringType) else col.try_cast("string")


def _amount_value(col: Column, dtype: T.DataType) -> Column:
    if isinstance(dtype, T.NullType):
        return F.lit(None).cast("double")
    if isinstance(dtype, T.NumericType):
        return col.try_cast("double")
    return parse_amount(_text(col, dtype))


def _instant(col: Column, dtype: T.DataType, formats: Sequence[str], tz: str) -> Column:
    """Order timestamp of any source type -> UTC instant."""
    if isinstance(dtype, T.TimestampType):
        return col                                         # already an instant
    if isinstance(dtype, (T.TimestampNTZType, T.DateType)):
        return F.to_utc_timestamp(col.cast("timestamp"), tz)  # wall time in the source zone
    if isinstance(dtype, T.NullType):
        return F.lit(None).cast("timestamp")
    return parse_timestamp(_text(col, dtype), formats, tz)


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
            text = F.trim(_text(F.col(c), dtype))
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
            pairs += [F.lit(n), _text(F.col(c), df.schema[c].dataType)]
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
        return _text(F.col(name), types[name])

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
            .withColumn("order_ts_text", _text(F.col("order_ts_in"), ts_type))
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


def source_stats(df: DataFrame, *, grain: str, order_id_mapped: bool, profile: Sequence[str] = ()) -> DataFrame:
    """One aggregation (grouping sets) over the keyed rows giving
    * per file split (``_set`` = split): its rows and first position, for exact row numbers;
    * per order id seen more than once (``order``): rows, min/max header hash, first position;
    * at grain line, per (order id, content) seen more than once (``line``): the exact copies;
    * per combination of the ``profile`` columns' values (``profile``: status, channel, category):
      its rows, so ingest can say which values it saw (a few hundred combinations at most).
    Only those rows are kept, so the result is small unless the export is mostly duplicates."""
    # plain longs, not structs: min over a struct would turn the hash aggregation into a sort
    first = [F.min("_src_key").alias("_first"), F.min("_src_pos").alias("_first_pos")]
    profile = list(profile)
    if not order_id_mapped and not profile:
        return (df.groupBy("_src_file", "_src_block")
                .agg(F.count(F.lit(1)).alias("_n"), *first)
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
                .agg(F.count(F.lit(1)).alias("_n"), *hashes, *first, F.grouping_id().alias("_gid")))
    # grouping_id sets a bit for every grouping column NOT in the set (first column = highest bit)
    width = len(cols)
    gid = {name: sum(1 << (width - 1 - cols.index(c)) for c in cols if c not in members)
           for name, members in sets.items()}
    kind = F.lit(None).cast("string")
    for name in sets:
        kind = F.when(F.col("_gid") == gid[name], F.lit(name)).otherwise(kind)
    keep = (F.col("_set") == SET_SPLIT) | (F.col("_set") == SET_PROFILE)
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


# --------------------------------------------------------------------------------------------
# Reading the source (edge: I/O)
# --------------------------------------------------------------------------------------------
# Exports labelled Shift_JIS nearly always carry the Windows extensions (①, ㈱, 髙) and Java's
# "cp932" is IBM-942, not the Windows code page: read all of them as windows-31j.
_JAVA_CHARSETS = {"cp932": "windows-31j", "ms932": "windows-31j", "windows-31j": "windows-31j",
                  "shift_jis": "windows-31j", "shift-jis": "windows-31j", "sjis": "windows-31j",
                  "utf8": "UTF-8", "utf-8-sig": "UTF-8"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_LINE_SEP_FREE = "\u0001"   # a delimiter that never occurs: one column holding the whole line


@dataclass
class _Source:
    df: DataFrame                # _s0.._sN, _src_file, _src_block, _src_pos, _src_key, _is_malformed,
                                 # _line (see _with_positions)
    names: list[str]             # the source column names, in order
    exact_positions: bool        # True: _src_pos is the row index in the file (parquet)
    # CSV only, for the malformed_row message: where the expected field count comes from ("the
    # header", "source.csv.column_names") and the fields of a line (an expression of ``_line``,
    # evaluated on the few malformed rows only).
    names_from: str | None = None
    field_count: Column | None = None


_SPARK_CHARSETS = {"iso-8859-1", "us-ascii", "utf-16", "utf-16be", "utf-16le", "utf-32", "utf-8"}
_LEGACY_CHARSETS = "spark.sql.legacy.javaCharsets"


def _java_charset(spark: SparkSession, encoding: str) -> str:
    name = _JAVA_CHARSETS.get(encoding.strip().lower(), encoding.strip())
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - asking the JVM which charsets it knows
    try:
        ok = bool(jvm.java.nio.charset.Charset.isSupported(name))
    except Exception:  # noqa: BLE001 - illegal charset names raise
        ok = False
    if not ok:
        raise IngestError(f"source.csv.encoding: unknown encoding {encoding!r}; use utf-8, cp932 or shift_jis")
    return name


def _check_exists(path: str | list[str]) -> None:
    """Fail early and clearly for local paths; remote paths are checked by Spark (PATH_NOT_FOUND)."""
    if isinstance(path, list):   # files just listed by list_source_files
        return
    local = path[len("file:"):] if path.startswith("file:") else path
    if _SCHEME.match(path) and not path.startswith("file:"):
        return
    if any(ch in local for ch in "*?["):
        if not glob.glob(local):
            raise IngestError(f"no file matches the source path {path}; check source.path or --path")
        return
    if "{" not in local and not os.path.exists(local):
        raise IngestError(f"the source file or folder {path} does not exist; check source.path or --path")


def _with_positions(df: DataFrame, names: list[str], exact: bool, *, columns: Sequence[str] | None = None,
                    malformed: Column | None = None, line: Column | None = None,
                    names_from: str | None = None, field_count: Column | None = None) -> _Source:
    """Rename source columns to _s0.._sN and add the row's file and position.

    ``columns``: the columns of ``df`` holding the source columns (default: ``names``). CSV
    readers also pass ``malformed`` (the row's field count is not the expected one) and ``line``
    (the row as read); they become ``_is_malformed`` (never null; False for parquet/Delta) and
    ``_line`` (null unless the row is malformed). On a raw CSV scan both come from Spark's
    corrupt-record column: a query reading only them (no source column) is refused by Spark.
    ``names_from`` and ``field_count`` are kept on the :class:`_Source` for messages.
    """
    pos = F.col("_metadata.row_index") if exact else F.monotonically_increasing_id()
    block = F.lit(0).cast("bigint") if exact else F.col("_metadata.file_block_start")
    file_path = F.col("_metadata.file_path")   # a URI; decoded once per split on the driver
    quoted = ["`" + n.replace("`", "``") + "`" for n in (columns if columns is not None else names)]
    is_malformed = F.lit(False) if malformed is None else F.coalesce(malformed, F.lit(False))
    out = df.select(*[F.col(q).alias(source_col(i)) for i, q in enumerate(quoted)],
                    file_path.alias("_src_file"), block.alias("_src_block"), pos.alias("_src_pos"),
                    is_malformed.alias("_is_malformed"),
                    (F.when(is_malformed, line) if line is not None else F.lit(None)).cast("string").alias("_line"))
    key = F.monotonically_increasing_id() if exact else F.col("_src_pos")   # CSV: the position is the id
    return _Source(out.withColumn("_src_key", key), list(names), exact, names_from, field_count)


def _regex_literal(text: str) -> str:
    """``text`` as a Java regex matching it literally (every non-alphanumeric escaped)."""
    return "".join(c if c.isalnum() else "\\" + c for c in text)


def _delimited_field_count(line: Column, delimiter: str, quote: str) -> Column:
    """Fields of a delimited line: delimiters outside quoted parts + 1 (a backslash escape is
    honoured inside quotes; RFC 4180 doubled quotes split into two adjacent quoted parts, which
    count the same). For the message on malformed rows, not for detection."""
    if quote:
        q = _regex_literal(quote)
        line = F.regexp_replace(line, f"{q}(?:[^{q}\\\\]|\\\\.)*{q}", "")
    return F.size(F.split(line, _regex_literal(delimiter), -1))


def _unused_name(base: str, taken: Sequence[str]) -> str:
    """``base``, or ``base`` with more leading underscores, not in ``taken`` (in any case)."""
    lowered = {t.lower() for t in taken}
    name = base
    while name.lower() in lowered:
        name = "_" + name
    return name


def _read_csv(spark: SparkSession, path: str, source: SourceConf) -> _Source:
    csv = source.csv
    encoding = _java_charset(spark, csv.encoding)
    reader = (spark.read.option("encoding", encoding).option("mode", "PERMISSIVE")
              .option("quote", csv.quote).option("escape", csv.escape).option("multiLine", "false"))
    if csv.delimiter == "whitespace":
        # Fixed-width style exports (CDNOW): read each line whole, split on runs of blanks.
        line_df = (reader.option("sep", _LINE_SEP_FREE).option("quote", "").option("header", csv.header)
                   .option("enforceSchema", "true").schema("line string").csv(path))
        names = list(csv.column_names)
        if not names:
            if not csv.header:
                raise IngestError("source.csv.column_names is empty: a file without a header needs the column "
                                  "names, e.g. column_names: [customer_id, order_date, amount]")
            first = (reader.option("sep", _LINE_SEP_FREE).option("quote", "").option("header", "false")
                     .schema("line string").csv(path).limit(1).collect())
            names = first[0]["line"].split() if first and first[0]["line"] else []
            if not names:
                raise IngestError(f"{path}: the file is empty (no header, no data rows)")
        def words(line: Column) -> Column:
            return F.split(F.regexp_replace(line, r"^\s+|\s+$", ""), r"\s+")

        def word_count(line: Column) -> Column:
            return F.when(line.rlike(r"^\s*$"), F.lit(0)).otherwise(F.size(words(line)))

        fields = words(F.col("line"))
        # a line with more or fewer words than columns is malformed (a blank in a value, a cut
        # line): the words cannot be matched to columns. Same split as the values, no extra parse.
        split_df = line_df.select("*", word_count(F.col("line")).alias("_words"),
                                  *[F.try_element_at(fields, F.lit(i + 1)).alias(f"_w{i}")
                                    for i in range(len(names))])
        return _with_positions(split_df, names, exact=False, columns=[f"_w{i}" for i in range(len(names))],
                               malformed=F.col("_words") != len(names), line=F.col("line"),
                               names_from="source.csv.column_names" if csv.column_names else "the header",
                               field_count=word_count(F.col("_line")))
    delimiter = {"tab": "\t", "\\t": "\t"}.get(csv.delimiter, csv.delimiter)
    reader = reader.option("sep", delimiter)
    if csv.column_names:
        names = list(csv.column_names)
        header_options = {"header": csv.header, "enforceSchema": "true"}
        names_from = "source.csv.column_names"
    else:
        # Every column is read as text (bad values stay visible). The names are what Spark makes
        # of the first line (it reads only that line); enforceSchema=false makes Spark check every
        # file's header against them.
        names = list(reader.option("header", csv.header).option("enforceSchema", "false").csv(path).columns)
        header_options = {"header": csv.header, "enforceSchema": "false"}
        names_from = "the header" if csv.header else "the first line"
    if not names:
        raise IngestError(f"{path}: the file is empty (no header, no data rows)")
    # Spark flags a row whose field count differs from the schema (too many: the extra fields
    # are dropped; too few: the missing ones are null) only when the schema has a corrupt-record
    # column, which then holds the line; the column is null on well-formed rows.
    corrupt = _unused_name("_corrupt_record", names)
    schema = T.StructType([T.StructField(n, T.StringType()) for n in names]
                          + [T.StructField(corrupt, T.StringType())])
    df = (reader.options(**header_options).option("columnNameOfCorruptRecord", corrupt)
          .schema(schema).csv(path))
    return _with_positions(df, names, exact=False, malformed=F.col(corrupt).isNotNull(), line=F.col(corrupt),
                           names_from=names_from,
                           field_count=_delimited_field_count(F.col("_line"), delimiter, csv.quote))


def _read_parquet_like(spark: SparkSession, path: str | list[str], fmt: str) -> _Source:
    if fmt == "delta":
        from core.spark import has_delta_classes

        if has_delta_classes(spark):
            df = spark.read.format("delta").load(path)
            try:
                df.select("_metadata.row_index").schema  # noqa: B018 - probe: analysis only
                return _with_positions(df, list(df.columns), exact=True)
            except Exception:  # noqa: BLE001 - older Delta: fall back to split ordinals
                return _with_positions(df, list(df.columns), exact=False)
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            uris = DeltaTable(path).file_uris()
        except TableNotFoundError:
            raise IngestError(f"{path} is not a Delta table (no _delta_log); check source.path "
                              "or source.format") from None
        if not uris:
            raise IngestError(f"{path}: the Delta table has no data files (no data rows)")
        df = _with_nanosecond_timestamps(spark.read.parquet(*uris))
    else:
        df = _with_nanosecond_timestamps(spark.read.parquet(*([path] if isinstance(path, str) else path)))
    return _with_positions(df, list(df.columns), exact=True)


def _with_nanosecond_timestamps(df: DataFrame) -> DataFrame:
    """Nanosecond parquet timestamps (what pandas 2 writes) as Spark timestamps (microseconds).

    Spark 4.0 cannot read TIMESTAMP(NANOS); the session reads them as long nanoseconds
    (``spark.sql.legacy.parquet.nanosAsLong``, set by :func:`core.spark.build_spark`), and the
    columns the first file's footer declares as such are converted here: naive ones to
    TIMESTAMP_NTZ (wall time, as microsecond naive timestamps are read), zoned ones to TIMESTAMP.
    Only one footer is read, on the driver.
    """
    nanos = _nanosecond_timestamp_columns(df)
    if not nanos:
        return df
    columns = []
    for name in df.columns:
        if name not in nanos or not isinstance(df.schema[name].dataType, T.LongType):
            columns.append(F.col(name))
            continue
        quoted = f"`{name.replace('`', '``')}`"
        # floor division: nanoseconds -> microseconds, also before 1970
        micros = F.expr(f"timestamp_micros({quoted} div 1000 - IF({quoted} % 1000 < 0, 1, 0))")
        columns.append((micros.cast(T.TimestampNTZType()) if nanos[name] is None else micros).alias(name))
    return df.select(*columns)


def _nanosecond_timestamp_columns(df: DataFrame) -> dict[str, str | None]:
    """{column: time zone or None} of the nanosecond timestamps in the first input file's footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    if not any(isinstance(f.dataType, T.LongType) for f in df.schema.fields):
        return {}
    files = df.inputFiles()
    if not files:
        return {}
    uri = files[0]
    if _SCHEME.match(uri) and not uri.startswith("file:"):
        # s3a://, s3:// (EMRFS), dbfs:/ ...: the footer read through Spark's own file system, with
        # the session's endpoint and credentials (pyarrow would know neither)
        try:
            return _nanosecond_columns_from_jvm(df.sparkSession, uri)
        except Exception as exc:  # noqa: BLE001 - py4j raises several types
            log.warning("could not read the parquet footer of %s to find nanosecond timestamps (%s); "
                        "such columns stay long integers", uri, _first_line(exc))
            return {}
    try:
        filesystem, file_path = fs.FileSystem.from_uri(uri)
        schema = pq.read_schema(unquote(file_path), filesystem=filesystem)
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("could not read the parquet footer of %s to find nanosecond timestamps (%s); "
                    "such columns stay long integers", uri, exc)
        return {}
    return {field.name: field.type.tz for field in schema
            if pa.types.is_timestamp(field.type) and field.type.unit == "ns"}


def _nanosecond_columns_from_jvm(spark: SparkSession, uri: str) -> dict[str, str | None]:
    """As :func:`_nanosecond_timestamp_columns` for a remote file: parquet-hadoop's footer reader
    on Hadoop's file system. UTC-adjusted nanosecond timestamps map to "UTC", local ones to None."""
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - the footer through the session's file systems
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))
    reader = jvm.org.apache.parquet.hadoop.ParquetFileReader.open(
        jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(path, hadoop_conf))
    try:
        fields = reader.getFooter().getFileMetaData().getSchema().getFields()
    finally:
        reader.close()
    found: dict[str, str | None] = {}
    for field in fields:
        annotation = field.getLogicalTypeAnnotation()
        if (annotation is not None and annotation.getClass().getSimpleName() == "TimestampLogicalTypeAnnotation"
                and annotation.getUnit().toString() == "NANOS"):
            found[field.getName()] = "UTC" if annotation.isAdjustedToUTC() else None
    return found


def read_source(spark: SparkSession, path: str | list[str], source: SourceConf) -> _Source:
    """Open the export lazily (only the header or footers are read here); ``path`` is the configured
    file, folder or glob, or a list of files (the new ones, :func:`list_source_files`)."""
    from pyspark.errors import AnalysisException

    _check_exists(path)
    try:
        if source.format == "csv":
            return _read_csv(spark, path, source)
        return _read_parquet_like(spark, path, source.format)
    except AnalysisException as exc:
        condition = exc.getCondition() or ""
        if condition == "PATH_NOT_FOUND":
            raise IngestError(f"the source file or folder {path} does not exist; check source.path "
                              "or --path") from None
        if condition in ("UNABLE_TO_INFER_SCHEMA",):
            raise IngestError(f"{path}: no data to read (empty file or folder)") from None
        raise IngestError(f"cannot read {path} as {source.format}: {_first_line(exc)}") from exc


@dataclass(frozen=True)
class SourceFile:
    """One file of the export as the file system describes it."""
    uri: str                 # what the reader is given (a decoded Hadoop path)
    path: str                # as stored in orders.source_file
    size: int
    modified_ms: int         # modification time, epoch milliseconds

    @property
    def key(self) -> tuple[str, int, int]:
        """A file is "already ingested" when this matches: same path, size and modification time."""
        return self.path, self.size, self.modified_ms


def list_source_files(spark: SparkSession, src: _Source) -> list[SourceFile] | None:
    """The files the source reader reads (Spark's own listing), with size and modification time:
    file-system metadata only, no data. None when the session has no JVM gateway (Spark Connect),
    where the files cannot be described and every file is read."""
    try:
        jvm = spark.sparkContext._jvm  # noqa: SLF001 - Hadoop FileSystem status of each file
        hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    except Exception:  # noqa: BLE001 - Spark Connect has no sparkContext
        log.warning("cannot list source files on this session (no JVM gateway): every file is read")
        return None
    files = []
    for uri in src.df.inputFiles():
        hadoop_path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))
        status = hadoop_path.getFileSystem(hadoop_conf).getFileStatus(hadoop_path)
        name = status.getPath().toString()
        files.append(SourceFile(name, _local_path(name), int(status.getLen()), int(status.getModificationTime())))
    return sorted(files, key=lambda f: f.path)


def ingested_file_keys(storage: Storage) -> set[tuple[str, int, int]]:
    """(path, size, modification ms) of every file committed before: one small row per file."""
    if not storage.exists(INGESTED_FILES.name):
        return set()
    rows = storage.read(INGESTED_FILES.name).select(
        "source_file", "file_size", F.unix_millis("modified_at").alias("modified_ms")).collect()
    return {(r["source_file"], int(r["file_size"]), int(r["modified_ms"])) for r in rows}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _action_error(exc: Exception, path: str, source: SourceConf) -> IngestError:
    """Turn a failure while scanning the data into a message that says what to fix."""
    text = str(exc)
    if "CSV header does not conform to the schema" in text or "does not conform to the schema" in text:
        found = re.search(r"CSV file: (\S+)", text)
        return IngestError(
            f"a file under {path} has a different header from the first file"
            + (f" ({found.group(1)})" if found else "")
            + "; every file of one ingest must have the same columns. Detail: "
            + " ".join(text.split("\n")[0:3])[:600])
    if "MalformedInput" in text or "UnmappableCharacter" in text or "CharacterCodingException" in text:
        return IngestError(f"{path}: the file cannot be decoded as {source.csv.encoding}; try "
                           "source.csv.encoding: cp932 (Shift_JIS exports) or utf-8")
    if "INVALID_DATETIME_PATTERN" in text or "DATETIME_PATTERN" in text or "Illegal pattern" in text:
        return IngestError(f"source.timestamp_format or source.timestamp_formats_extra is not a valid Spark "
                           f"datetime pattern (e.g. yyyy/MM/dd HH:mm:ss): {_first_line(exc)}")
    if "FileNotFoundException" in text or "PATH_NOT_FOUND" in text:
        return IngestError(f"a file under {path} disappeared while it was read: {_first_line(exc)}")
    return IngestError(f"reading {path} failed: {_first_line(exc)}")


def check_mapping(names: Sequence[str], source: SourceConf, path: str) -> None:
    """Every mapped column must be in the header; otherwise say which, what was found, and what is close."""
    mapping = source.columns.model_dump()
    missing = {canon: col for canon, col in mapping.items() if col is not None and col not in names}
    if not missing:
        return
    lines = [f"{path}: the header does not contain the mapped column(s) "
             + ", ".join(f"{col!r} (source.columns.{canon})" for canon, col in missing.items()) + "."]
    lines.append("  columns found: " + ", ".join(repr(n) for n in names))
    for canon, col in missing.items():
        close = difflib.get_close_matches(col, list(names), n=3, cutoff=0.5)
        if close:
            lines.append(f"  did you mean {' or '.join(repr(c) for c in close)} for source.columns.{canon}?")
    lines.append("  change source.columns.<field> in your conf to the export's column names.")
    if any("\ufffd" in n for n in names):
        lines.append("  the header holds undecodable characters: the file is probably not "
                     f"{source.csv.encoding}; try source.csv.encoding: cp932")
    if len(names) == 1 and any(d in names[0] for d in (",", ";", "\t", "|")):
        lines.append(f"  only one column was found: is source.csv.delimiter ({source.csv.delimiter!r}) right?")
    raise IngestError("\n".join(lines))


def check_conf(source: SourceConf) -> None:
    """Mapping combinations that cannot work, named by their conf key."""
    cols = source.columns
    if cols.gross_amount is None and not (cols.quantity and cols.unit_price):
        raise IngestError("map source.columns.gross_amount, or both source.columns.quantity and "
                          "source.columns.unit_price (gross = quantity x unit_price)")
    if source.grain == "line" and cols.order_id is None:
        raise IngestError("source.grain: line needs source.columns.order_id (lines are summed per order)")
    style = source.cancellation.style
    if style == "status" and (cols.status is None or not source.cancellation.cancelled_values):
        raise IngestError("source.cancellation.style: status needs source.columns.status and "
                          "source.cancellation.cancelled_values (e.g. [キャンセル])")
    if style == "negative_lines" and source.cancellation.order_id_prefix and cols.order_id is None:
        raise IngestError("source.cancellation.order_id_prefix needs source.columns.order_id")
    if source.allowed_currencies and cols.currency is None:
        raise IngestError("source.allowed_currencies is set but source.columns.currency is not mapped")
    for fmt in (source.timestamp_format, *source.timestamp_formats_extra):
        if "%" in fmt:
            raise IngestError(f"source.timestamp_format {fmt!r}: use Spark datetime patterns such as "
                              "yyyy/MM/dd HH:mm:ss, not strftime codes")


# --------------------------------------------------------------------------------------------
# The stage runner
# --------------------------------------------------------------------------------------------
LOCAL_STATS_MAX_ROWS = 50_000   # split + duplicate statistics up to this size go through the driver
# What is kept of the rows that are not plain orders (quarantined, copies, cancellation lines),
# with what the rules' details read (``detail`` is made from them once these few rows are cached).
DETAIL_INPUTS = ("order_ts_text", "order_date", "amount_text", "currency", "conflict_detail", "_is_malformed",
                 "_line")
OTHER_COLUMNS = ("_order_key", "_target_key", "_match", "_is_encoding_suspect", "kind", "reason", "reasons",
                 "raw", "order_id", "customer_id", "order_ts", "gross_amount", "is_cancellation_line",
                 "_src_key", *POSITION, *DETAIL_INPUTS)


def read_day(validation: ValidationConf, business_tz: str) -> date:
    """The day "future" is judged against: ``validation.future_cutoff`` or today in the business
    time zone (when the file is read), never an analysis's as-of date."""
    from zoneinfo import ZoneInfo

    return validation.future_cutoff or datetime.now(ZoneInfo(business_tz)).date()


@dataclass(frozen=True)
class KeyReading:
    """Read the matching keys of identity.match_on at ingest, hashed with ``hmac_key``."""
    match_on: tuple[str, ...]
    hmac_key: bytes = field(repr=False)
    phone_country_code: str = "81"


def run_ingest(spark: SparkSession, storage: Storage, source: SourceConf, validation: ValidationConf,
               business_tz: str, run_date: date, path: str | None = None, *,
               run_id: str | None = None, order_id_prefix: str = "",
               keys: KeyReading | None = None) -> IngestSummary:
    """Ingest ``path`` (default ``source.path``): orders merged by order_id, bad rows quarantined,
    one ``ingest_runs`` row. Raises :class:`IngestError` for unusable input and
    :class:`IngestRejectedError` when the rejected share is above the threshold.
    ``order_id_prefix``: prepended to every order id (``<source>:`` with several sources);
    ``keys``: the source's e-mail / phone columns are hashed into ``identity_keys``."""
    # Spark 4 reads only a short list of charsets unless the legacy flag is on; windows-31j
    # (cp932) needs it for the duration of the run.
    needs_flag = (source.format == "csv"
                  and _JAVA_CHARSETS.get(source.csv.encoding.strip().lower(), source.csv.encoding).lower()
                  not in _SPARK_CHARSETS)
    previous = spark.conf.get(_LEGACY_CHARSETS, "false")
    if needs_flag:
        spark.conf.set(_LEGACY_CHARSETS, "true")
    try:
        return _run_ingest(spark, storage, source, validation, business_tz, run_date, path, run_id,
                           order_id_prefix, keys)
    finally:
        if needs_flag:
            spark.conf.set(_LEGACY_CHARSETS, previous)


def _run_ingest(spark: SparkSession, storage: Storage, source: SourceConf, validation: ValidationConf,
                business_tz: str, run_date: date, path: str | None, run_id: str | None,
                order_id_prefix: str, keys: KeyReading | None) -> IngestSummary:
    """Pass 1: keys only (rows per file split, order ids seen twice); pass 2: every row
    classified, the few that are not plain orders kept and counted; pass 3: accepted orders written."""
    started = datetime.now(timezone.utc)
    clock = _Clock(log)
    path = path or source.path
    if not path:
        raise IngestError("no source path: set source.path in the conf or pass --path")
    if spark.conf.get("spark.sql.session.timeZone") != "UTC":
        raise IngestError("the Spark session must run in UTC (core.spark.build_spark sets it)")
    check_conf(source)
    run_id = run_id or f"ingest-{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    mapping = source.columns.model_dump()
    order_id_mapped = mapping["order_id"] is not None
    # e-mail / phone: never copied to a table, a log or the quarantine in clear (only hashed keys)
    private_columns = {mapping[k] for k in KEY_FIELDS if mapping.get(k)}
    key_columns = {k: mapping[k] for k in (keys.match_on if keys else ()) if mapping.get(k)}
    negative_lines = source.cancellation.style == "negative_lines"
    src = read_source(spark, path, source)
    listed = list_source_files(spark, src)
    new_files, skipped, known = listed, 0, set()
    # rows quarantined as future by an earlier read whose day has come: their files are read again
    quarantined_before = _quarantined_files(storage, run_date + timedelta(days=validation.future_tolerance_days))
    due = {file: count for file, count in quarantined_before.items() if count}
    if listed is not None and source.new_files_only:
        known = ingested_file_keys(storage)
        new_files = [f for f in listed if f.key not in known or f.path in due]
        skipped = len(listed) - len(new_files)
        if listed and not new_files:
            summary = IngestSummary(
                ingest_run_id=run_id, source_name=source.name, run_date=run_date, source_path=path,
                status="unchanged", input_rows=0,
                accepted_rows=0, cancellation_lines_applied=0, quarantined_rows=0, exact_duplicate_rows=0,
                orders_accepted=0, orders_written=0, max_rejected_share=validation.max_rejected_share,
                skipped_files=skipped, started_at=started, finished_at=datetime.now(timezone.utc))
            _append_run(spark, storage, summary)
            log.info("%s", summary)
            return summary
        # A Delta source is read whole (its log, not its files, says which rows are live).
        if skipped and source.format != "delta":
            src = read_source(spark, [f.uri for f in new_files], source)
    # every file read holds its rows; without a listing (Spark Connect) every due row is read again
    retried = sum(due.get(f.path, 0) for f in new_files) if new_files is not None else sum(due.values())
    check_mapping(src.names, source, path)
    clock.lap("open source")

    keyed_df = (map_columns(src.df, src.names, mapping, keep_extra=source.extra_columns == "keep")
                .transform(with_parsed_fields, timestamp_formats=(source.timestamp_format,
                                                                  *source.timestamp_formats_extra),
                           source_tz=source.source_timezone, business_tz=business_tz,
                           gross_from_lines=mapping["gross_amount"] is None)
                .transform(with_cancellation_flags, style=source.cancellation.style,
                           cancelled_values=source.cancellation.cancelled_values,
                           order_id_prefix=source.cancellation.order_id_prefix)
                .transform(with_row_keys, grain=source.grain, order_id_mapped=order_id_mapped))
    if source.channel is not None:   # a source without a channel column (store POS): its fixed channel
        keyed_df = keyed_df.withColumn("channel", F.lit(source.channel))
    rules = order_rules(run_date=run_date, future_tolerance_days=validation.future_tolerance_days,
                        allowed_currencies=source.allowed_currencies, order_id_mapped=order_id_mapped,
                        expected_fields=len(src.names), expected_from=src.names_from or "the header")
    row_rules = [r for r in rules if r.code != "cancellation_without_order"]
    raw_map = F.create_map(*[x for i, n in enumerate(src.names) if n not in private_columns
                             for x in (F.lit(n), _text(F.col(source_col(i)), src.df.schema[source_col(i)].dataType))])
    is_suspect = F.concat_ws("", *TEXT_FIELDS).contains("\ufffd")   # mis-decoded text (wrong encoding)

    cached: list[DataFrame] = []
    try:
        # Pass 1: keys only. The statistics are small on any sane export: bring them to the
        # driver, so later passes join a local table (no broadcast job per pass) or nothing at all.
        profiled = [c for c in PROFILED if mapping.get(c)]
        stats_df = source_stats(keyed_df, grain=source.grain, order_id_mapped=order_id_mapped, profile=profiled) \
            .persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(stats_df)
        try:
            stats = stats_df.limit(LOCAL_STATS_MAX_ROWS + 1).collect()
            if len(stats) > LOCAL_STATS_MAX_ROWS:
                splits = stats_df.filter(F.col("_set") == SET_SPLIT).collect()   # one row per file split
        except Exception as exc:  # noqa: BLE001 - Spark wraps read errors in many classes
            raise _action_error(exc, path, source) from exc
        if len(stats) <= LOCAL_STATS_MAX_ROWS:
            splits = [r for r in stats if r["_set"] == SET_SPLIT]
            profile_rows = [r for r in stats if r["_set"] == SET_PROFILE]
            problems = [r for r in stats if r["_set"] not in (SET_SPLIT, SET_PROFILE)]
            problems_df = spark.createDataFrame(problems, stats_df.schema) if problems else None
            broadcast = True
        else:
            profile_rows = stats_df.filter(F.col("_set") == SET_PROFILE).limit(LOCAL_STATS_MAX_ROWS).collect()
            if len(profile_rows) == LOCAL_STATS_MAX_ROWS:
                log.warning("%s: more than %d combinations of %s values; their counts are partial",
                            path, LOCAL_STATS_MAX_ROWS, "/".join(profiled))
            problems_df, broadcast = stats_df, False
        total = sum(r["_n"] for r in splits)
        if total == 0:
            raise IngestError(f"{path}: no data rows (the file is empty or holds only a header)")
        value_counts = value_profile(profile_rows, profiled)
        unknown_statuses = _unknown_statuses(storage, source, value_counts.get("status", {}))
        if unknown_statuses and validation.unknown_status == "error":
            listed_values = ", ".join(f"{v!r} ({value_counts['status'][v]:,} rows)" for v in unknown_statuses)
            raise IngestError(
                f"{path}: status value(s) {listed_values} are in neither source.cancellation.cancelled_values "
                f"{list(source.cancellation.cancelled_values)} nor live_values {list(source.cancellation.live_values)}"
                " and were never seen before; add each to one of them (validation.unknown_status: error)")
        if unknown_statuses:
            log.warning("%s: status value(s) %s never seen before are counted as live orders; list them in "
                        "source.cancellation.cancelled_values or live_values", path, list(unknown_statuses))
        offsets_df = _offsets_frame(spark, splits)
        flagged_df = keyed_df.transform(with_duplicate_flags, problems_df, grain=source.grain, broadcast=broadcast)
        clock.lap("pass 1: splits+dups")

        # Pass 2: classify every row by the row rules; keep the few that are not plain orders
        # (cancellation lines included, with their raw text in case they end up quarantined).
        # No ``detail`` here: its message code, evaluated in the scan, made the generated method
        # too big for the JIT (measured 2x slower); it is added on the cached rows below.
        kinds_df = (flagged_df.withColumn("has_target_order", F.lit(True))
                    .transform(with_rule_results, row_rules, details=False).transform(with_row_kind))
        others_df = (kinds_df.withColumn("_is_encoding_suspect", is_suspect)
                     .filter((F.col("kind") != KIND_ORDER) | F.col("_is_encoding_suspect"))
                     .withColumn("raw", F.when(F.col("kind").isin(KIND_QUARANTINED, KIND_CANCELLATION), raw_map))
                     .withColumn("_target_key", F.lit(None).cast("string"))
                     .withColumn("_match", F.lit(None).cast("string"))
                     .select(*OTHER_COLUMNS)
                     .persist(StorageLevel.MEMORY_AND_DISK))
        cached.append(others_df)
        if negative_lines:
            # Cancellation lines against the accepted orders: a narrow pass over the orders only.
            orders_key_df = (kinds_df.filter(F.col("kind") == KIND_ORDER)
                             .groupBy("_order_key", "customer_id")   # line grain: one row per order
                             .agg(F.min("order_id").alias("order_id"), F.min("order_ts").alias("order_ts"))
                             .persist(StorageLevel.MEMORY_AND_DISK))
            cached.append(orders_key_df)
            without_order = [r for r in rules if r.code == "cancellation_without_order"]
            matched_df = (match_cancellations(
                others_df.filter(F.col("kind") == KIND_CANCELLATION).drop("_target_key", "_match"),
                orders_key_df, order_id_prefix=source.cancellation.order_id_prefix,
                strip_prefix_to_match=source.cancellation.strip_prefix_to_match)
                .withColumn("is_cancellation_line", F.lit(True)).withColumn("is_exact_duplicate", F.lit(False))
                .drop("reasons", "reason", "kind")
                .transform(with_rule_results, without_order, details=False).transform(with_row_kind)
                .withColumn("raw", F.when(F.col("kind") == KIND_QUARANTINED, F.col("raw")))
                .select(*OTHER_COLUMNS))
            others_df = (others_df.filter(F.col("kind") != KIND_CANCELLATION).unionByName(matched_df)
                         .persist(StorageLevel.MEMORY_AND_DISK))
            cached.append(others_df)
        try:
            tallies = others_df.groupBy("kind", "reason", "_match", "_is_encoding_suspect").count().collect()
        except Exception as exc:  # noqa: BLE001
            raise _action_error(exc, path, source) from exc
        counts = {k: 0 for k in (KIND_CANCELLATION, KIND_QUARANTINED, KIND_DUPLICATE)}
        reason_counts: dict[str, int] = {}
        heuristic = suspects = 0
        for r in tallies:
            if r["kind"] != KIND_ORDER:
                counts[r["kind"]] += r["count"]
            if r["kind"] == KIND_QUARANTINED:
                reason_counts[r["reason"]] = reason_counts.get(r["reason"], 0) + r["count"]
            if r["kind"] == KIND_CANCELLATION and r["_match"] == "heuristic":
                heuristic += r["count"]
            if r["_is_encoding_suspect"]:
                suspects += r["count"]
        accepted = total - sum(counts.values())
        quarantined = counts[KIND_QUARANTINED]
        rejected = quarantined / total > validation.max_rejected_share
        reason_counts = {code: reason_counts[code] for code in REASON_CODES if code in reason_counts}
        clock.lap("pass 2: classify+count")

        # Pass 3: the accepted orders (row kind "order" never depends on cancellation matching).
        orders_accepted = orders_written = 0
        if not rejected and accepted:
            lines_df = kinds_df.filter(F.col("kind") == KIND_ORDER).transform(with_source_rows, offsets_df)
            cancels_df = None
            if counts[KIND_CANCELLATION]:
                cancels_df = others_df.filter(F.col("kind") == KIND_CANCELLATION)
            orders_df = build_orders(lines_df, cancels_df, grain=source.grain, order_id_mapped=order_id_mapped,
                                     ingest_run_id=run_id, source_name=source.name, order_id_prefix=order_id_prefix)
            orders_accepted, orders_written = _merge_orders(
                storage, orders_df, accepted if source.grain == "order" else None, cached)
            clock.lap("pass 3: write orders")
        key_rows = 0
        if not rejected and accepted and key_columns:
            # Pass 4: the accepted rows' keys, normalised and hashed in the scan (no clear text kept)
            index = {name: i for i, name in enumerate(src.names)}
            keys_df = hashed_keys(
                kinds_df.filter(F.col("kind") == KIND_ORDER).select(
                    "customer_id", *[F.col(source_col(index[c])).cast("string").alias(f"_key_{k}")
                                     for k, c in key_columns.items()]),
                {k: f"_key_{k}" for k in key_columns}, source_name=source.name,
                country_code=keys.phone_country_code, hmac_key=keys.hmac_key, run_date=run_date)
            key_rows = _add_keys(storage, keys_df, most_keys=accepted * len(key_columns))
            clock.lap("pass 4: matching keys")
        quarantine_df = None
        if quarantined:
            quarantine_df = build_quarantine(
                others_df.transform(with_quarantine_text, rules, field_count=src.field_count,
                                    # a malformed line would carry the e-mail / phone in clear
                                    line_key=(_unused_name("_line", src.names)
                                              if src.names_from and not private_columns else None))
                .transform(with_source_rows, offsets_df),
                order_id_mapped=order_id_mapped, ingest_run_id=run_id, run_date=run_date)
        _write_quarantine(storage, quarantine_df, sorted({_local_path(r["_src_file"]) for r in splits}),
                          set(quarantined_before), replace=not rejected)
        clock.lap("write quarantine")

        summary = IngestSummary(
            ingest_run_id=run_id, source_name=source.name, run_date=run_date, source_path=path, key_rows=key_rows,
            status="rejected" if rejected else "ok", input_rows=total,
            accepted_rows=accepted, cancellation_lines_applied=counts[KIND_CANCELLATION],
            quarantined_rows=quarantined, exact_duplicate_rows=counts[KIND_DUPLICATE],
            orders_accepted=orders_accepted, orders_written=orders_written, reason_counts=reason_counts,
            max_rejected_share=validation.max_rejected_share,
            source_files=len({r["_src_file"] for r in splits}),
            cancellation_lines_by_heuristic=heuristic, encoding_suspect_rows=suspects,
            skipped_files=skipped, future_rows_retried=retried, value_counts=value_counts,
            unknown_statuses=unknown_statuses, started_at=started, finished_at=datetime.now(timezone.utc))
        if not rejected and new_files:
            # after the orders commit: a crash before this line only means the files are read again
            _record_files(spark, storage, new_files, splits, run_id, summary.finished_at, source.name,
                          all_new=source.new_files_only and not any(f.key in known for f in new_files))
        _append_run(spark, storage, summary)
        clock.lap("write ingest_runs")
    finally:
        for df in cached:
            df.unpersist()
    log.info("%s", summary)
    if rejected:
        top = ", ".join(f"{code} {count:,}" for code, count in
                        sorted(reason_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
        raise IngestRejectedError(
            f"{quarantined:,} of {total:,} rows ({quarantined / total:.1%}) were rejected, above "
            f"validation.max_rejected_share={validation.max_rejected_share:.0%}: top reasons {top}; "
            "nothing was written to `orders`; inspect with `cvseg show orders_quarantine`", summary)
    return summary


class _Clock:
    """Phase durations at DEBUG level: where an ingest spends its time."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.last = logger, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.logger.debug("ingest phase %-24s %6.2f s", phase, now - self.last)
        self.last = now


def _local_path(uri: str) -> str:
    """Spark's file URI -> the path a user recognises (file:/x/a%20b.csv -> /x/a b.csv)."""
    return unquote(re.sub(r"^file:(//)?", "", uri))


def _offsets_frame(spark: SparkSession, splits: list) -> DataFrame:
    """One row per file split: its first position, the data rows of its file before it, the path."""
    rows, before, last_file = [], 0, None
    for r in sorted(splits, key=lambda r: (r["_src_file"], r["_src_block"])):
        if r["_src_file"] != last_file:
            before, last_file = 0, r["_src_file"]
        rows.append((r["_src_file"], int(r["_src_block"]), int(r["_first_pos"]), before,
                     _local_path(r["_src_file"])))
        before += int(r["_n"])
    return spark.createDataFrame(
        rows, "_src_file string, _src_block bigint, _first_pos bigint, _rows_before bigint, source_file string")


# Up to this many incoming orders, their ids are broadcast to the lookup of stored copies.
BROADCAST_MAX_INCOMING = 5_000_000


def _merge_orders(storage: Storage, orders_df: DataFrame, accepted: int | None,
                  cached: list[DataFrame]) -> tuple[int, int]:
    """Merge by order_id, skipping orders whose content is already in the table.
    Returns (orders accepted, orders new or changed); ``accepted`` is known at grain order."""
    if not storage.exists(ORDERS.name):
        storage.merge(ORDERS.name, orders_df)   # one write, no second pass
        written = accepted if accepted is not None else storage.read(ORDERS.name).count()
        return written, written
    # Hash only the stored orders whose id comes in again: a night's file touches a few thousand
    # of the millions of stored orders.
    incoming_df = (orders_df.withColumn("_hash", order_content_hash(orders_df))
                   .persist(StorageLevel.MEMORY_AND_DISK))
    cached.append(incoming_df)
    clock = _Clock(log)
    # Where are the stored copies of the incoming ids? Usually nowhere (new orders) or in the same
    # month, but a corrected order can be re-dated into another month: look in every month, on
    # the id column only (a column-pruned scan), then read whole rows only from those months.
    incoming_count = incoming_df.count()
    incoming_ids_df = incoming_df.select("order_id")
    if incoming_count <= BROADCAST_MAX_INCOMING:
        incoming_ids_df = F.broadcast(incoming_ids_df)
    stored_months = [r[0] for r in storage.read(ORDERS.name).select("order_id", "order_month")
                     .join(incoming_ids_df, on="order_id", how="left_semi")
                     .select("order_month").distinct().collect()]
    incoming_months = [r[0] for r in incoming_df.select("order_month").distinct().collect()]
    months = sorted(set(incoming_months) | set(stored_months))
    existing_df = (storage.read(ORDERS.name, partitions={"order_month": months})
                   .join(incoming_ids_df, on="order_id", how="left_semi"))
    existing_df = (existing_df.select("order_id", order_content_hash(existing_df).alias("_hash"))
                   .persist(StorageLevel.MEMORY_AND_DISK))
    cached.append(existing_df)
    # merge reads its input several times (touched months, keys, rows): keep the changed orders
    changed_df = (incoming_df.join(existing_df, on=["order_id", "_hash"], how="left_anti").drop("_hash")
                  .persist(StorageLevel.MEMORY_AND_DISK))
    cached.append(changed_df)
    written = changed_df.count()
    replacing = written and changed_df.join(existing_df.select("order_id"), on="order_id", how="left_semi") \
        .limit(1).count() > 0
    clock.lap("merge: changed orders")
    if replacing:
        # rewrites the months of the replaced orders, also the month a re-dated order leaves
        storage.merge(ORDERS.name, changed_df, previous_partitions={"order_month": stored_months})
    elif written:
        # only new order ids (a regular night): append, no month rewritten; the months of a big
        # table cost ~10 us per stored row to rewrite, the new orders ~nothing
        storage.append(ORDERS.name, changed_df)
    clock.lap("merge: write")
    return (accepted if accepted is not None else incoming_count), written


#: up to this many keys read, they are broadcast to the scan of identity_keys
KEYS_BROADCAST_MAX = 1_000_000


def _add_keys(storage: Storage, keys_df: DataFrame, most_keys: int) -> int:
    """Append the keys not yet in ``identity_keys`` (an earlier first_seen is kept); returns how many.
    ``most_keys``: a bound on the rows of ``keys_df`` (rows read x key types), known without a job."""
    keys_df = keys_df.localCheckpoint()
    if storage.exists(IDENTITY_KEYS.name):
        stored_df = storage.read(IDENTITY_KEYS.name).select(*IDENTITY_KEYS.keys)
        if most_keys <= KEYS_BROADCAST_MAX:
            # a night's keys: find those already stored by a scan with the few broadcast, not a
            # shuffle of the whole table
            stored_df = stored_df.join(F.broadcast(keys_df.select(*IDENTITY_KEYS.keys)),
                                       on=list(IDENTITY_KEYS.keys), how="left_semi")
        keys_df = keys_df.join(stored_df, on=list(IDENTITY_KEYS.keys), how="left_anti").localCheckpoint()
    added = keys_df.count()
    if added:
        storage.append(IDENTITY_KEYS.name, keys_df)
    return added


def _unknown_statuses(storage: Storage, source: SourceConf, counts: dict[str, int]) -> tuple[str, ...]:
    """Status values of this read that the conf does not name (cancelled_values, live_values) and
    no earlier successful ingest saw: a new value in a client's export (取消, 返品, half-width ｷｬﾝｾﾙ)
    would otherwise count as a live order without anyone noticing."""
    if source.cancellation.style != "status" or not counts:
        return ()
    named = set(source.cancellation.cancelled_values) | set(source.cancellation.live_values)
    candidates = [v for v in counts if v not in named and v != "(empty)"]
    if not candidates:
        return ()
    seen: set[str] = set()
    if storage.exists(INGEST_RUNS.name):
        of_source = F.coalesce(F.col("source_name"), F.lit(DEFAULT_SOURCE)) == F.lit(source.name)
        seen = {r[0] for r in storage.read(INGEST_RUNS.name).where((F.col("status") == "ok") & of_source)
                .select(F.explode(F.map_keys("status_counts"))).distinct().collect()}   # a few values
    return tuple(v for v in candidates if v not in seen)


def _quarantined_files(storage: Storage, last_day: date) -> dict[str, int]:
    """Source file -> how many of its quarantined rows are future_timestamp rows whose order day is
    now on or before ``last_day`` (0 for a file with other quarantined rows only): one small row
    per file with quarantined rows reaches the driver."""
    if not storage.exists(ORDERS_QUARANTINE.name):
        return {}
    is_due = (F.col("reason") == FUTURE_TIMESTAMP) & (F.col("order_date") <= F.lit(last_day))
    rows = (storage.read(ORDERS_QUARANTINE.name).groupBy("source_file")
            .agg(F.count(F.when(is_due, True)).alias("due")).collect())
    return {r["source_file"]: int(r["due"]) for r in rows}


def _write_quarantine(storage: Storage, quarantine_df: DataFrame | None, read_files: list[str],
                      stored_files: set[str], replace: bool) -> None:
    """The run's quarantined rows. A file read again (changed, ``--all-files``, rejected before, or
    its future rows retried) replaces every row it had in the table, so rows it no longer rejects
    leave it; ``replace`` is off for a rejected run (nothing of it was accepted): its rows are upserted."""
    if stored_files & set(read_files):
        if replace:
            kept_df = storage.read(ORDERS_QUARANTINE.name).where(~F.col("source_file").isin(read_files))
            storage.overwrite(ORDERS_QUARANTINE.name,
                              kept_df if quarantine_df is None else kept_df.unionByName(quarantine_df))
        elif quarantine_df is not None:
            storage.merge(ORDERS_QUARANTINE.name, quarantine_df)
    elif quarantine_df is not None:
        storage.append(ORDERS_QUARANTINE.name, quarantine_df)


def _record_files(spark: SparkSession, storage: Storage, files: list[SourceFile], splits: list,
                  run_id: str, at: datetime, source_name: str, all_new: bool) -> None:
    """Remember the files this run committed (one row per file) so the next run can skip them."""
    rows_by_file: dict[str, int] = {}
    for r in splits:
        name = _local_path(r["_src_file"])
        rows_by_file[name] = rows_by_file.get(name, 0) + int(r["_n"])
    rows = [(f.path, f.size, datetime.fromtimestamp(f.modified_ms / 1000, tz=timezone.utc),
             rows_by_file.get(f.path, 0), run_id, at, source_name) for f in files]
    files_df = spark.createDataFrame(rows, INGESTED_FILES.schema)
    # files that passed the new-files filter cannot be in the table yet: no merge needed
    (storage.append if all_new else storage.merge)(INGESTED_FILES.name, files_df)


def _append_run(spark: SparkSession, storage: Storage, s: IngestSummary) -> None:
    row = (s.ingest_run_id, s.run_date, s.source_path, s.input_rows, s.accepted_rows, s.quarantined_rows,
           s.exact_duplicate_rows, s.orders_written, s.reason_counts, s.started_at, s.finished_at,
           s.status, s.cancellation_lines_applied, s.future_rows_retried,
           *(s.value_counts.get(c) for c in PROFILED), s.source_name)
    storage.append(INGEST_RUNS.name, spark.createDataFrame([row], INGEST_RUNS.schema))
