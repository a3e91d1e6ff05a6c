"""The ingest stage runner: :func:`run_ingest` reads a source (:mod:`.reading`), composes the transforms
(:mod:`.transforms`) and writes ``orders``, ``orders_quarantine``, ``ingest_runs`` and ``ingested_files``."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from functools import reduce
from typing import Callable

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from core.config import SourceConf, ValidationConf
from core.storage import Storage
from core.tables import IDENTITY_KEYS, INGEST_RUNS, INGESTED_FILES, ORDERS, ORDERS_QUARANTINE
from pipelines.identity import NightKeys, hashed_keys
from pipelines.ingest.reading import (Source, SourceFile, action_error, java_charsets,
                                     check_mapping, ingested_file_keys, local_path, unused_name,
                                     list_source_files, read_source, spark_file_paths)
from pipelines.ingest.summary import (DEFAULT_SOURCE, KIND_CANCELLATION, KIND_DUPLICATE, KIND_ORDER, KIND_QUARANTINED,
                                      IngestError, IngestRejectedError, IngestSummary)
from pipelines.ingest.transforms import (KEY_FIELDS, POSITION, PROFILED, SET_PROFILE, SET_SPLIT, TEXT_FIELDS, as_text,
                                         build_orders, build_quarantine, map_columns, match_cancellations,
                                         order_content_hash, source_col, source_stats, value_profile,
                                         with_cancellation_flags, with_duplicate_flags, with_parsed_fields,
                                         with_quarantine_text, with_row_keys, with_row_kind, with_source_rows)
from pipelines.validation import FUTURE_TIMESTAMP, REASON_CODES, order_rules, with_rule_results

log = logging.getLogger(__name__)



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


@dataclass(frozen=True)
class PendingIngest:
    """A source read whose orders and quarantine are committed, but whose matching keys are not yet
    compared with ``identity_keys`` and whose files and ``ingest_runs`` row are not yet recorded:
    :func:`add_keys` does the first for every source of a run at once, :meth:`finish` the rest. A
    crash before :meth:`finish` only means the files are read again (the orders' merge adds
    nothing twice, and the keys are hashed again)."""
    summary: IngestSummary
    keys_df: DataFrame | None = None            # the read's hashed keys (checkpointed), if any
    most_keys: int = 0                          # a bound on keys_df's rows, known without a job
    record: Callable[[IngestSummary], None] | None = field(default=None, repr=False)   # None: recorded

    def finish(self, key_rows: int = 0) -> IngestSummary:
        """Record the files and the run (with ``key_rows`` new matching keys); returns the summary."""
        if self.record is None:
            return self.summary
        summary = replace(self.summary, key_rows=key_rows, finished_at=datetime.now(timezone.utc))
        self.record(summary)
        log.info("%s", summary)
        return summary


def run_ingest(spark: SparkSession, storage: Storage, source: SourceConf, validation: ValidationConf,
               business_tz: str, run_date: date, path: str | None = None, *,
               run_id: str | None = None, order_id_prefix: str = "",
               keys: KeyReading | None = None) -> IngestSummary:
    """Ingest ``path`` (default ``source.path``): orders merged by order_id, bad rows quarantined,
    one ``ingest_runs`` row. Raises :class:`IngestError` for unusable input and
    :class:`IngestRejectedError` when the rejected share is above the threshold.
    ``order_id_prefix``: prepended to every order id (``<source>:`` with several sources);
    ``keys``: the source's e-mail / phone columns are hashed into ``identity_keys``."""
    pending = read_source_orders(spark, storage, source, validation, business_tz, run_date, path, run_id=run_id,
                                 order_id_prefix=order_id_prefix, keys=keys)
    added, _ = add_keys(storage, [pending])        # {} without keys
    return pending.finish(added.get(source.name, 0))


def read_source_orders(spark: SparkSession, storage: Storage, source: SourceConf, validation: ValidationConf,
                       business_tz: str, run_date: date, path: str | None = None, *,
                       run_id: str | None = None, order_id_prefix: str = "",
                       keys: KeyReading | None = None) -> PendingIngest:
    """:func:`run_ingest` up to its matching keys: the keys hashed but not compared with
    ``identity_keys``, the files and the run not recorded (see :class:`PendingIngest`). A read
    without keys to add, an unchanged one and a rejected one (which raises) are recorded already."""
    with java_charsets(spark, source):
        return _run_ingest(spark, storage, source, validation, business_tz, run_date, path, run_id,
                           order_id_prefix, keys)


