"""What a night costs on a cluster: the nightly run (a first load, then a regular night) on a Spark
standalone cluster and in local mode, per step: wall seconds, task (executor) seconds, shuffle
read/write bytes and memory/disk spill, from each run's Spark event log.

    python bench/cluster.py --customers 2000000 [--masters standalone,local[2]] [--workdir DIR]
                            [--reuse-export] [--workers 2] [--worker-cores 1] [--executor-memory 5g]

The export is generated and split as in bench/pipeline.py (history up to E-2, one file for E-1);
each master gets its own warehouse and its own driver process (one SparkContext per process), with
``spark.eventLog.enabled``. The standalone cluster (``infra/local-cluster``: a master and
``--workers`` workers x ``--worker-cores`` cores, each its own JVM, on 127.0.0.1) is started for
the run and stopped after it. Task seconds are the executors' run time of every task attempt,
failed ones included (what a cluster bills); shuffle read counts local + remote bytes.
Prints one table per night and a JSON line; ``--json-out`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from _eventlog import app_log, busy_seconds, event_log_settings, figures_by_group, task_intervals  # noqa: E402
from _measure import PeakMemory  # noqa: E402
import pipeline as nightly_bench  # noqa: E402  (last: it takes bench/ off sys.path, the engine first)

NIGHTS = (("first load", nightly_bench.SETUP_NIGHT, "auto", "history"),
          ("regular night", nightly_bench.NIGHTS[0][1], "never", nightly_bench.NIGHTS[0][1].isoformat()))
MIB = 1024 ** 2


def prepare(args: argparse.Namespace, workdir: Path) -> Path:
    """Generate (unless reused) and split the export; returns the staging folder."""
    from core.config import SparkConf
    from core.spark import build_spark
    from datagen.generate import generate

    export_dir = workdir / f"export-{args.customers}-parquet"
    staging = workdir / f"staging-{args.customers}"
    spark = build_spark(SparkConf(master="local[*]", app_name="bench-cluster-prepare", driver_memory="8g"))
    if not (args.reuse_export and (export_dir / "true_params.json").exists()):
        generate(spark, n_customers=args.customers, seed=args.seed, end_date=nightly_bench.END_DATE,
                 out_dir=str(export_dir), fmt="parquet")
    if not (args.reuse_export and (staging / "history").exists()):
        shutil.rmtree(staging, ignore_errors=True)
        print("  rows:", nightly_bench.split_export(spark, export_dir / "orders", "parquet", staging), flush=True)
    spark.stop()
    return staging


def run_one(args: argparse.Namespace) -> None:
    """(child process) The nights on one master; writes figures to ``--result``."""
    from core.config import SparkConf, load_config
    from core.spark import build_spark
    from core.storage import Storage
    from pipelines.nightly import run_nightly

    base = Path(args.base)
    shutil.rmtree(base, ignore_errors=True)
    events = base / "eventlog"
    cluster = not args.master.startswith("local[")
    extra = {**event_log_settings(events), **({"spark.executor.memory": args.executor_memory} if cluster else {})}
    driver_memory = args.cluster_driver_memory if cluster else args.local_driver_memory
    config = load_config(ROOT / "conf" / "examples" / "synthetic.yaml", [
        f"storage.warehouse={base / 'warehouse'}", "source.format=parquet", f"source.path={base / 'source' / 'orders'}",
        f"export.dest={base / 'exports'}", "storage.backend=delta-spark", *args.overrides])
    started = time.perf_counter()
    spark = build_spark(SparkConf(master=args.master, app_name=f"bench-cluster {args.master}",
                                  shuffle_partitions=config.spark.shuffle_partitions, driver_memory=driver_memory,
                                  extra={**config.spark.extra, **extra}), config.storage.warehouse)
    session_s = time.perf_counter() - started
    storage = Storage(spark, config.storage.warehouse, config.storage.backend)
    windows, walls, step_windows, peaks = [], {}, {}, {}
    for label, day, refit, part in NIGHTS:
        nightly_bench.drop_files(Path(args.staging) / part, base / "source" / "orders", part)
        print(f"\n-- [{args.master}] {label} {day} (refit {refit}) --", flush=True)
        t0, clock = time.time(), time.perf_counter()

        @contextmanager
        def timed_step(step: str, label: str = label):
            began = time.time()
            try:
                yield
            finally:
                step_windows[(label, step)] = (began, time.time())

        # peak RSS of this driver process and its children (local mode: the JVM that runs the tasks and
        # its Python workers; on a cluster only the driver's JVM), and the warehouse's size after the night
        with PeakMemory(interval=0.5) as memory:
            result = run_nightly(spark, storage, config, day, refit=refit,
                                 progress=lambda line: print(line, flush=True), step_hook=timed_step)
        walls[label] = {o.step: round(o.seconds, 1) for o in result.outcomes if o.status == "ok"}
        walls[label]["night"] = round(time.perf_counter() - clock, 1)
        windows.append((label, t0, time.time()))
        peaks[label] = {"driver_gib": round(memory.driver_peak / 2 ** 30, 2), "jvm_gib": round(memory.jvm_peak / 2 ** 30, 2),
                        "python_workers_gib": round(memory.workers_peak / 2 ** 30, 2),
                        "warehouse_gib": round(sum(f.stat().st_size for f in (base / "warehouse").rglob("*")
                                                   if f.is_file()) / 2 ** 30, 2)}
        print(f"-- [{args.master}] {label}: {memory.summary()}; warehouse {peaks[label]['warehouse_gib']} GiB", flush=True)
    app_id = spark.sparkContext.applicationId
    spark.stop()
    log = app_log(events, app_id)
    figures = figures_by_group(log, windows=windows)
    # driver-serial seconds: inside a step (or the night) with no task running anywhere
    intervals = task_intervals(log)
    serial = {key: (end - start) - busy_seconds(intervals, start, end) for key, (start, end) in step_windows.items()}
    serial.update({(label, "night"): (end - start) - busy_seconds(intervals, start, end)
                   for label, start, end in windows})
    steps = {}
    for key, fig in figures.items():
        label, step = key.split(": ", 1)
        steps.setdefault(label, {})[step] = {
            "wall_s": walls[label].get(step), "task_s": round(fig.task_seconds, 1), "cpu_s": round(fig.cpu_seconds, 1),
            "gc_s": round(fig.gc_seconds, 1), "tasks": fig.tasks, "failed_tasks": fig.failed_tasks,
            "shuffle_read_bytes": fig.shuffle_read_bytes, "shuffle_remote_bytes": fig.shuffle_remote_bytes,
            "shuffle_write_bytes": fig.shuffle_write_bytes, "input_bytes": fig.input_bytes,
            "output_bytes": fig.output_bytes, "memory_spill_bytes": fig.memory_spill_bytes,
            "disk_spill_bytes": fig.disk_spill_bytes, "peak_task_execution_memory": fig.peak_execution_memory}
    for (label, step), seconds in serial.items():
        steps.setdefault(label, {}).setdefault(step, {"wall_s": walls[label].get(step)})["serial_s"] = round(seconds, 1)
    Path(args.result).write_text(json.dumps({"master": args.master, "app_id": app_id, "session_s": round(session_s, 1),
                                             "walls": walls, "steps": steps, "memory": peaks}))


def totals(steps: dict[str, dict]) -> dict[str, float]:
    keys = ("task_s", "cpu_s", "shuffle_read_bytes", "shuffle_write_bytes", "memory_spill_bytes", "disk_spill_bytes", "tasks")
    return {k: sum(v.get(k, 0) or 0 for v in steps.values()) for k in keys}


def print_tables(results: dict[str, dict], customers: int) -> None:
    names = list(results)
    order = ["ingest", "features", "score", "segments", "trends", "export", "maintain", "other"]
    for label, *_ in NIGHTS:
        print(f"\n{label}: wall s / task s / CPU s / shuffle read MiB / shuffle write MiB / spill mem+disk MiB")
        print("| step | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        for step in order + ["night"]:
            cells = []
            for name in names:
                walls = results[name]["walls"].get(label, {})
                steps = results[name]["steps"].get(label, {})
                fig = totals(steps) if step == "night" else steps.get(step)
                wall = walls.get(step)
                if fig is None and wall is None:
                    cells.append("-")
                    continue
                fig = fig or {}
                cells.append(f"{wall if wall is not None else '-'} / {fig.get('task_s', 0):.1f} / {fig.get('cpu_s', 0):.1f} / "
                             f"{fig.get('shuffle_read_bytes', 0) / MIB:.0f} / {fig.get('shuffle_write_bytes', 0) / MIB:.0f} / "
                             f"{(fig.get('memory_spill_bytes', 0) + fig.get('disk_spill_bytes', 0)) / MIB:.0f}")
            if any(c != "-" for c in cells):
                print(f"| {step} | " + " | ".join(cells) + " |")
    per_million = customers / 1e6
    print("\nper million customers (all steps; task seconds = executor-seconds):")
    for name in names:
        for label, *_ in NIGHTS:
            t = totals(results[name]["steps"].get(label, {}))
            print(f"  {name:<12} {label:<14} {t['task_s'] / per_million:8.1f} executor-s, shuffle "
                  f"{t['shuffle_write_bytes'] / MIB / per_million:8.1f} MiB written, "
                  f"{t['shuffle_read_bytes'] / MIB / per_million:8.1f} MiB read, spill "
                  f"{(t['memory_spill_bytes'] + t['disk_spill_bytes']) / MIB / per_million:.1f} MiB, "
                  f"wall {results[name]['walls'].get(label, {}).get('night', float('nan'))} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--masters", default="standalone,local[2]",
                        help="comma-separated: standalone (infra/local-cluster), local[N], local-cluster[N,C,MB], "
                             "or a spark:// URL of a running cluster")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--reuse-export", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-cores", type=int, default=1)
    parser.add_argument("--executor-memory", default="5g", help="each executor's heap (the worker offers 1g more)")
    parser.add_argument("--cluster-driver-memory", default="3g")
    parser.add_argument("--local-driver-memory", default="10g", help="local mode: the driver is the executor")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    # child mode
    parser.add_argument("--run-one", dest="master", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--staging", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.master:
        run_one(args)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)}
    print(f"customers={args.customers:,} masters={args.masters} workdir={workdir}", flush=True)
    started = time.perf_counter()
    prep = subprocess.run([sys.executable, __file__, "--customers", str(args.customers), "--seed", str(args.seed),
                           "--workdir", str(workdir), "--masters", "prepare",
                           *(["--reuse-export"] if args.reuse_export else [])], env=env) \
        if args.masters != "prepare" else None
    if args.masters == "prepare":
        prepare(args, workdir)
        return
    if prep.returncode:
        sys.exit("preparing the export failed")
    print(f"export ready in {time.perf_counter() - started:.0f}s", flush=True)
    staging = workdir / f"staging-{args.customers}"
    results = {}
    for master in args.masters.split(","):
        cluster_dir = workdir / "local-cluster"
        url = master
        if master == "standalone":
            memory_mb = int(args.executor_memory.rstrip("gG")) * 1024 + 1024 if args.executor_memory[-1] in "gG" \
                else int(args.executor_memory.rstrip("mM")) + 1024
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, str(ROOT / "infra" / "local-cluster"), "start", "--dir", str(cluster_dir),
                                  "--workers", str(args.workers), "--cores", str(args.worker_cores),
                                  "--memory", f"{memory_mb}m"], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            url = json.loads(out.stdout.splitlines()[-1])["master_url"]
            print(f"standalone cluster {url} up in {time.perf_counter() - t0:.1f}s", flush=True)
        result_file = workdir / f"result-{master.replace('[', '_').replace(']', '').replace(',', '_')}.json"
        try:
            run = subprocess.run([sys.executable, __file__, "--run-one", url, "--base", str(workdir / f"run-{result_file.stem}"),
                                  "--staging", str(staging), "--result", str(result_file),
                                  "--executor-memory", args.executor_memory,
                                  "--cluster-driver-memory", args.cluster_driver_memory,
                                  "--local-driver-memory", args.local_driver_memory,
                                  *[f"--set={o}" for o in args.overrides]], env=env)
        finally:
            if master == "standalone":
                subprocess.run([sys.executable, str(ROOT / "infra" / "local-cluster"), "stop", "--dir", str(cluster_dir)],
                               env=env)
        if run.returncode:
            print(f"the run on {master} failed (exit {run.returncode})", flush=True)
            continue
        name = f"standalone {args.workers}x{args.worker_cores}" if master == "standalone" else master
        results[name] = json.loads(result_file.read_text())
        print_tables(results, args.customers)
    out = {"customers": args.customers, "results": results}
    print(json.dumps(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
