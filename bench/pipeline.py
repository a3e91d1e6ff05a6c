"""Benchmark of the whole nightly run (`cvseg run`) on a regular night: per-step wall time and peak
memory, without and with a refit.

    python bench/pipeline.py --customers 2000000 [--format parquet|csv] [--workdir DIR] [--reuse-export]

A client's nightly job sees a folder that gains one export file a night. The benchmark builds that:

1. generate the export (seeded; end date E) and split it by order day into the history up to
   E-2 and one file per night for E-1 and E (split time is not counted);
2. setup night E-2 (the first load, reported but not a target): full ingest of the history,
   features, refit (no champion yet), a segment generation cut, a full trend build, export;
3. night E-1 with the day's file added, **no refit** (``--refit never``): ingest reads only the new
   file (``source.new_files_only``), features for all customers, score with the champion, segments
   place the newcomers, trends update incrementally, export;
4. night E with its file added and a **refit** (``--refit always``).

Prints seconds and peak RSS of the driver and the JVM per step, and each night's total as a
ratio of a bare Spark scan + count of the same export (this machine is shared: read the ratios).
Targets (issue #4), 2-core machine, 2M customers: a night without a refit < 3 min, with one < 4 min.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import PeakMemory, Timer, use_engine_imports  # noqa: E402

use_engine_imports()   # bench/models.py must not shadow the engine's models package

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402

END_DATE = dt.date(2026, 9, 30)
SETUP_NIGHT = END_DATE - dt.timedelta(days=2)
NIGHTS = (("no refit", END_DATE - dt.timedelta(days=1), "never"), ("with refit", END_DATE, "always"))


def split_export(spark, export_orders: Path, fmt: str, staging: Path) -> dict[str, int]:
    """History (everything not dated E-1 or E, unparsable dates included) and one folder per night,
    written under ``staging``; returns row counts. The generator's timestamps are local text."""
    from pyspark.sql import functions as F

    reader = spark.read.option("header", "true") if fmt == "csv" else spark.read
    df = getattr(reader, fmt)(str(export_orders))
    day_text = F.substring("order_datetime", 1, 10)
    night_days = {night: day.strftime("%Y/%m/%d") for _, night_date, _ in NIGHTS
                  for night, day in [(night_date.isoformat(), night_date)]}
    counts = {}
    parts = {"history": ~F.coalesce(day_text.isin(*night_days.values()), F.lit(False))}
    parts.update({night: F.coalesce(day_text == text, F.lit(False)) for night, text in night_days.items()})
    for name, condition in parts.items():
        part_df = df.where(condition)
        if name != "history":
            part_df = part_df.coalesce(1)
        writer = part_df.write.mode("overwrite")
        (writer.option("header", "true").csv if fmt == "csv" else writer.parquet)(str(staging / name))
        counts[name] = spark.read.option("header", "true").csv(str(staging / name)).count() if fmt == "csv" \
            else spark.read.parquet(str(staging / name)).count()
    return counts


def drop_files(staging_part: Path, source_dir: Path, prefix: str) -> int:
    """Put a staged part folder's data files into the source folder, as a client's upload would
    (hard links: each backend's run gets the same files)."""
    source_dir.mkdir(parents=True, exist_ok=True)
    moved = 0
    for f in sorted(staging_part.iterdir()):
        if f.name.startswith(("_", ".")):
            continue
        os.link(f, source_dir / f"{prefix}-{f.name}")
        moved += 1
    return moved


