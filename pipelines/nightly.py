"""The nightly pipeline for one as-of date D: ingest -> features -> score -> segments -> trends -> export
-> maintain (on a cadence).

Each step that runs records one row in ``pipeline_runs`` (status, start/finish, seconds, the Delta
versions of the tables it committed, a message) after its output is committed. A step is skipped
when it already succeeded for D *after* every earlier step last succeeded for D, so:

* a crashed run resumes: re-running D skips the committed steps and runs the rest;
* re-running D after a clean run changes nothing (no step runs, no table gets a new version,
  not even ``pipeline_runs``: skipped steps are printed, not recorded);
* a step that is re-run (``force``) makes every later step stale, so they run too, also when the
  steps run as separate processes (one Databricks/Airflow task per step).

Score refits on a cadence (:func:`refit_reason`): no champion, champion fitted on features
``models.refit_every_days`` or more before D, or registered more than ``models.champion_max_age_days``
ago. A refit (:func:`pipelines.ltv.refit_champion`) fits the champion's kind of model again on
sufficient statistics and registers it as the champion.

The last step, ``maintain`` (:mod:`pipelines.maintenance`: compaction, retention, VACUUM,
checkpoints), runs when the last successful ``maintain`` step in ``pipeline_runs`` is for an as-of
date ``maintenance.every_days`` or more before D, or there is none; otherwise it is skipped with
the reason printed (and, like every skipped step, not recorded). ``force`` runs it regardless.

Fault injection for tests: ``CVSEG_FAIL_AFTER_STEP=<step>`` (or ``fail_after``) stops the run
right after that step is committed and recorded, as a crash would.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from core.config import Config
from core.errors import CvsegError
from core.s3 import s3_error_summary
from core.spark import expressions_sized_for
from core.storage import Storage
from core.tables import PIPELINE_RUNS, TABLES, tables_produced_by
from core.tracking import ChampionInfo, champion_info  # noqa: F401 -- the nightly's view of the champion

log = logging.getLogger(__name__)

STEPS = ("ingest", "features", "score", "segments", "trends", "export", "maintain")
FAIL_AFTER_ENV = "CVSEG_FAIL_AFTER_STEP"
REFIT_CHOICES = ("auto", "always", "never")


class PipelineStepError(CvsegError, RuntimeError):
    """A step failed (or a failure was injected); the message is the one-line reason."""

    def __init__(self, message: str, step: str, cause: BaseException | None = None):
        super().__init__(message)
        self.step = step
        self.cause = cause


class InjectedFailure(CvsegError, RuntimeError):
    """Raised after a step on request (CVSEG_FAIL_AFTER_STEP), to test crash recovery."""


@dataclass
class StepOutcome:
    step: str
    status: str                      # ok | skipped
    seconds: float = 0.0
    output_versions: dict[str, int] = field(default_factory=dict)
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class NightlyResult:
    run_id: str
    as_of_date: dt.date
    outcomes: list[StepOutcome]

    def outcome(self, step: str) -> StepOutcome | None:
        return next((o for o in self.outcomes if o.step == step), None)

    @property
    def executed(self) -> list[str]:
        return [o.step for o in self.outcomes if o.status == "ok"]


# --------------------------------------------------------------------------------------------
# Decisions (pure functions)
# --------------------------------------------------------------------------------------------
def select_steps(steps: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The requested steps in pipeline order; unknown names are an error naming the valid ones."""
    if not steps:
        return STEPS
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; steps are: {', '.join(STEPS)}")
    return tuple(s for s in STEPS if s in steps)


def is_up_to_date(step: str, done: dict[str, dt.datetime]) -> bool:
    """True when ``step`` last succeeded for D after every earlier step last succeeded for D."""
    if step not in done:
        return False
    earlier = STEPS[:STEPS.index(step)]
    return all(done[step] >= done[p] for p in earlier if p in done)


