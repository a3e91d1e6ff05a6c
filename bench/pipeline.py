"""Benchmark of the whole nightly run (`cvseg run`): per-step wall time and peak memory, with and
without a refit.

    python bench/pipeline.py --customers 2000000 [--format parquet|csv] [--workdir DIR] [--reuse-export]

1. generate the export (seeded), 2. run the nightly pipeline for the as-of date with a refit
(``--refit always``: fit BG/NBD + Gamma-Gamma + cancellation on sufficient statistics, register
the champion, score, segments (a generation cut), trends (full build), export), 3. run the same
date again with every step forced and no refit (``--force --refit never``: ingest finds nothing new,
segments places newcomers in the existing generation, trends update incrementally).

Prints seconds and peak RSS of the driver and the JVM per step, and each run's total as a ratio of
a bare Spark scan + count of the same export (this machine is shared: read the ratios). Targets
(issue #4), 2-core machine, 2M customers: nightly run without a refit < 3 min, with a refit < 4 min.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _measure import PeakMemory, Timer  # noqa: E402

# bench/ holds scripts named like engine packages (bench/models.py): keep it off the import path
# so `models` is the engine's package, not a benchmark script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402

END_DATE = dt.date(2026, 9, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--reuse-export", action="store_true", help="skip generate if the export exists")
    parser.add_argument("--driver-memory", default="12g")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-pipeline-"))
    export_dir = workdir / f"export-{args.customers}-{args.format}"
    warehouse = workdir / "warehouse"
    exports = workdir / "exports"
    shutil.rmtree(warehouse, ignore_errors=True)
    shutil.rmtree(exports, ignore_errors=True)
    source_path = export_dir / "orders"
    config = load_config(Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml", [
        f"storage.warehouse={warehouse}", f"source.format={args.format}", f"source.path={source_path}",
        f"export.dest={exports}", f"spark.driver_memory={args.driver_memory}", *args.overrides])

    from pipelines.generate import generate
    from pipelines.nightly import run_nightly

    timer = Timer()
    print(f"customers={args.customers:,} format={args.format} workdir={workdir}")
    with PeakMemory() as memory:
        with timer.step("spark session start", memory):
            spark = build_spark(config.spark, str(warehouse))
        storage = Storage(spark, str(warehouse), config.storage.backend)
        if not (args.reuse_export and (export_dir / "true_params.json").exists()):
            with timer.step("generate", memory):
                summary = generate(spark, n_customers=args.customers, seed=args.seed, end_date=END_DATE,
                                   out_dir=str(export_dir), fmt=args.format)
            print(f"  export rows: {summary['n_rows']:,}")
        reader = spark.read.option("header", "true") if args.format == "csv" else spark.read
        with timer.step("baseline: scan+count export", memory):
            n_rows = getattr(reader, args.format)(str(source_path)).count()

        runs = {}
        for label, options in (("with refit", {"refit": "always"}),
                               ("no refit", {"refit": "never", "force": True})):
            print(f"\n-- nightly run {END_DATE} {label} --")
            with timer.step(f"nightly {label}"):   # memory peaks are taken per step inside
                result = run_nightly(spark, storage, config, END_DATE,
                                     step_hook=lambda name, label=label: timer.step(f"  {label}: {name}", memory),
                                     progress=lambda line: None, **options)
            runs[label] = result
    baseline = timer.total("baseline: scan+count export")
    steps = {name.strip(): round(s, 1) for name, s, _ in timer.rows}
    peaks = {name.strip(): {"driver_gib": round(d / 1024**3, 2), "jvm_gib": round(j / 1024**3, 2)}
             for name, _, _, d, j in timer.peaks}
    result = {
        "customers": args.customers, "export_rows": n_rows, "format": args.format, "seconds": steps,
        "peak_rss": peaks,
        "peak_rss_run_gib": {k: {"driver": max(v["driver_gib"] for n, v in peaks.items() if n.startswith(k)),
                                 "jvm": max(v["jvm_gib"] for n, v in peaks.items() if n.startswith(k))}
                             for k in ("with refit", "no refit")},
        "nightly_with_refit_s": steps["nightly with refit"], "nightly_no_refit_s": steps["nightly no refit"],
        "vs_scan": {k: round(steps[f"nightly {k}"] / baseline, 1) if baseline else None
                    for k in ("with refit", "no refit")},
        "refit_seconds": runs["with refit"].outcome("score").details.get("refit_seconds"),
        "export_rows_written": runs["no refit"].outcome("export").details["rows"],
    }
    print(f"\nnightly run: with refit {steps['nightly with refit']:.1f} s ({result['vs_scan']['with refit']}x the "
          f"bare scan of {baseline:.1f} s), without {steps['nightly no refit']:.1f} s "
          f"({result['vs_scan']['no refit']}x); targets at 2M customers: < 240 s with, < 180 s without")
    print(json.dumps(result))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