def print_side_by_side(by_backend: dict[str, dict[str, float]], labels: list[str]) -> None:
    """Per-step seconds of each night, one column per backend (same export, same session)."""
    names = list(by_backend)
    print("\n| night: step | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for label in labels:
        steps = [k for k in next(iter(by_backend.values())) if k.startswith(f"{label}: ")]
        for step in steps + [f"night {label}"]:
            cells = " | ".join(f"{by_backend[n].get(step, float('nan')):.1f}" for n in names)
            print(f"| {step} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--reuse-export", action="store_true", help="skip generate if the export exists")
    parser.add_argument("--driver-memory", default="12g")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--backends", default=None,
                        help="comma-separated storage backends run one after another on the same export in one "
                             "session (e.g. delta-spark,deltalake); default: storage.backend of the config")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-pipeline-"))
    export_dir = workdir / f"export-{args.customers}-{args.format}"
    staging = workdir / "staging"
    shutil.rmtree(staging, ignore_errors=True)

    def config_for(backend: str | None):
        """Each backend gets its own warehouse, source folder and export folder."""
        base = workdir / (backend or "run")
        shutil.rmtree(base, ignore_errors=True)
        extra = [f"storage.backend={backend}"] if backend else []
        return base / "source" / "orders", load_config(
            Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml", [
                f"storage.warehouse={base / 'warehouse'}", f"source.format={args.format}",
                f"source.path={base / 'source' / 'orders'}", f"export.dest={base / 'exports'}",
                f"spark.driver_memory={args.driver_memory}", *args.overrides, *extra])

    backends = args.backends.split(",") if args.backends else [None]
    config = config_for(backends[0])[1]

    from datagen.generate import generate
    from pipelines.nightly import run_nightly

    timer = Timer()
    print(f"customers={args.customers:,} format={args.format} workdir={workdir}")
    with PeakMemory() as memory:
        with timer.step("spark session start", memory):
            spark = build_spark(config.spark, config.storage.warehouse)
        if not (args.reuse_export and (export_dir / "true_params.json").exists()):
            with timer.step("generate", memory):
                summary = generate(spark, n_customers=args.customers, seed=args.seed, end_date=END_DATE,
                                   out_dir=str(export_dir), fmt=args.format)
            print(f"  export rows: {summary['n_rows']:,}")
        reader = spark.read.option("header", "true") if args.format == "csv" else spark.read
        with timer.step("baseline: scan+count export", memory):
            n_rows = getattr(reader, args.format)(str(export_dir / "orders")).count()
        with timer.step("split export by night (setup)", memory):
            counts = split_export(spark, export_dir / "orders", args.format, staging)
        print(f"  rows: {counts}")

        nights = [("setup", SETUP_NIGHT, "auto", "history")] + [
            (label, day, refit, day.isoformat()) for label, day, refit in NIGHTS]
        runs = {}
        by_backend = {}
        for backend in backends:
            source_dir, config = config_for(backend)
            storage = Storage(spark, config.storage.warehouse, config.storage.backend)
            tag = f"[{storage.backend}] " if len(backends) > 1 else ""
            for label, day, refit, part in nights:
                drop_files(staging / part, source_dir, part)
                print(f"\n-- {tag}nightly run {day} ({label}; refit {refit}) --")
                with timer.step(f"{tag}night {label}"):   # memory peaks are taken per step inside
                    runs[label] = run_nightly(
                        spark, storage, config, day, refit=refit,
                        step_hook=lambda name, label=label: timer.step(f"  {tag}{label}: {name}", memory),
                        progress=lambda line: print(line, flush=True))
            by_backend[storage.backend] = {name.strip().removeprefix(tag): round(s, 1)
                                           for name, s, _ in timer.rows if name.strip().startswith(tag)}
    if len(backends) > 1:
        print_side_by_side(by_backend, [label for label, *_ in nights])
        print(json.dumps({"customers": args.customers, "seconds_by_backend": by_backend}))
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    baseline = timer.total("baseline: scan+count export")
    steps = {name.strip(): round(s, 1) for name, s, _ in timer.rows}
    peaks = {name.strip(): {"driver_gib": round(d / 1024**3, 2), "jvm_gib": round(j / 1024**3, 2)}
             for name, _, _, d, j in timer.peaks}
    labels = [label for label, *_ in nights]
    result = {
        "customers": args.customers, "export_rows": n_rows, "night_rows": counts, "format": args.format,
        "seconds": steps, "peak_rss": peaks,
        "peak_rss_night_gib": {k: {"driver": max(v["driver_gib"] for n, v in peaks.items() if n.startswith(k)),
                                   "jvm": max(v["jvm_gib"] for n, v in peaks.items() if n.startswith(k))}
                               for k in labels},
        "night_s": {k: steps[f"night {k}"] for k in labels},
        "vs_scan": {k: round(steps[f"night {k}"] / baseline, 1) if baseline else None for k in labels},
        "refit_seconds": runs["with refit"].outcome("score").details.get("refit_seconds"),
        "export_rows_written": runs["with refit"].outcome("export").details["rows"],
    }
    print(f"\nbare scan of the export {baseline:.1f} s; setup night (first load) {steps['night setup']:.1f} s "
          f"({result['vs_scan']['setup']}x)")
    print(f"regular night: without a refit {steps['night no refit']:.1f} s ({result['vs_scan']['no refit']}x the "
          f"scan), with a refit {steps['night with refit']:.1f} s ({result['vs_scan']['with refit']}x); "
          "targets at 2M customers: < 180 s without, < 240 s with")
    print(json.dumps(result))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