def refit_reason(champion: ChampionInfo | None, as_of_date: dt.date, refit_every_days: int,
                 champion_max_age_days: int | None, now: dt.datetime) -> str | None:
    """Why the score step must refit before scoring D, or None to score with the champion."""
    if champion is None:
        return "no champion registered"
    if champion.fitted_as_of is None:
        return f"champion v{champion.version} records no as-of date"
    age = (as_of_date - champion.fitted_as_of).days
    if age >= refit_every_days:
        return (f"cadence: champion v{champion.version} was fitted as of {champion.fitted_as_of}, "
                f"{age} days before {as_of_date} (models.refit_every_days={refit_every_days})")
    if champion_max_age_days is not None:
        registered_days = (now - champion.registered_at).total_seconds() / 86400
        if registered_days > champion_max_age_days:
            return (f"champion v{champion.version} was registered {registered_days:.0f} days ago "
                    f"(models.champion_max_age_days={champion_max_age_days})")
    return None


def fail_after_from_env() -> str | None:
    value = os.environ.get(FAIL_AFTER_ENV, "").strip()
    if value and value not in STEPS:
        raise ValueError(f"{FAIL_AFTER_ENV}={value!r} is not a step; steps are: {', '.join(STEPS)}")
    return value or None


# --------------------------------------------------------------------------------------------
# pipeline_runs
# --------------------------------------------------------------------------------------------
def completed_steps(storage: Storage, as_of_date: dt.date) -> dict[str, dt.datetime]:
    """Step -> latest successful finish for D (at most one row per step reaches the driver)."""
    if not storage.exists(PIPELINE_RUNS):
        return {}
    rows = (storage.read(PIPELINE_RUNS)
            .where((F.col("run_date") == F.lit(as_of_date)) & (F.col("status") == F.lit("ok")))
            .groupBy("step").agg(F.max("finished_at").alias("finished_at")).collect())
    return {r["step"]: r["finished_at"] for r in rows}


def _record(spark: SparkSession, storage: Storage, run_id: str, as_of_date: dt.date, step: str, status: str,
            started: dt.datetime, finished: dt.datetime, versions: dict[str, int], message: str) -> None:
    row = (run_id, as_of_date, step, status, started, finished, (finished - started).total_seconds(),
           versions, message[:2000])
    storage.append(PIPELINE_RUNS, spark.createDataFrame([row], PIPELINE_RUNS.schema))


def step_tables(step: str) -> list[str]:
    """Tables the step may commit (their versions are recorded in ``pipeline_runs``): those whose
    ``TableSpec.produced_by`` is the step; ``maintain`` rewrites every table but ``pipeline_runs``."""
    if step == "maintain":
        return [name for name in TABLES if name != PIPELINE_RUNS.name]
    return list(tables_produced_by(step))


def table_versions(storage: Storage, names: list[str] | None = None) -> dict[str, int]:
    """Current Delta version of the named (default: every registered) table that exists; log reads only."""
    names = [n for n in TABLES if n != PIPELINE_RUNS.name] if names is None else names
    return {name: storage.version(name) for name in names if storage.exists(name)}


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
@dataclass
class _Context:
    spark: SparkSession
    storage: Storage
    config: Config
    as_of_date: dt.date
    source_path: str | None
    refit: str
    new_generation: bool
    rebuild_trends: bool
    dest: str | None


def _ingest(ctx: _Context) -> tuple[str, dict]:
    from pipelines.ingest import read_day
    from pipelines.sources import run_sources

    # "future" is judged against the day the file is read, not D: a run for a past D (a backfill,
    # a first run over a whole history) keeps the later orders; features stop at D anyway
    result = run_sources(ctx.spark, ctx.storage, ctx.config,
                         read_day(ctx.config.validation, ctx.config.business.timezone), path=ctx.source_path)
    return result.summary_line(), result.asdict()