def _run_ingest(spark: SparkSession, storage: Storage, source: SourceConf, validation: ValidationConf,
                business_tz: str, run_date: date, path: str | None, run_id: str | None,
                order_id_prefix: str, keys: KeyReading | None) -> PendingIngest:
    """Pass 1: keys only (rows per file split, order ids seen twice); pass 2: every row
    classified, the few that are not plain orders kept and counted; pass 3: accepted orders written
    (pass 4: their matching keys hashed); then the quarantine, the files and the run recorded (with
    matching keys, the files and the run wait for the keys' comparison: :class:`PendingIngest`)."""
    started = datetime.now(timezone.utc)
    clock = _Clock(log)
    path = _checked(spark, source, path)
    run_id = run_id or f"ingest-{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    mapping = source.columns.model_dump()
    order_id_mapped = mapping["order_id"] is not None
    # e-mail / phone: never copied to a table, a log or the quarantine in clear (only hashed keys)
    private_columns = {mapping[k] for k in KEY_FIELDS if mapping.get(k)}
    files = _files_to_read(spark, storage, source, validation, path, run_date)
    if files.src is None:   # every listed file was ingested before, unchanged: record that, nothing else
        summary = IngestSummary(
            ingest_run_id=run_id, source_name=source.name, run_date=run_date, source_path=path, status="unchanged",
            input_rows=0, accepted_rows=0, cancellation_lines_applied=0, quarantined_rows=0, exact_duplicate_rows=0,
            orders_accepted=0, orders_written=0, max_rejected_share=validation.max_rejected_share,
            skipped_files=files.skipped, started_at=started, finished_at=datetime.now(timezone.utc))
        _append_run(spark, storage, summary)
        log.info("%s", summary)
        return PendingIngest(summary)
    src = files.src
    check_mapping(src.names, source, path)
    clock.lap("open source")
    keyed_df = _keyed_rows(src.df, src.names, source, mapping, business_tz, order_id_mapped)
    retry = files.retry
    rules = order_rules(run_date=run_date, future_tolerance_days=validation.future_tolerance_days,
                        allowed_currencies=source.allowed_currencies, order_id_mapped=order_id_mapped,
                        expected_fields=len(src.names), expected_from=src.names_from or "the header")

    cached: list[DataFrame] = []
    try:
        first = _pass_keys(spark, storage, keyed_df, source, validation, path, mapping, order_id_mapped, cached,
                           in_read=retry.rows_read() if retry else None)
        clock.lap("pass 1: splits+dups")
        retried_splits = [r for r in first.splits if retry and r["_src_file"] in retry.uris]
        retried_rows = sum(r["_n"] for r in retried_splits)
        retried_files = frozenset(local_path(r["_src_file"]) for r in retried_splits)
        second = _pass_classify(first.flagged_df, src, source, validation, path, rules, private_columns,
                                first.total, cached, retry_uris=retry.uris if retry else frozenset(),
                                retried_rows=retried_rows)
        clock.lap("pass 2: classify+count")
        orders_accepted = orders_written = most_keys = 0
        first_order_date = keys_df = None
        if not second.rejected and second.accepted:
            orders_accepted, orders_written, first_order_date, keys_df, most_keys = _write_accepted(
                storage, second, first.offsets_df, src, source, mapping, run_id, run_date, order_id_prefix,
                keys, cached, clock, retried_files)
        quarantine_df = None
        if second.quarantined:
            # a malformed line would carry the e-mail / phone in clear: no line text then
            line_key = unused_name("_line", src.names) if src.names_from and not private_columns else None
            quarantine_df = build_quarantine(
                second.others_df.transform(with_quarantine_text, rules, field_count=src.field_count,
                                           line_key=line_key).transform(with_source_rows, first.offsets_df),
                order_id_mapped=order_id_mapped, ingest_run_id=run_id, run_date=run_date)
        # a file of which only the due rows' closure was read keeps its other quarantined rows
        narrowed = {local_path(r["_src_file"]) for r in retried_splits if r["_src_file"] in retry.narrowed_uris}
        _write_quarantine(storage, quarantine_df,
                          sorted({local_path(r["_src_file"]) for r in first.splits} - narrowed),
                          set(files.quarantined_before), replace=not second.rejected,
                          read_again=retry.quarantine_rows_read(sorted(narrowed)) if narrowed else None)
        clock.lap("write quarantine")

        summary = IngestSummary(
            ingest_run_id=run_id, source_name=source.name, run_date=run_date, source_path=path,
            status="rejected" if second.rejected else "ok", input_rows=first.total,
            accepted_rows=second.accepted, cancellation_lines_applied=second.counts[KIND_CANCELLATION],
            quarantined_rows=second.quarantined, exact_duplicate_rows=second.counts[KIND_DUPLICATE],
            orders_accepted=orders_accepted, orders_written=orders_written, first_order_date=first_order_date,
            reason_counts=second.reason_counts,
            max_rejected_share=validation.max_rejected_share,
            source_files=len({r["_src_file"] for r in first.splits}),
            cancellation_lines_by_heuristic=second.heuristic, encoding_suspect_rows=second.suspects,
            skipped_files=files.skipped, future_rows_retried=files.retried, value_counts=first.value_counts,
            retried_file_rows=retried_rows if narrowed else 0, narrowed_files=len(narrowed),
            unknown_statuses=first.unknown_statuses, started_at=started, finished_at=datetime.now(timezone.utc))

        def record(done: IngestSummary) -> None:
            if not second.rejected and files.new_files:
                # after the orders commit: a crash before this line only means the files are read again
                _record_files(spark, storage, files.new_files, first.splits, run_id, done.finished_at, source.name,
                              all_new=source.new_files_only and not any(f.key in files.known for f in files.new_files))
            _append_run(spark, storage, done)

        if keys_df is not None:     # the keys' comparison with identity_keys first (add_keys), then record
            return PendingIngest(summary, keys_df, most_keys, record)
        record(summary)
        clock.lap("write ingest_runs")
    finally:
        for df in cached:
            df.unpersist()
    log.info("%s", summary)
    if second.rejected:
        raise _rejection(summary, *second.judged)
    return PendingIngest(summary)


