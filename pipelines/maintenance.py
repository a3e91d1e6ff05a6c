"""Table maintenance (`cvseg maintain`, and the nightly run's last step on a cadence).

Nightly runs append small files (a night's orders, one row to each run table) and commit a Delta
version each time. For every table that exists, in this order:

1. **retention** - ``customer_features`` and ``customer_scores``: the ``as_of_date`` partitions
   older than the as-of date minus ``retention.<table>_days`` are removed in one metadata-only
   commit; the latest partition never is. No other table is ever pruned.
2. **compaction** - ``orders``, the run tables and the two segment tables that nights append to
   (:data:`COMPACTED`): small files are rewritten into larger ones; every version reads the same
   rows as before.
3. **VACUUM** with ``storage.retention_hours``: files that a newer version replaced at least that
   long ago are deleted (time travel reaches back that far); on a local warehouse the emptied
   partition folders go too.
4. **checkpoint** of the latest version, and log files past Delta's log retention (30 days) are
   dropped (delta-spark: through Delta 4.0's JVM API; it also checkpoints every 10 commits itself).

Nothing here changes what the latest version of a table reads, except for the pruned partitions.
Each table's outcome is one row of ``maintenance_runs``; a reader that finds a date missing asks
:func:`ensure_not_pruned`, which names the retention setting that removed it. ``dry_run`` changes
nothing (no commit, no file deleted, no row written): it lists the partitions retention would
prune and the files VACUUM would delete now (before any compaction).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from pyspark.sql import DataFrame, Row
from pyspark.sql import functions as F

from core.config import RetentionConf
from core.results import StageResult, jsonable
from core.storage import Storage, StorageError
from core.tables import MAINTENANCE_RUNS, TABLES, table_spec

log = logging.getLogger(__name__)

# Tables that nightly runs append to: orders (a night's new orders), the run and log tables (one
# row per run) and the segment tables (newcomers placed every night).
COMPACTED = ("orders", "orders_quarantine", "ingest_runs", "ingested_files", "features_runs",
             "pipeline_runs", "trend_runs", "segments_current", "segments_history", MAINTENANCE_RUNS.name)

# Tables with dated partitions that retention prunes: table -> (partition column, retention key).
# Nothing else is ever pruned (orders, segments, trends, exports, backtests, calibration).
RETAINED = {"customer_features": ("as_of_date", "customer_features_days"),
            "customer_scores": ("as_of_date", "customer_scores_days")}

# How to get a pruned date back, per table.
RECOMPUTE = {"customer_features": "`cvseg features --as-of {day}`",
             "customer_scores": "`cvseg score --as-of {day}` (after `cvseg features --as-of {day}` if its "
                                "features were pruned too)"}


class PrunedPartitionError(StorageError):
    """A table's partition for a date was removed by retention; the message names the setting."""


@dataclass(frozen=True)
class TableMaintenance:
    """What maintenance did to one table (in a dry run: what it would prune and vacuum)."""

    table: str
    files_before: int            # data files the latest version references
    files_after: int
    disk_files_before: int       # every file under the table's folder (log, older versions)
    disk_files_after: int
    bytes_before: int            # bytes under the table's folder
    bytes_after: int
    files_compacted: int         # small files rewritten into larger ones
    partitions_pruned: tuple[str, ...]
    retention_setting: str | None
    retention_days: int | None
    files_vacuumed: int
    checkpoint: bool
    seconds: float


@dataclass(frozen=True)
class MaintenanceResult(StageResult):
    """What :func:`run_maintenance` did to each table (or would do, in a dry run)."""
    run_id: str
    as_of: dt.date
    dry_run: bool
    backend: str
    retention_hours: int
    tables: tuple[TableMaintenance, ...]
    seconds: float

    def table(self, name: str) -> TableMaintenance | None:
        return next((t for t in self.tables if t.table == name), None)

    def total(self, field: str) -> int:
        return sum(getattr(t, field) for t in self.tables)

    @property
    def partitions_pruned(self) -> int:
        return sum(len(t.partitions_pruned) for t in self.tables)

    def asdict(self) -> dict[str, Any]:
        return jsonable(asdict(self))    # the tables' own dataclasses too

    def summary_line(self) -> str:
        verb = "would prune" if self.dry_run else "pruned"
        return (f"{len(self.tables)} tables: data files {self.total('files_before'):,} -> {self.total('files_after'):,}, "
                f"on disk {_mb(self.total('bytes_before'))} -> {_mb(self.total('bytes_after'))}; "
                f"{verb} {self.partitions_pruned} partition(s), "
                f"{'would vacuum' if self.dry_run else 'vacuumed'} {self.total('files_vacuumed'):,} file(s)")


def _mb(n: int) -> str:
    return f"{n / 1024**2:,.1f} MB"