def _features(ctx: _Context) -> tuple[str, dict]:
    from pipelines.features import run_features

    result = run_features(ctx.storage, ctx.as_of_date, ctx.config.features)
    return result.summary_line(), result.asdict()


def _score(ctx: _Context) -> tuple[str, dict]:
    from core import tracking
    from pipelines.ltv import LtvInputError, load_champion, refit_champion, run_score

    target = tracking.tracking_target(ctx.config)
    tracking.start(target)
    champion = champion_info(target.registered_model)
    models = ctx.config.models
    if ctx.refit == "always":
        reason = "requested (--refit always)"
    elif ctx.refit == "never":
        if champion is None:
            raise LtvInputError(f"no champion registered as {target.registered_model!r} and --refit never; "
                              "run with --refit auto (or `cvseg backtest`) first")
        reason = None
    else:
        reason = refit_reason(champion, ctx.as_of_date, models.refit_every_days, models.champion_max_age_days,
                              dt.datetime.now(dt.timezone.utc))
    details: dict[str, Any] = {"refit": reason is not None, "refit_reason": reason}
    if reason is not None:
        refit = refit_champion(ctx.storage, ctx.as_of_date, ctx.config, champion, target.registered_model)
        bundle, version = refit.bundle, refit.version
        if champion is not None and champion.value_model == "hybrid":
            details["hybrid_skipped"] = refit.hybrid_skipped
        details["refit_seconds"] = refit.seconds
    else:
        bundle, version = load_champion(target.registered_model)
    result = run_score(ctx.storage, ctx.as_of_date, bundle, version, intervals=models.intervals)
    details.update(result.asdict())
    how = f"refit ({reason}) -> champion v{version}" if reason else f"champion v{version}"
    return f"{result.customers:,} customers scored with {how}", details


def _segments(ctx: _Context) -> tuple[str, dict]:
    from pipelines.segments import run_segments

    result = run_segments(ctx.storage, ctx.as_of_date, ctx.config.segments, new_generation=ctx.new_generation)
    return result.summary_line(), result.asdict()


def _trends(ctx: _Context) -> tuple[str, dict]:
    from pipelines.trends import run_trends
    from pipelines.value_totals import run_ltv_by_channel

    trends = run_trends(ctx.storage, ctx.as_of_date, ctx.config.trends, rebuild=ctx.rebuild_trends)
    # a snapshot of the scores at D, rewritten whenever the step runs (after a re-score too)
    channels = run_ltv_by_channel(ctx.storage, ctx.as_of_date)
    return f"{trends.summary_line()}; {channels.summary_line()}", {**trends.asdict(), **channels.asdict()}


def _export(ctx: _Context) -> tuple[str, dict]:
    from pipelines.export import run_export

    result = run_export(ctx.storage, ctx.as_of_date, ctx.config.export, dest=ctx.dest,
                        horizon_months=ctx.config.models.horizon_months, labels=ctx.config.segments.labels)
    return result.summary_line(), result.asdict()


def last_maintained(storage: Storage) -> tuple[dt.date | None, dt.date | None]:
    """As-of dates of the latest successful ``maintain`` step and of the first successful step of
    any kind in ``pipeline_runs`` (one row to the driver)."""
    if not storage.exists(PIPELINE_RUNS):
        return None, None
    ok = storage.read(PIPELINE_RUNS).where(F.col("status") == F.lit("ok"))
    row = ok.agg(F.max(F.when(F.col("step") == F.lit("maintain"), F.col("run_date"))).alias("last"),
                 F.min("run_date").alias("first")).first()
    return row["last"], row["first"]


def _maintain_skip_reason(ctx: _Context) -> str | None:
    from pipelines.maintenance import maintenance_skip_reason

    every_days = ctx.config.maintenance.every_days
    last, first = last_maintained(ctx.storage) if every_days else (None, None)
    return maintenance_skip_reason(last, ctx.as_of_date, every_days, first_run=first)


