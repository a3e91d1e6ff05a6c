"""Benchmark of stage 1: generate -> ingest -> features, with per-step wall time and peak memory.

    python bench/features.py --customers 2000000 [--format parquet|csv] [--workdir DIR] [--reuse-export]

Prints seconds per step, peak RSS of the driver and the JVM, and each step as a ratio of a baseline
measured in the same run (a bare Spark scan + count of the same export), since this machine is
shared and absolute seconds drift. Target (issue #2): ingest + features for 2M customers
(~13M orders) under 60 s on 2 cores within 24 GiB.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import PeakMemory, Timer  # noqa: E402

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
    parser.add_argument("--debug", action="store_true", help="log each ingest phase's seconds")
    args = parser.parse_args()
    if args.debug:
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("pipelines").setLevel(logging.DEBUG)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-"))
    export_dir = workdir / f"export-{args.customers}-{args.format}"
    warehouse = workdir / "warehouse"
    shutil.rmtree(warehouse, ignore_errors=True)
    config = load_config(Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml", [
        f"storage.warehouse={warehouse}", f"source.format={args.format}",
        f"spark.driver_memory={args.driver_memory}", *args.overrides])

    from pipelines.features import run_features
    from datagen.generate import generate
    from pipelines.ingest import run_ingest

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
        source_path = str(export_dir / "orders")
        reader = spark.read.option("header", "true") if args.format == "csv" else spark.read
        with timer.step("baseline: scan+count export", memory):
            n_rows = getattr(reader, args.format)(source_path).count()
        with timer.step("ingest", memory):
            ingest_summary = run_ingest(spark, storage, config.source, config.validation,
                                        config.business.timezone, END_DATE, path=source_path)
        with timer.step("features", memory):
            feature_stats = run_features(storage, END_DATE, config.features, full=True)
    print(ingest_summary)
    print(f"features: {feature_stats.summary_line()}")

    baseline = timer.total("baseline: scan+count export")
    work = timer.total("ingest", "features")
    result = {
        "customers": args.customers, "export_rows": n_rows, "format": args.format,
        "seconds": {name: round(s, 1) for name, s, _ in timer.rows},
        "ingest_plus_features_s": round(work, 1),
        "ingest_plus_features_vs_scan": round(work / baseline, 1) if baseline else None,
        "peak_rss_gib": {"driver": round(max(r[3] for r in timer.peaks) / 1024**3, 2),
                         "jvm": round(max(r[4] for r in timer.peaks) / 1024**3, 2)},
    }
    print(f"\ningest + features: {work:.1f} s = {result['ingest_plus_features_vs_scan']}x the bare scan "
          f"({baseline:.1f} s); target < 60 s for 2M customers")
    print(json.dumps(result))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