def _checked(spark: SparkSession, source: SourceConf, path: str | None) -> str:
    """The path to read (``--path`` or ``source.path``), once the session is fit for a run (the source's
    settings were checked when the config was read: ``core.config.SourceConf``)."""
    path = path or source.path
    if not path:
        raise IngestError("no source path: set source.path in the conf or pass --path")
    if spark.conf.get("spark.sql.session.timeZone") != "UTC":
        raise IngestError("the Spark session must run in UTC (core.spark.build_spark sets it)")
    return path


def _rejection(summary: IngestSummary, quarantined: int, rows: int) -> IngestRejectedError:
    """A run above ``validation.max_rejected_share``: the share, the top reasons and where to look.
    ``quarantined`` of ``rows``: what the share is taken over (rows read again only for their
    future-dated rows are not: their file was judged when it was first read)."""
    top = ", ".join(f"{code} {count:,}" for code, count in
                    sorted(summary.reason_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
    share = quarantined / rows
    return IngestRejectedError(
        f"{quarantined:,} of {rows:,} rows ({share:.1%}) were rejected, above "
        f"validation.max_rejected_share={summary.max_rejected_share:.0%}: top reasons {top}; nothing was "
        "written to `orders`; inspect with `cvseg show orders_quarantine`", summary)


@dataclass(frozen=True)
class _Files:
    """What a run reads: the source (None when every listed file was ingested before, unchanged)."""
    src: Source | None
    new_files: list[SourceFile] | None      # None: the file system gave no listing (Spark Connect)
    skipped: int                            # listed files already ingested unchanged
    known: set                              # the keys of every file ingested before
    quarantined_before: dict[str, int]      # file -> rows quarantined as future whose day has come
    retried: int                            # of those, the rows this run reads again
    retry: "_Retry | None" = None           # files read again only for those rows


#: Up to this many due rows, a file read again only for them is narrowed to their closure.
RETRY_CLOSURE_MAX_ROWS = 10_000


@dataclass(frozen=True)
class _Retry:
    """Files ingested before, unchanged, read again because rows of theirs quarantined as future have
    come due. Of a narrowed file only the due rows' closure is read: every row of their customers
    and order ids. That is all a row's classification depends on besides itself (duplicates and
    line grouping by order id, cancellation matching by customer), so the closure classifies as a
    whole-file read would; its other rows' outcome cannot change (an unchanged order is not
    rewritten anyway). A night then reads a few rows of a history file, not its millions."""
    uris: frozenset[str]            # every retry file, as Spark's _metadata.file_path names it
    narrowed_uris: frozenset[str]   # those read narrowed (the others are read whole)
    customers: tuple[str, ...]
    order_ids: tuple[str, ...]      # empty when the export has no order id column

    def _closure(self) -> Column:
        closure = F.col("customer_id").isin(list(self.customers))
        if self.order_ids:
            closure = closure | F.col("order_id").isin(list(self.order_ids))
        return F.coalesce(closure, F.lit(False))

    def rows_read(self) -> Column | None:
        """On the keyed source rows: the rows this run reads (None: every row)."""
        if not self.narrowed_uris:
            return None
        return ~F.col("_src_file").isin(list(self.narrowed_uris)) | self._closure()

    def quarantine_rows_read(self, narrowed_files: list[str]) -> Column:
        """On ``orders_quarantine``: the stored rows of the narrowed files that this run read again
        (the same customer and order id test, on the same values)."""
        return F.col("source_file").isin(narrowed_files) & self._closure()


def _files_to_read(spark: SparkSession, storage: Storage, source: SourceConf, validation: ValidationConf,
                   path: str, run_date: date) -> _Files:
    """New files only (``source.new_files_only``): the listed files not ingested unchanged before, plus
    those holding rows quarantined as future whose day has come."""
    src = read_source(spark, path, source)
    listed = list_source_files(spark, src)
    new_files, skipped, known = listed, 0, set()
    last_due_day = run_date + timedelta(days=validation.future_tolerance_days)
    quarantined_before = _quarantined_files(storage, last_due_day)
    due = {file: count for file, count in quarantined_before.items() if count}
    retry = None
    if listed is not None and source.new_files_only:
        known = ingested_file_keys(storage)
        new_files = [f for f in listed if f.key not in known or f.path in due]
        skipped = len(listed) - len(new_files)
        if listed and not new_files:
            return _Files(None, [], skipped, known, quarantined_before, 0)
        # A Delta source is read whole (its log, not its files, says which rows are live).
        if skipped and source.format != "delta":
            src = read_source(spark, [f.uri for f in new_files], source)
        if source.format != "delta":
            retry = _retry(spark, storage, [f for f in new_files if f.key in known and f.path in due],
                           last_due_day, order_id_mapped=source.columns.order_id is not None)
    # every file read holds its rows; without a listing (Spark Connect) every due row is read again
    retried = sum(due.get(f.path, 0) for f in new_files) if new_files is not None else sum(due.values())
    return _Files(src, new_files, skipped, known, quarantined_before, retried, retry)


def _retry(spark: SparkSession, storage: Storage, files: list[SourceFile], last_day: date, *,
           order_id_mapped: bool) -> _Retry | None:
    """The files read again only for their due rows, and the closure to read of them: a file is
    read whole when a due row has neither customer nor order id to find it by, or when more than
    RETRY_CLOSURE_MAX_ROWS rows are due (a clock that ran a day ahead for a whole export)."""
    if not files:
        return None
    rows = (storage.read(ORDERS_QUARANTINE)
            .where(_is_due(last_day) & F.col("source_file").isin([f.path for f in files]))
            .select("source_file", "customer_id", "order_id").limit(RETRY_CLOSURE_MAX_ROWS + 1).collect())
    uris = spark_file_paths(spark, files)
    if len(rows) > RETRY_CLOSURE_MAX_ROWS:
        return _Retry(frozenset(uris.values()), frozenset(), (), ())
    unfindable = {r["source_file"] for r in rows
                  if r["customer_id"] is None and (r["order_id"] is None or not order_id_mapped)}
    narrowed = [f for f in files if f.path not in unfindable]
    return _Retry(frozenset(uris.values()), frozenset(uris[f.path] for f in narrowed),
                  tuple(sorted({r["customer_id"] for r in rows if r["customer_id"] is not None})),
                  tuple(sorted({r["order_id"] for r in rows if r["order_id"] is not None}))
                  if order_id_mapped else ())


def _keyed_rows(df: DataFrame, names: list[str], source: SourceConf, mapping: dict[str, str | None],
                business_tz: str, order_id_mapped: bool) -> DataFrame:
    """The source rows on canonical columns, parsed, with cancellation flags and row keys."""
    keyed_df = (map_columns(df, names, mapping, keep_extra=source.extra_columns == "keep")
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
    return keyed_df


@dataclass(frozen=True)
class _KeysPass:
    splits: list                              # rows per file split (source_row offsets)
    total: int                                # input rows
    value_counts: dict[str, dict[str, int]]   # status / channel / category profile
    unknown_statuses: tuple[str, ...]
    offsets_df: DataFrame
    flagged_df: DataFrame                     # the rows with their duplicate flags


def _pass_keys(spark: SparkSession, storage: Storage, keyed_df: DataFrame, source: SourceConf,
               validation: ValidationConf, path: str, mapping: dict[str, str | None], order_id_mapped: bool,
               cached: list[DataFrame], in_read: Column | None = None) -> _KeysPass:
    """Pass 1: keys only. The statistics are small on any sane export: bring them to the driver, so
    later passes join a local table (no broadcast job per pass) or nothing at all. ``in_read``: the
    rows the run reads (default: all); the others count only for row numbers."""
    profiled = [c for c in PROFILED if mapping.get(c)]
    stats_df = source_stats(keyed_df, grain=source.grain, order_id_mapped=order_id_mapped, profile=profiled,
                            in_read=in_read).persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(stats_df)
    try:
        stats = stats_df.limit(LOCAL_STATS_MAX_ROWS + 1).collect()
        if len(stats) > LOCAL_STATS_MAX_ROWS:
            splits = stats_df.filter(F.col("_set") == SET_SPLIT).collect()   # one row per file split
    except Exception as exc:  # noqa: BLE001 - Spark wraps read errors in many classes
        raise action_error(exc, path, source) from exc
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
    if in_read is not None:
        keyed_df = keyed_df.filter(in_read)
    flagged_df = keyed_df.transform(with_duplicate_flags, problems_df, grain=source.grain, broadcast=broadcast)
    return _KeysPass(splits, total, value_counts, unknown_statuses, _offsets_frame(spark, splits), flagged_df)


@dataclass(frozen=True)
class _ClassifyPass:
    kinds_df: DataFrame                  # every row with its kind
    others_df: DataFrame                 # the few rows that are not plain orders (cached)
    counts: dict[str, int]               # kind -> rows (cancellation lines, quarantined, exact duplicates)
    reason_counts: dict[str, int]        # quarantine reason -> rows, in REASON_CODES order
    heuristic: int                       # cancellation lines matched by the most-recent-order heuristic
    suspects: int                        # rows whose text looks mis-decoded
    accepted: int
    quarantined: int
    rejected: bool                       # above validation.max_rejected_share: no orders are written
    judged: tuple[int, int]              # (quarantined, rows) the share is taken over


def _pass_classify(flagged_df: DataFrame, src: Source, source: SourceConf, validation: ValidationConf, path: str,
                   rules: list, private_columns: set[str], total: int, cached: list[DataFrame], *,
                   retry_uris: frozenset[str] = frozenset(), retried_rows: int = 0) -> _ClassifyPass:
    """Pass 2: classify every row by the row rules; keep the few that are not plain orders
    (cancellation lines included, with their raw text in case they end up quarantined) and count them
    in one aggregation (rows of ``retry_uris``, ``retried_rows`` of ``total``, are kept out of the
    rejected share: their file was judged when first read). No ``detail`` here: its message code,
    evaluated in the scan, made the generated method too big for the JIT (measured 2x slower); it is
    added on the cached rows later."""
    row_rules = [r for r in rules if r.code != "cancellation_without_order"]
    raw_map = F.create_map(*[x for i, n in enumerate(src.names) if n not in private_columns
                             for x in (F.lit(n), as_text(F.col(source_col(i)), src.df.schema[source_col(i)].dataType))])
    is_suspect = F.concat_ws("", *TEXT_FIELDS).contains("\ufffd")   # mis-decoded text (wrong encoding)
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
    if source.cancellation.style == "negative_lines":
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
        tallies = (others_df.withColumn("_retried", F.col("_src_file").isin(list(retry_uris)))
                   .groupBy("kind", "reason", "_match", "_is_encoding_suspect", "_retried").count().collect())
    except Exception as exc:  # noqa: BLE001
        raise action_error(exc, path, source) from exc
    counts = {k: 0 for k in (KIND_CANCELLATION, KIND_QUARANTINED, KIND_DUPLICATE)}
    reason_counts: dict[str, int] = {}
    heuristic = suspects = retried_quarantined = 0
    for r in tallies:
        if r["kind"] != KIND_ORDER:
            counts[r["kind"]] += r["count"]
        if r["kind"] == KIND_QUARANTINED:
            reason_counts[r["reason"]] = reason_counts.get(r["reason"], 0) + r["count"]
            retried_quarantined += r["count"] if r["_retried"] else 0
        if r["kind"] == KIND_CANCELLATION and r["_match"] == "heuristic":
            heuristic += r["count"]
        if r["_is_encoding_suspect"]:
            suspects += r["count"]
    quarantined = counts[KIND_QUARANTINED]
    judged = (quarantined - retried_quarantined, total - retried_rows)
    return _ClassifyPass(kinds_df, others_df, counts,
                         {code: reason_counts[code] for code in REASON_CODES if code in reason_counts},
                         heuristic, suspects, accepted=total - sum(counts.values()), quarantined=quarantined,
                         rejected=judged[1] > 0 and judged[0] / judged[1] > validation.max_rejected_share,
                         judged=judged)


def _write_accepted(storage: Storage, classified: _ClassifyPass, offsets_df: DataFrame, src: Source,
                    source: SourceConf, mapping: dict[str, str | None], run_id: str, run_date: date,
                    order_id_prefix: str, keys: KeyReading | None, cached: list[DataFrame],
                    clock: "_Clock", retried_files: frozenset[str] = frozenset()
                    ) -> tuple[int, int, date | None, DataFrame | None, int]:
    """Pass 3: the accepted orders merged (row kind "order" never depends on cancellation matching);
    pass 4: their matching keys, normalised and hashed in the scan (no clear text kept). Returns
    (orders accepted, orders written, the earliest order date written, the hashed keys (checkpointed,
    not yet compared with identity_keys: :func:`add_keys`) and a bound on their rows). ``retried_files``:
    files read again for their due rows, whose orders never replace a later file's (see _merge_orders)."""
    order_rows_df = classified.kinds_df.filter(F.col("kind") == KIND_ORDER)
    cancels_df = None
    if classified.counts[KIND_CANCELLATION]:
        cancels_df = classified.others_df.filter(F.col("kind") == KIND_CANCELLATION)
    orders_df = build_orders(order_rows_df.transform(with_source_rows, offsets_df), cancels_df, grain=source.grain,
                             order_id_mapped=mapping["order_id"] is not None, ingest_run_id=run_id,
                             source_name=source.name, order_id_prefix=order_id_prefix)
    orders_accepted, orders_written, first_order_date = _merge_orders(
        storage, orders_df, classified.accepted if source.grain == "order" else None, cached, retried_files)
    clock.lap("pass 3: write orders")
    key_columns = {k: mapping[k] for k in (keys.match_on if keys else ()) if mapping.get(k)}
    keys_df, most_keys = None, 0
    if key_columns:
        index = {name: i for i, name in enumerate(src.names)}
        keys_df = hashed_keys(
            order_rows_df.select("customer_id", *[F.col(source_col(index[c])).cast("string").alias(f"_key_{k}")
                                                  for k, c in key_columns.items()]),
            {k: f"_key_{k}" for k in key_columns}, source_name=source.name,
            country_code=keys.phone_country_code, hmac_key=keys.hmac_key, run_date=run_date).localCheckpoint()
        most_keys = classified.accepted * len(key_columns)
        clock.lap("pass 4: matching keys")
    return orders_accepted, orders_written, first_order_date, keys_df, most_keys


class _Clock:
    """Phase durations at DEBUG level: where an ingest spends its time."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.last = logger, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.logger.debug("ingest phase %-24s %6.2f s", phase, now - self.last)
        self.last = now


def _offsets_frame(spark: SparkSession, splits: list) -> DataFrame:
    """One row per file split: its first position, the data rows of its file before it, the path."""
    rows, before, last_file = [], 0, None
    for r in sorted(splits, key=lambda r: (r["_src_file"], r["_src_block"])):
        if r["_src_file"] != last_file:
            before, last_file = 0, r["_src_file"]
        rows.append((r["_src_file"], int(r["_src_block"]), int(r["_first_pos"]), before,
                     local_path(r["_src_file"])))
        before += int(r["_n_all"])
    return spark.createDataFrame(
        rows, "_src_file string, _src_block bigint, _first_pos bigint, _rows_before bigint, source_file string")


# Up to this many incoming orders, their ids are broadcast to the lookup of stored copies.
BROADCAST_MAX_INCOMING = 5_000_000


def _merge_orders(storage: Storage, orders_df: DataFrame, accepted: int | None,
                  cached: list[DataFrame], retried_files: frozenset[str] = frozenset()) -> tuple[int, int, date | None]:
    """Merge by order_id, skipping orders whose content is already in the table. Returns (orders
    accepted, orders new or changed, the earliest order date among those); ``accepted`` is known
    at grain order. An order of ``retried_files`` (read again for their due future rows) replaces a
    stored copy only when that copy came from the same file: a later file's restatement of the
    order (a correction, a cancellation by status) is newer than the old file's."""
    if not storage.exists(ORDERS):
        storage.merge(ORDERS, orders_df)   # one write, no second pass
        # one column read back (a first load: every order is new)
        row = storage.read(ORDERS).agg(F.count(F.lit(1)), F.min("order_date")).first()
        return (accepted if accepted is not None else row[0]), row[0], row[1]
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
    stored_months = [r[0] for r in storage.read(ORDERS).select("order_id", "order_month")
                     .join(incoming_ids_df, on="order_id", how="left_semi")
                     .select("order_month").distinct().collect()]
    incoming_months = [r[0] for r in incoming_df.select("order_month").distinct().collect()]
    months = sorted(set(incoming_months) | set(stored_months))
    existing_df = (storage.read(ORDERS, partitions={"order_month": months})
                   .join(incoming_ids_df, on="order_id", how="left_semi"))
    existing_df = (existing_df.select("order_id", order_content_hash(existing_df).alias("_hash"),
                                      F.col("source_file").alias("_stored_file"))
                   .persist(StorageLevel.MEMORY_AND_DISK))
    cached.append(existing_df)
    changed_df = incoming_df.join(existing_df.drop("_stored_file"), on=["order_id", "_hash"], how="left_anti")
    if retried_files:
        stated_later_df = (changed_df.select("order_id", "source_file")
                           .where(F.col("source_file").isin(sorted(retried_files)))
                           .join(existing_df, on="order_id")
                           .where(F.col("_stored_file") != F.col("source_file")).select("order_id"))
        changed_df = changed_df.join(stated_later_df, on="order_id", how="left_anti")
    # merge reads its input several times (touched months, keys, rows): keep the changed orders
    changed_df = changed_df.drop("_hash").persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(changed_df)
    written, first_order_date = changed_df.agg(F.count(F.lit(1)), F.min("order_date")).first()
    replacing = written and changed_df.join(existing_df.select("order_id"), on="order_id", how="left_semi") \
        .limit(1).count() > 0
    clock.lap("merge: changed orders")
    if replacing:
        # rewrites the months of the replaced orders, also the month a re-dated order leaves
        storage.merge(ORDERS, changed_df, previous_partitions={"order_month": stored_months})
    elif written:
        # only new order ids (a regular night): append, no month rewritten; the months of a big
        # table cost ~10 us per stored row to rewrite, the new orders ~nothing
        storage.append(ORDERS, changed_df)
    clock.lap("merge: write")
    return (accepted if accepted is not None else incoming_count), written, first_order_date


#: up to this many keys read, they are broadcast to the scan of identity_keys
KEYS_BROADCAST_MAX = 1_000_000


def add_keys(storage: Storage, reads: list[PendingIngest]) -> tuple[dict[str, int], NightKeys | None]:
    """Append the matching keys of ``reads`` (one per source) not yet in ``identity_keys``; returns
    how many per source and, for a night's few keys, what the identity step needs of that
    comparison (:class:`pipelines.identity.NightKeys`).

    A night's keys (up to :data:`KEYS_BROADCAST_MAX` together) are compared with the table in one
    scan for every source, the keys broadcast: the scan returns every stored holder of a key read
    tonight, which says both which keys are stored already and, for the identity step, who else
    holds the new ones (it would otherwise scan the table again). A first load or a large read
    compares each source's keys on their own, by a shuffle, as before."""
    reads = [r for r in reads if r.keys_df is not None]
    if not reads:
        return {}, None
    if not storage.exists(IDENTITY_KEYS) or sum(r.most_keys for r in reads) > KEYS_BROADCAST_MAX:
        return {r.summary.source_name: _add_keys(storage, r.keys_df, r.summary.source_name, r.most_keys)
                for r in reads}, None
    version_before = storage.version(IDENTITY_KEYS)
    read_df = reduce(DataFrame.unionByName, [r.keys_df for r in reads])
    touched_df = F.broadcast(read_df.select("key_type", "key_hash").distinct())
    holders_df = (storage.read(IDENTITY_KEYS).select(*IDENTITY_KEYS.keys)
                  .join(touched_df, on=["key_type", "key_hash"], how="left_semi").localCheckpoint())
    added_df = read_df.join(holders_df, on=list(IDENTITY_KEYS.keys), how="left_anti").localCheckpoint()
    counts = {row["source_name"]: int(row["count"]) for row in added_df.groupBy("source_name").count().collect()}
    if counts:
        storage.append(IDENTITY_KEYS, added_df)
    night = NightKeys(added_df, holders_df.unionByName(added_df.select(*IDENTITY_KEYS.keys)), version_before)
    return {r.summary.source_name: counts.get(r.summary.source_name, 0) for r in reads}, night


def _add_keys(storage: Storage, keys_df: DataFrame, source_name: str, most_keys: int) -> int:
    """Append the keys not yet in ``identity_keys`` (an earlier first_seen is kept); returns how many.
    ``keys_df``: keys of ``source_name`` (checkpointed); ``most_keys``: a bound on its rows (rows
    read x key types), known without a job."""
    if storage.exists(IDENTITY_KEYS):
        # another source's keys never match (source_name is a key column); each ingest appends one
        # source's keys, so their files' statistics let the scan skip them
        stored_df = (storage.read(IDENTITY_KEYS).where(F.col("source_name") == source_name)
                     .select(*IDENTITY_KEYS.keys))
        if most_keys <= KEYS_BROADCAST_MAX:
            # a night's keys: find those already stored by a scan with the few broadcast, not a
            # shuffle of the whole table
            stored_df = stored_df.join(F.broadcast(keys_df.select(*IDENTITY_KEYS.keys)),
                                       on=list(IDENTITY_KEYS.keys), how="left_semi")
        keys_df = keys_df.join(stored_df, on=list(IDENTITY_KEYS.keys), how="left_anti").localCheckpoint()
    added = keys_df.count()
    if added:
        storage.append(IDENTITY_KEYS, keys_df)
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
    if storage.exists(INGEST_RUNS):
        of_source = F.coalesce(F.col("source_name"), F.lit(DEFAULT_SOURCE)) == F.lit(source.name)
        seen = {r[0] for r in storage.read(INGEST_RUNS).where((F.col("status") == "ok") & of_source)
                .select(F.explode(F.map_keys("status_counts"))).distinct().collect()}   # a few values
    return tuple(v for v in candidates if v not in seen)


def _is_due(last_day: date) -> Column:
    """On ``orders_quarantine``: a row quarantined as future whose order day is on or before ``last_day``."""
    return (F.col("reason") == FUTURE_TIMESTAMP) & (F.col("order_date") <= F.lit(last_day))


def _quarantined_files(storage: Storage, last_day: date) -> dict[str, int]:
    """Source file -> how many of its quarantined rows are future_timestamp rows whose order day is
    now on or before ``last_day`` (0 for a file with other quarantined rows only): one small row
    per file with quarantined rows reaches the driver."""
    if not storage.exists(ORDERS_QUARANTINE):
        return {}
    rows = (storage.read(ORDERS_QUARANTINE).groupBy("source_file")
            .agg(F.count(F.when(_is_due(last_day), True)).alias("due")).collect())
    return {r["source_file"]: int(r["due"]) for r in rows}


def _write_quarantine(storage: Storage, quarantine_df: DataFrame | None, read_files: list[str],
                      stored_files: set[str], replace: bool, read_again: Column | None = None) -> None:
    """The run's quarantined rows. A file read again (changed, ``--all-files``, rejected before, or
    its future rows retried) replaces every row it had in the table, so rows it no longer rejects
    leave it; ``read_again``: the stored rows of files read narrowed (:class:`_Retry`), replaced the
    same way. ``replace`` is off for a rejected run (nothing of it was accepted): its rows are upserted."""
    if stored_files & set(read_files) or read_again is not None:
        if replace:
            replaced = F.col("source_file").isin(read_files)
            if read_again is not None:
                replaced = replaced | read_again
            kept_df = storage.read(ORDERS_QUARANTINE).where(~replaced)
            storage.overwrite(ORDERS_QUARANTINE,
                              kept_df if quarantine_df is None else kept_df.unionByName(quarantine_df))
        elif quarantine_df is not None:
            storage.merge(ORDERS_QUARANTINE, quarantine_df)
    elif quarantine_df is not None:
        storage.append(ORDERS_QUARANTINE, quarantine_df)


def _record_files(spark: SparkSession, storage: Storage, files: list[SourceFile], splits: list,
                  run_id: str, at: datetime, source_name: str, all_new: bool) -> None:
    """Remember the files this run committed (one row per file) so the next run can skip them."""
    rows_by_file: dict[str, int] = {}
    for r in splits:
        name = local_path(r["_src_file"])
        rows_by_file[name] = rows_by_file.get(name, 0) + int(r["_n_all"])
    rows = [(f.path, f.size, datetime.fromtimestamp(f.modified_ms / 1000, tz=timezone.utc),
             rows_by_file.get(f.path, 0), run_id, at, source_name) for f in files]
    files_df = spark.createDataFrame(rows, INGESTED_FILES.schema)
    # files that passed the new-files filter cannot be in the table yet: no merge needed
    (storage.append if all_new else storage.merge)(INGESTED_FILES.name, files_df)


def _append_run(spark: SparkSession, storage: Storage, s: IngestSummary) -> None:
    row = (s.ingest_run_id, s.run_date, s.source_path, s.input_rows, s.accepted_rows, s.quarantined_rows,
           s.exact_duplicate_rows, s.orders_written, s.reason_counts, s.started_at, s.finished_at,
           s.status, s.cancellation_lines_applied, s.future_rows_retried,
           *(s.value_counts.get(c) for c in PROFILED), s.source_name, s.first_order_date)
    storage.append(INGEST_RUNS, spark.createDataFrame([row], INGEST_RUNS.schema))