def _maintain(ctx: _Context) -> tuple[str, dict]:
    from pipelines.maintenance import run_maintenance

    result = run_maintenance(ctx.storage, ctx.as_of_date, ctx.config.retention, ctx.config.storage.retention_hours)
    return result.summary_line(), result.asdict()


RUNNERS: dict[str, Callable[[_Context], tuple[str, dict]]] = {
    "ingest": _ingest, "features": _features, "score": _score,
    "segments": _segments, "trends": _trends, "export": _export, "maintain": _maintain,
}

# Steps that run on a cadence: a function giving the reason to skip the step for D (None: due).
CADENCE: dict[str, Callable[[_Context], str | None]] = {"maintain": _maintain_skip_reason}


#: Spark job group of a step's jobs: ``cvseg:<step>`` (the Spark UI, event logs, bench/cluster.py).
JOB_GROUP_PREFIX = "cvseg:"


@contextmanager
def step_job_group(spark: SparkSession, step: str, as_of_date: dt.date) -> Iterator[None]:
    """Tag every Spark job the step starts (from this thread) with the job group ``cvseg:<step>``,
    so a cluster's UI and event log attribute task time and shuffle bytes to the nightly steps."""
    sc = spark.sparkContext
    sc.setJobGroup(f"{JOB_GROUP_PREFIX}{step}", f"cvseg run --as-of {as_of_date}: {step}")
    try:
        yield
    finally:
        for key in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
            sc.setLocalProperty(key, None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------
def _expressions_sized_for_warehouse(stack: ExitStack, spark: SparkSession, storage: Storage,
                                     config: Config) -> str:
    """Enter :func:`core.spark.expressions_sized_for` on ``stack`` for the warehouse's last
    customer count; what to tell the user when expressions run interpreted, else ''. The count is
    read only when ``spark.interpreted_below_customers`` is on (its first read costs ~3 s)."""
    from pipelines.features import last_customer_count

    below = config.spark.interpreted_below_customers
    customers = last_customer_count(storage) if below else None
    if stack.enter_context(expressions_sized_for(spark, customers, below, config.spark.extra)):
        return f"expressions interpreted: {customers:,} customers < spark.interpreted_below_customers"
    return ""


def _why_skipped(ctx: _Context, name: str, done: dict[str, dt.datetime], force: bool) -> tuple[str, str] | None:
    """(what the progress line says, the outcome's message) when step ``name`` does not run: already
    committed for D, or not due by its cadence; None when it runs."""
    if force:
        return None
    if is_up_to_date(name, done):
        return f"committed at {done[name]:%Y-%m-%d %H:%M:%S}", "already committed for this date"
    not_due = CADENCE[name](ctx) if name in CADENCE else None
    return (not_due, not_due) if not_due else None


@dataclass(frozen=True)
class _StepRun:
    outcome: StepOutcome
    finished_at: dt.datetime   # as PySpark reads pipeline_runs back: local, naive


def _run_step(ctx: _Context, run_id: str, name: str, label: str, progress: Callable[[str], None],
              step_hook: Callable[[str], ContextManager] | None) -> _StepRun:
    """Run one step and record it in ``pipeline_runs`` (ok, with the table versions it committed; or
    failed, then :class:`PipelineStepError` says what to re-run)."""
    spark, storage, as_of_date = ctx.spark, ctx.storage, ctx.as_of_date
    outputs = step_tables(name)
    before = table_versions(storage, outputs)
    started_at = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    try:
        with step_job_group(spark, name, as_of_date), (step_hook(name) if step_hook else nullcontext()):
            message, details = RUNNERS[name](ctx)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one recorded line
        s3_error = s3_error_summary(exc)
        reason = (f"{s3_error} (the S3 retries of storage.s3 were used up)" if s3_error
                  else _first_line(exc))
        try:
            _record(spark, storage, run_id, as_of_date, name, "failed", started_at,
                    dt.datetime.now(dt.timezone.utc), {}, reason)
        except Exception:  # noqa: BLE001 - the step's own error is the one to report
            log.warning("could not record the failure of step %s in pipeline_runs", name, exc_info=True)
        progress(f"{label} FAILED after {time.perf_counter() - clock:.1f}s")
        fix = "once S3 answers again," if s3_error else "fix it and"
        raise PipelineStepError(
            f"step {name} failed for {as_of_date}: {reason}; {fix} re-run `cvseg run --as-of "
            f"{as_of_date}` (committed steps are skipped)", name, exc) from exc
    seconds = time.perf_counter() - clock
    after = table_versions(storage, outputs)
    versions = {t: v for t, v in after.items() if before.get(t) != v}
    finished_at = dt.datetime.now(dt.timezone.utc)
    _record(spark, storage, run_id, as_of_date, name, "ok", started_at, finished_at, versions, message)
    return _StepRun(StepOutcome(name, "ok", seconds, versions, message, details),
                    finished_at.astimezone().replace(tzinfo=None))


def run_nightly(spark: SparkSession, storage: Storage, config: Config, as_of_date: dt.date, *,
                source_path: str | None = None, steps: list[str] | tuple[str, ...] | None = None,
                refit: str = "auto", new_generation: bool = False, rebuild_trends: bool = False,
                force: bool = False, dest: str | None = None, fail_after: str | None = None,
                progress: Callable[[str], None] = print,
                step_hook: Callable[[str], ContextManager] | None = None,
                run_id: str | None = None) -> NightlyResult:
    """Run (or resume) the nightly pipeline for D; raises :class:`PipelineStepError` on failure."""
    if refit not in REFIT_CHOICES:
        raise ValueError(f"refit must be one of {REFIT_CHOICES} (got {refit!r})")
    selected = select_steps(steps)
    fail_after = fail_after or fail_after_from_env()
    run_id = run_id or f"run-{as_of_date.isoformat()}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    ctx = _Context(spark, storage, config, as_of_date, source_path, refit, new_generation, rebuild_trends, dest)
    done = completed_steps(storage, as_of_date)
    outcomes: list[StepOutcome] = []
    total_started = time.perf_counter()
    progress(f"[run {as_of_date}] {run_id}: steps {' -> '.join(selected)} "
             f"(storage backend {storage.backend}, warehouse {storage.warehouse})")
    with ExitStack() as sized:
        for position, name in enumerate(selected, start=1):
            label = f"[run {as_of_date}] {position}/{len(selected)} {name:<8}"
            skipped = _why_skipped(ctx, name, done, force)
            if skipped:
                progress(f"{label} skipped ({skipped[0]})")
                outcomes.append(StepOutcome(name, "skipped", message=skipped[1]))
                continue
            if all(o.status == "skipped" for o in outcomes):
                # the first step that runs: a night with nothing to do reads nothing
                expressions = _expressions_sized_for_warehouse(sized, spark, storage, config)
                if expressions:
                    progress(f"[run {as_of_date}] {expressions}")
            progress(f"{label} ...")
            outcome = _run_step(ctx, run_id, name, label, progress, step_hook)
            done[name] = outcome.finished_at
            outcomes.append(outcome.outcome)
            progress(f"{label} done in {outcome.outcome.seconds:.1f}s: {outcome.outcome.message}")
            if fail_after == name:
                raise PipelineStepError(
                    f"injected failure after step {name} ({FAIL_AFTER_ENV}); re-run `cvseg run --as-of {as_of_date}` "
                    "to resume", name, InjectedFailure(name))
    ran = sum(o.status == "ok" for o in outcomes)
    progress(f"[run {as_of_date}] finished in {time.perf_counter() - total_started:.1f}s: "
             f"{ran} step(s) ran, {len(outcomes) - ran} skipped")
    return NightlyResult(run_id, as_of_date, outcomes)
