"""Wall time of the synthetic export: generate + write, parquet and csv.

    .venv/bin/python bench/generate.py --customers 2000000 --out /tmp/cvseg_bench

Runs in a local[*] session built by core.spark (driver memory from --driver-memory). Each format is
timed from the call of ``generate`` to its return: simulation, formatting, the write and
true_params.json (one Spark job). Session start-up is excluded; the JVM is warmed by a small run.
Besides wall seconds it reports the CPU seconds of this process tree (driver JVM + Python workers)
and the 1-minute load average, because the machine is shared: wall time alone says little.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree_cpu_seconds() -> float:
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--end-date", default="2026-09-30")
    parser.add_argument("--out", required=True)
    parser.add_argument("--formats", default="parquet,csv")
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--keep", action="store_true", help="keep the written exports")
    args = parser.parse_args()

    from core.config import SparkConf
    from core.spark import build_spark
    from datagen.generate import generate

    spark = build_spark(SparkConf(master="local[*]", app_name="bench-generate", driver_memory=args.driver_memory))
    end_date = dt.date.fromisoformat(args.end_date)
    generate(spark, 20_000, args.seed, end_date, os.path.join(args.out, "warmup"), fmt="csv")
    results = {}
    for fmt in args.formats.split(","):
        out_dir = os.path.join(args.out, fmt)
        started, cpu_started = time.perf_counter(), _tree_cpu_seconds()
        summary = generate(spark, args.customers, args.seed, end_date, out_dir, fmt=fmt)
        seconds = time.perf_counter() - started
        cpu_seconds = _tree_cpu_seconds() - cpu_started
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(summary["orders_path"]) for f in fs)
        results[fmt] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                        "load_1min": round(os.getloadavg()[0], 1), "n_rows": summary["n_rows"],
                        "rows_per_second": round(summary["n_rows"] / seconds), "bytes": size,
                        "files": len([f for f in os.listdir(summary["orders_path"]) if f.startswith("part-")])}
        print(fmt, json.dumps(results[fmt]), flush=True)
        if not args.keep:
            shutil.rmtree(out_dir)
    print(json.dumps({"customers": args.customers, "cores": os.cpu_count(), **results}))
    spark.stop()


if __name__ == "__main__":
    main()
