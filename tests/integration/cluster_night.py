"""The nightly run on a small export, shared by the local reference (in the test process) and the
cluster run (``python -m tests.integration.cluster_night``, its own driver: one SparkContext per
process), plus what the cluster run checks on the way: executor JVMs killed inside a step, and
which Python (and which engine code) the executors' workers ran.

One night: a first load of the whole export as of D (every step, the heaviest path: full ingest,
full features, a fit, a new segment generation, trends rebuilt). The regular night's incremental
paths (new files only, features updated, trends incremental) run on S3 (test_warehouse_s3) and
locally (test_nightly_run), not here: a second cluster night cost ~3 minutes of CI on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

D = dt.date(2026, 9, 30)
CONF = Path(__file__).resolve().parents[2] / "conf" / "examples" / "synthetic.yaml"
SHUFFLE_PARTITIONS = 2


def night_config(root: Path, source: Path):
    from core.config import load_config

    return load_config(CONF, [f"storage.warehouse={root / 'warehouse'}", f"source.path={source}",
                              "source.format=parquet", f"export.dest={root / 'exports'}", "spark.master=null",
                              # one model on one basis, no hybrid: the cluster, not the model comparison
                              "models.purchase_models=[bgnbd]", "models.purchase_basis=gross",
                              "models.hybrid.enabled=false", "storage.backend=delta-spark",
                              f"validation.future_cutoff={D}", "trends.years=2"])


def order_key_duplicates(storage) -> int:
    from pyspark.sql import functions as F

    return (storage.read("orders").groupBy("order_id").count().where(F.col("count") > 1).count())


def run_night(spark, root: Path, export_orders: str, hook=None, progress=print, source: Path | None = None) -> dict:
    """The night of D into ``root`` (``hook``: the night's step hook): fingerprints, Delta versions,
    duplicate order ids and, when a step failed and the night had to be re-run, the failure's message."""
    from core.storage import Storage
    from pipelines.nightly import PipelineStepError, run_nightly, table_versions
    from tests.integration.test_nightly_run import fingerprints

    # The same source folder for every run compared (orders.source_file etc. hold the path): it is
    # emptied and filled again with hard links, so paths, sizes and mtimes are the same each time.
    source = source or root / "source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for f in sorted(Path(export_orders).glob("*.parquet")):
        os.link(f, source / f.name)
    config = night_config(root, source)
    storage = Storage(spark, config.storage.warehouse, backend=config.storage.backend)
    stopped, started = None, time.time()
    try:
        run_nightly(spark, storage, config, D, step_hook=hook, progress=progress)
    except PipelineStepError as exc:     # allowed: a clear stop, and the re-run finishes
        stopped = str(exc)
        progress(f"stopped: {stopped}; re-running {D}")
        run_nightly(spark, storage, config, D, progress=progress)
    return {"as_of": D.isoformat(), "fingerprints": fingerprints(storage), "versions": table_versions(storage),
            "duplicate_order_ids": order_key_duplicates(storage), "stopped": stopped, "window": (started, time.time())}


# --------------------------------------------------------------------------------------------
# Faults: SIGKILL an executor JVM while a step's tasks run
# --------------------------------------------------------------------------------------------
def executor_pids(app_id: str) -> list[int]:
    """PIDs of this application's executor JVMs (CoarseGrainedExecutorBackend ... --app-id APP)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "org.apache.spark.executor.CoarseGrainedExecutorBackend" in cmd and app_id in cmd:
            pids.append(proc.info["pid"])
    return sorted(pids)


def executor_pid_by_port(app_id: str) -> dict[int, int]:
    """Each executor JVM's listening ports -> its PID (Spark names an executor by its block manager's port)."""
    import psutil

    return {conn.laddr.port: pid for pid in executor_pids(app_id)
            for conn in psutil.Process(pid).net_connections(kind="inet") if conn.status == "LISTEN"}


class ExecutorKiller:
    """A step hook: when a chosen step runs, a watcher thread waits until an executor of the
    cluster runs a task of it, then SIGKILLs that executor's JVM; when no task failed with it (the
    task had just ended), it waits for the worker's new executor and kills again during a later task.
    What happened is recorded in ``events``.

    The executor is told by Spark's own status (running tasks per executor, keyed by its block
    manager's port) and found by the port its JVM listens on. Waiting for *both* cores to be busy
    instead missed ingest on a loaded CI machine: a 600-customer ingest's two-task stages last
    milliseconds."""

    def __init__(self, spark, steps: tuple[str, ...]):
        self.sc = spark.sparkContext
        self.steps = steps
        self.events: list[dict] = []

    @contextmanager
    def __call__(self, step: str):
        if step not in self.steps:
            yield
            return
        record = {"step": step, "step_started": time.time()}
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(record, stop), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
            record["step_finished"] = time.time()
            self.events.append(record)

    def _running_tasks_by_port(self) -> dict[int, int]:
        infos = self.sc._jsc.sc().statusTracker().getExecutorInfos()
        return {int(info.port()): int(info.numRunningTasks()) for info in infos}

    def _watch(self, record: dict, stop: threading.Event) -> None:
        tracker = self.sc.statusTracker()
        pid_by_port: dict[int, int] = {}
        while not stop.is_set():
            stages = tracker.getActiveStageIds()
            if stages:
                running = {port: n for port, n in self._running_tasks_by_port().items() if n > 0}
                if any(port not in pid_by_port for port in running):
                    pid_by_port = executor_pid_by_port(self.sc.applicationId)
                target = next((port for port in running if port in pid_by_port), None)
                if target is not None and len(set(pid_by_port.values())) == 2:
                    failed_before = self._failed_tasks(tracker, stages)
                    pid = pid_by_port[target]
                    os.kill(pid, signal.SIGKILL)
                    info = tracker.getStageInfo(max(stages))
                    record.update(killed_pid=pid, executors_before=len(set(pid_by_port.values())),
                                  running_tasks_on_killed=running[target], stage_id=max(stages),
                                  stage_name=info.name if info else None, killed_at=time.time(),
                                  kills=record.get("kills", 0) + 1)
                    if self._failed_tasks(tracker, stages, after_losing=target) > failed_before:
                        return
                    # Spark's status lags its tasks by ~0.1-0.2 s, and a Delta log stage's tasks last
                    # less: the task had ended before the kill landed. Wait for the worker's new
                    # executor (two again) and kill during a later task of the step.
                    pid_by_port = {}
            stop.wait(0.005)

    def _failed_tasks(self, tracker, stages, after_losing: int | None = None) -> int:
        """Failed tasks of ``stages`` so far; with ``after_losing``, once Spark has dropped that executor
        (its task failures are recorded with its removal; bounded wait, also after the step ended)."""
        deadline = time.time() + 30
        while after_losing is not None and after_losing in self._running_tasks_by_port() and time.time() < deadline:
            time.sleep(0.05)
        infos = (tracker.getStageInfo(s) for s in stages)
        return sum(info.numFailedTasks for info in infos if info is not None)


# --------------------------------------------------------------------------------------------
# Which Python the executors run
# --------------------------------------------------------------------------------------------
def probe_python_workers(spark) -> list[dict]:
    """One row per task of a 4-partition ``mapInPandas`` (a pandas UDF, like scoring): the worker's
    interpreter, where it imported the engine from, and the JVM it runs under."""
    import pandas as pd

    def describe(batches):
        import psutil

        import core.spark

        proc = psutil.Process()
        jvm = next((p for p in proc.parents() if "java" in p.name()), None)
        jvm_cmd = jvm.cmdline() if jvm else []
        for batch in batches:
            yield pd.DataFrame({"id": batch["id"], "python": sys.executable, "engine_file": core.spark.__file__,
                                "pid": os.getpid(), "jvm_pid": jvm.pid if jvm else -1,
                                "jvm_is_executor": "org.apache.spark.executor.CoarseGrainedExecutorBackend" in jvm_cmd})

    schema = "id long, python string, engine_file string, pid long, jvm_pid long, jvm_is_executor boolean"
    return [row.asDict() for row in spark.range(0, 4, numPartitions=4).mapInPandas(describe, schema).collect()]


def main(argv: list[str] | None = None) -> int:
    bench = str(Path(__file__).resolve().parents[2] / "bench")
    sys.path.insert(0, bench)
    from _eventlog import app_log, event_log_settings, figures_by_group
    sys.path.remove(bench)   # bench/models.py must not shadow the engine's models package

    from core.config import SparkConf
    from core.spark import SNAPSHOT_PARTITIONS, build_spark
    from tests.conftest import TEST_SPARK_EXTRA

    parser = argparse.ArgumentParser()
    parser.add_argument("--master", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--orders", required=True, help="the export's orders folder (parquet)")
    parser.add_argument("--source", required=True, type=Path, help="the source folder shared with the local run")
    parser.add_argument("--kill-during", default="", help="steps to kill an executor in")
    parser.add_argument("--executor-memory", default="768m")
    args = parser.parse_args(argv)
    events_dir = args.root / "eventlog"
    started = time.perf_counter()
    spark = build_spark(SparkConf(master=args.master, app_name="cvseg-cluster-test",
                                  shuffle_partitions=SHUFFLE_PARTITIONS, driver_memory="1g",
                                  # one Delta snapshot task per core, as local sessions have (core.spark):
                                  # Delta's default of 50 made 67 stages of 50 tiny tasks, 3,350 of the
                                  # night's ~3,600 tasks on this two-core cluster
                                  extra={"spark.executor.memory": args.executor_memory, **TEST_SPARK_EXTRA,
                                         SNAPSHOT_PARTITIONS: "2",
                                         **event_log_settings(events_dir)}),
                        str(args.root / "warehouse"))
    session_seconds = time.perf_counter() - started
    probe = probe_python_workers(spark)
    killer = ExecutorKiller(spark, tuple(s for s in args.kill_during.split(",") if s))
    night = run_night(spark, args.root, args.orders, hook=killer, source=args.source)
    app_id = spark.sparkContext.applicationId
    spark.stop()
    by_step = figures_by_group(app_log(events_dir, app_id), windows=[(night["as_of"], *night["window"])])
    out = {"app_id": app_id, "session_seconds": round(session_seconds, 1), "probe": probe, "night": night,
           "kills": killer.events, "failed_tasks_by_step": {k: dict(v.failure_reasons) for k, v in by_step.items()
                                                            if v.failed_tasks}}
    (args.root / "result.json").write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