# --------------------------------------------------------------------------------------------
# Decisions (pure functions)
# --------------------------------------------------------------------------------------------
def partitions_to_prune(values: list[str], as_of: dt.date, days: int | None) -> list[str]:
    """The partition dates (ISO text) older than ``as_of - days``; never the latest one."""
    if days is None or not values:
        return []
    cutoff = as_of - dt.timedelta(days=days)
    dates = sorted(dt.date.fromisoformat(v) for v in values)
    latest = dates[-1]
    return [d.isoformat() for d in dates if d < cutoff and d != latest]


def maintenance_skip_reason(last_maintained: dt.date | None, as_of: dt.date, every_days: int,
                            first_run: dt.date | None = None) -> str | None:
    """Why the nightly ``maintain`` step is skipped for ``as_of``, or None when it is due: the last
    maintain step was for a date ``every_days`` or more before; never maintained, the warehouse's
    first nightly run (``first_run``) was that long before. A first load has nothing to compact
    yet, and compacting `orders` then would cost the next night its incremental features."""
    if every_days == 0:
        return "maintenance.every_days=0: no maintenance in the nightly run (run `cvseg maintain`)"
    if last_maintained is None:
        if first_run is None or (as_of - first_run).days >= every_days:
            return None
        return (f"never maintained; the first maintenance comes {every_days} day(s) after the first night "
                f"({first_run}; maintenance.every_days={every_days}); `cvseg maintain` runs it now")
    age = (as_of - last_maintained).days
    if age >= every_days:
        return None
    when = f"{age} day(s) before {as_of}" if age >= 0 else f"after {as_of}"
    return f"last maintained as of {last_maintained}, {when} (maintenance.every_days={every_days})"


# --------------------------------------------------------------------------------------------
# Maintenance
# --------------------------------------------------------------------------------------------
def run_maintenance(storage: Storage, as_of: dt.date, retention: RetentionConf, retention_hours: int,
                    dry_run: bool = False, progress: Callable[[str], None] | None = None,
                    run_id: str | None = None, tables: Iterable[str] | None = None) -> MaintenanceResult:
    """Maintain every existing table (or those of ``tables``; see the module docstring): dated
    partitions pruned by ``retention`` (the ``retention`` config section), VACUUM keeping
    ``retention_hours`` (``storage.retention_hours``) of time travel. Returns what was done."""
    run_id = run_id or f"maintain-{as_of.isoformat()}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    hours = retention_hours
    started = time.perf_counter()
    done: list[TableMaintenance] = []
    try:
        wanted = set(TABLES if tables is None else tables)
        for name in TABLES:
            if name not in wanted or not storage.exists(name):
                continue
            result = _maintain_table(storage, retention, name, as_of, hours, dry_run)
            done.append(result)
            if progress:
                progress(f"  {name}: {result.seconds:.1f}s")
    finally:
        # recorded even when a later table failed: maintenance_runs is what tells a reader that
        # its date was pruned
        if done and not dry_run:
            _record(storage, run_id, as_of, done, hours)
    return MaintenanceResult(run_id, as_of, dry_run, storage.backend, hours, tuple(done),
                              time.perf_counter() - started)


def _maintain_table(storage: Storage, retention: RetentionConf, name: str, as_of: dt.date, hours: int,
                    dry_run: bool) -> TableMaintenance:
    clock = time.perf_counter()
    files_before, _ = storage.file_stats(name)
    disk_files_before, bytes_before = storage.disk_usage(name)
    pruned: list[str] = []
    setting = days = None
    if name in RETAINED:
        column, key = RETAINED[name]
        days = getattr(retention, key)
        setting = f"retention.{key}"
        pruned = partitions_to_prune(storage.partition_values(name), as_of, days)
        if pruned and not dry_run:
            storage.delete_partitions(name, {column: pruned})
    if not dry_run:
        # tables created by an earlier release: statistics on the key and filter columns only from
        # now on (the compaction below already writes its files that way)
        changed = storage.ensure_properties(name)
        if changed:
            log.info("%s: set table properties %s", name, changed)
    compacted = 0
    if name in COMPACTED and not dry_run and files_before > 1:
        outcome = storage.compact(name)
        compacted = outcome["files_removed"] if outcome["files_added"] else 0
    vacuumed = storage.vacuum(name, hours, dry_run=dry_run)
    checkpoint = storage.checkpoint(name) if not dry_run else False
    if dry_run:
        files_after, disk_files_after, bytes_after = files_before, disk_files_before, bytes_before
    else:
        files_after, _ = storage.file_stats(name)
        disk_files_after, bytes_after = storage.disk_usage(name)
    return TableMaintenance(
        table=name, files_before=files_before, files_after=files_after,
        disk_files_before=disk_files_before, disk_files_after=disk_files_after,
        bytes_before=bytes_before, bytes_after=bytes_after, files_compacted=compacted,
        partitions_pruned=tuple(pruned), retention_setting=setting, retention_days=days,
        files_vacuumed=len(vacuumed), checkpoint=checkpoint, seconds=round(time.perf_counter() - clock, 3))


def _record(storage: Storage, run_id: str, as_of: dt.date, done: list[TableMaintenance], hours: int) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    rows = [(run_id, as_of, t.table, storage.backend, t.files_before, t.files_after, t.disk_files_before,
             t.disk_files_after, t.bytes_before, t.bytes_after, t.files_compacted, list(t.partitions_pruned),
             t.retention_setting, t.retention_days, t.files_vacuumed, hours, t.checkpoint, float(t.seconds), now)
            for t in done]
    storage.append(MAINTENANCE_RUNS, storage.spark.createDataFrame(rows, MAINTENANCE_RUNS.schema))


def format_summary(summary: MaintenanceResult) -> list[str]:
    """The per-table summary `cvseg maintain` prints."""
    lines = []
    if summary.dry_run:
        lines.append("dry run: nothing was changed. 'pruned' = partitions retention would remove, 'vacuumed' = "
                     "files VACUUM would delete now (before compaction or pruning)")
    header = (f"{'table':<28} {'data files':>15} {'on disk (MB)':>19} {'compacted':>9} {'pruned':>6} "
              f"{'vacuumed':>8} {'ckpt':>4} {'s':>6}")
    lines += [header, "-" * len(header)]
    for t in summary.tables:
        files = f"{t.files_before} -> {t.files_after}"
        disk = f"{t.bytes_before / 1024**2:.1f} -> {t.bytes_after / 1024**2:.1f}"
        lines.append(f"{t.table:<28} {files:>15} {disk:>19} {t.files_compacted:>9} {len(t.partitions_pruned):>6} "
                     f"{t.files_vacuumed:>8} {'yes' if t.checkpoint else '-':>4} {t.seconds:>6.1f}")
        if t.partitions_pruned:
            shown = ", ".join(t.partitions_pruned[:5]) + (" ..." if len(t.partitions_pruned) > 5 else "")
            lines.append(f"{'':<28} {t.retention_setting}={t.retention_days}: {shown}")
    lines.append("-" * len(header))
    lines.append(f"{summary.summary_line()} in {summary.seconds:.1f}s (backend {summary.backend}, "
                 f"storage.retention_hours={summary.retention_hours})")
    return lines


# --------------------------------------------------------------------------------------------
# Readers of a dated partition
# --------------------------------------------------------------------------------------------
def pruned_message(storage: Storage, table: str, day: dt.date | str) -> str | None:
    """When retention removed ``table``'s partition for ``day`` (and it was not computed again),
    the message that says so, names the setting and how to get the date back; else None."""
    if table not in RETAINED:
        return None
    try:
        if not storage.exists(MAINTENANCE_RUNS):
            return None
    except KeyError:
        return None
    day = dt.date.fromisoformat(day) if isinstance(day, str) else day
    record = (storage.read(MAINTENANCE_RUNS)
              .where((F.col("table_name") == table) & F.array_contains("partitions_pruned", day.isoformat()))
              .orderBy(F.col("finished_at").desc()).limit(1).collect())   # a few rows per run
    if not record:
        return None
    column = RETAINED[table][0]
    if storage.read(table).where(F.col(column) == F.lit(day)).limit(1).count():   # computed again since
        return None
    row = record[0]
    return (f"{table} for {day} was pruned by {row['retention_setting']}={row['retention_days']} "
            f"(`cvseg maintain` as of {row['as_of_date']}); raise it or recompute with "
            f"{RECOMPUTE[table].format(day=day.isoformat())}")


def dated_partition(storage: Storage, table: str, day: dt.date, error: type[Exception], hint: str,
                    probe: str = "customer_id") -> tuple[DataFrame, Row]:
    """``table``'s partition for ``day`` (on its first partition column) and its first row's ``probe``
    column; when the table or the date is missing, ``error`` naming which with ``hint`` (the command to
    run), or :class:`PrunedPartitionError` when retention removed the date."""
    if not storage.exists(table):
        raise error(f"no {table} table yet: {hint}")
    df = storage.read(table).where(F.col(table_spec(table).partition_by[0]) == F.lit(day))
    first = df.select(probe).limit(1).first()
    if first is None:
        ensure_not_pruned(storage, table, day)
        raise error(f"no {table} for {day}: {hint}")
    return df, first


def ensure_not_pruned(storage: Storage, table: str, day: dt.date | str) -> None:
    """Raise :class:`PrunedPartitionError` when ``table``'s partition for ``day`` was pruned by
    retention; called by readers that found the date missing, before their own error."""
    message = pruned_message(storage, table, day)
    if message:
        raise PrunedPartitionError(message)
