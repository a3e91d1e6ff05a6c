"""Benchmark of the identity step (issue #20): what one customer across two sources costs.

    python bench/identity.py --customers 2000000 [--overlap 0.2] [--workdir DIR] [--reuse-export]
    python bench/identity.py --customers 20000          # a smoke run

Generates two sources (`cvseg generate --sources ec,store`, parquet), then in one session:
* baseline first load: both sources ingested without matching keys and without the identity step,
  then features (what the engine did before: orders read as stored);
* identity first load: the same exports with `identity.match_on: [email, phone]`: ingest (with the
  hashing pass), the identity step, features on the unified id;
* a regular night on each warehouse: one new small file per source (new order ids, new and known
  customers), ingest (+ identity) and features.
Prints seconds per step and the identity runs as ratios of the baselines measured in the same run
(this machine is shared: absolute seconds drift). Targets: the first load at most 1.15x the
baseline, a regular night at most 5 s more. ``--with-trends`` adds the trends step to every load and
night on both warehouses and reports the totals with it too: with identity it also writes
``trend_channel_sets``, an aggregate of the customer features (segments are not cut here, so the
segment trend counts everyone as unsegmented on both sides).
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

use_engine_imports()

from pyspark.sql import functions as F  # noqa: E402

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402

END_DATE = dt.date(2026, 9, 30)
NIGHT = END_DATE + dt.timedelta(days=1)
# a night's customers: new source ids with new keys, new source ids linked by known keys (see _night_file)
NEW_SHARE, LINKED_SHARE = 0.05, 0.01


def _night_file(spark, source_path: str, out: Path, share: float, seed: int, night: dt.date = NIGHT,
                new_share: float = NEW_SHARE, linked_share: float = LINKED_SHARE) -> None:
    """A regular night's file: a sample of the source's rows with new order ids, dated ``night``.
    The customers of about ``new_share`` of the rows come back as new source ids with an e-mail
    nobody holds and no phone (new customers: new ids and new keys for the identity step), about
    ``linked_share`` as new source ids with the e-mail and phone of the customer they were
    sampled from (a second account: tonight's keys link it to that customer, the incremental
    resolution's linking path); the rest are known customers."""
    rows_df = spark.read.parquet(source_path)
    bucket = F.abs(F.xxhash64("customer_id", F.lit(seed))) % 1000   # by customer: all of its rows alike
    new_bound, linked_bound = round(new_share * 1000), round((new_share + linked_share) * 1000)
    tag = f"{night:%Y%m%d}"
    (rows_df.sample(fraction=share, seed=seed)
     .withColumn("_kind", F.when(bucket < new_bound, "new").when(bucket < linked_bound, "linked"))
     .withColumn("customer_id", F.when(F.col("_kind").isNotNull(), F.concat(F.lit(f"N{tag}-"), F.col("customer_id")))
                 .otherwise(F.col("customer_id")))
     .withColumn("email", F.when(F.col("_kind") == "new", F.concat(F.lit(f"n{tag}."), F.col("email")))
                 .otherwise(F.col("email")))
     .withColumn("phone", F.when(F.col("_kind") == "new", F.lit(None).cast("string")).otherwise(F.col("phone")))
     .drop("_kind")
     .withColumn("order_id", F.concat(F.lit(f"N{tag}-"), F.col("order_id")))
     .withColumn("order_datetime", F.lit(f"{night:%Y/%m/%d} 10:00:00"))
     .coalesce(1).write.mode("overwrite").parquet(str(out)))


def _ingest(spark, storage, config, day: dt.date, with_identity: bool):
    """Every source of ``config``: with identity as the engine runs it (the result), or as before
    identity existed, each source on its own (None)."""
    from pipelines.ingest import run_ingest
    from pipelines.sources import run_sources

    if with_identity:
        return run_sources(spark, storage, config, day)
    for source in config.order_sources:
        run_ingest(spark, storage, source, config.validation, config.business.timezone, day,
                   order_id_prefix=f"{source.name}:")
    return None


def _configs(conf_path: Path, workdir: Path) -> dict:
    common = ["source.format=parquet", "validation.future_cutoff=2027-12-31", "storage.backend=delta-spark"]
    return {
        # before identity: the exports as they are, no keys read, orders read as stored
        "baseline": load_config(conf_path, common + ["identity.match_on=[]", "source.columns.email=null",
                                                     "source.columns.phone=null",
                                                     f"storage.warehouse={workdir / 'wh-baseline'}"]),
        "identity": load_config(conf_path, common + [f"storage.warehouse={workdir / 'wh-identity'}"]),
    }


def _more_nights(spark, workdir: Path, conf_path: Path, args, timer: Timer, memory: PeakMemory) -> None:
    """Regular nights on the warehouses an earlier run left, baseline and identity alternating
    which goes first: the median added seconds is what a client's night pays."""
    from pipelines.features import run_features
    from pipelines.trends import run_trends

    configs = _configs(conf_path, workdir)
    storages = {name: Storage(spark, str(workdir / f"wh-{name}"), backend="delta-spark") for name in configs}
    last = max(r[0] for storage in storages.values()   # after the nights an earlier call ran
               for r in storage.read("features_runs").select("as_of_date").collect())
    added = []
    for index in range(args.more_nights):
        night = last + dt.timedelta(days=index + 1)
        seconds = {}
        for name in (("baseline", "identity") if index % 2 == 0 else ("identity", "baseline")):
            config, storage = configs[name], storages[name]
            paths = {}
            for source in config.order_sources:
                out = workdir / f"night-{name}-{source.name}-{night:%Y%m%d}"
                # seeded by the date: a later call's nights sample other customers (the same seeds
                # would link the same customers again, night after night, until their keys are too
                # common and the step resolves every id)
                _night_file(spark, source.path, out, args.night_share, args.seed + (night - END_DATE).days, night)
                paths[source.name] = str(out)
            night_config = config.model_copy(update={"sources": tuple(
                s.model_copy(update={"path": paths[s.name]}) for s in config.sources)})
            with timer.step(f"{night} {name}: ingest", memory):
                result = _ingest(spark, storage, night_config, night, with_identity=name == "identity")
                if result is not None:
                    print(result.identity)
            with timer.step(f"{night} {name}: features", memory):
                stats = run_features(storage, night, night_config.features)
            steps = [f"{night} {name}: ingest", f"{night} {name}: features"]
            if args.with_trends:
                with timer.step(f"{night} {name}: trends", memory):
                    run_trends(storage, night, night_config.trends)
                steps.append(f"{night} {name}: trends")
            seconds[name] = timer.total(*steps)
            print(f"  {night} {name}: {seconds[name]:.1f} s, features {stats.mode}")
        added.append(seconds["identity"] - seconds["baseline"])
    ordered = sorted(added)
    median = ordered[len(ordered) // 2] if len(ordered) % 2 else sum(ordered[len(ordered) // 2 - 1:][:2]) / 2
    print(f"\nregular nights: identity added {', '.join(f'{a:+.1f}' for a in added)} s; median {median:+.1f} s "
          "(target <= +5 s)")
    print(json.dumps({"customers": args.customers, "nights_added_seconds": [round(a, 1) for a in added],
                      "median_added_seconds": round(median, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--night-share", type=float, default=0.001, help="rows of each source in a night's file")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--reuse-export", action="store_true", help="skip generate if the export exists")
    parser.add_argument("--driver-memory", default="12g")
    parser.add_argument("--with-trends", action="store_true",
                        help="also run the trends step after features on every load and night (see above)")
    parser.add_argument("--more-nights", type=int, default=0,
                        help="with --reuse-export and the warehouses of an earlier run in --workdir: skip the first "
                             "loads and run this many more regular nights on each, alternating which goes first")
    args = parser.parse_args()

    from pipelines.features import run_features
    from pipelines.trends import run_trends
    from datagen.generate import generate_sources

    os.environ.setdefault("CVSEG_EXPORT_HMAC_KEY", "bench-identity-key")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-identity-"))
    export_dir = workdir / f"sources-{args.customers}-{args.overlap}"
    timer, memory = Timer(), PeakMemory()
    print(f"customers={args.customers:,} overlap={args.overlap} workdir={workdir}")
    with memory:
        with timer.step("spark session start", memory):
            base = load_config(None, [f"spark.driver_memory={args.driver_memory}"])
            spark = build_spark(base.spark, str(workdir / "warehouses"))
        if not (args.reuse_export and (export_dir / "sources.yaml").exists()):
            with timer.step("generate", memory):
                generate_sources(spark, args.customers, args.seed, END_DATE, str(export_dir), overlap=args.overlap,
                                 fmt="parquet")
        conf_path = export_dir / "sources.yaml"
        if args.more_nights:
            _more_nights(spark, workdir, conf_path, args, timer, memory)
            spark.stop()
            return
        common = ["source.format=parquet", f"validation.future_cutoff={NIGHT}", "storage.backend=delta-spark"]
        setups = {
            # before identity: the exports as they are, no keys read, orders read as stored
            "baseline": common + ["identity.match_on=[]", "source.columns.email=null", "source.columns.phone=null"],
            "identity": common,
        }
        for name in setups:
            shutil.rmtree(workdir / f"wh-{name}", ignore_errors=True)
        results = {}
        for name, overrides in setups.items():
            config = load_config(conf_path, overrides + [f"storage.warehouse={workdir / f'wh-{name}'}"])
            storage = Storage(spark, str(workdir / f"wh-{name}"), backend="delta-spark")
            with timer.step(f"{name}: first load ingest", memory):
                result = _ingest(spark, storage, config, END_DATE, with_identity=name == "identity")
                if result is not None:
                    results["first"] = result
            with timer.step(f"{name}: first load features", memory):
                run_features(storage, END_DATE, config.features)
            if args.with_trends:
                with timer.step(f"{name}: first load trends", memory):
                    run_trends(storage, END_DATE, config.trends)
            night_sources = []
            for source in config.order_sources:
                night = workdir / f"night-{name}-{source.name}"
                _night_file(spark, source.path, night, args.night_share, args.seed)
                night_sources.append({"name": source.name, "path": str(night)})
            # the same conf with each source's path on its night file (a client's new daily file)
            night_config = config.model_copy(update={"sources": tuple(
                s.model_copy(update={"path": n["path"]}) for s, n in zip(config.sources, night_sources))})
            with timer.step(f"{name}: night ingest", memory):
                result = _ingest(spark, storage, night_config, NIGHT, with_identity=name == "identity")
                if result is not None:
                    results["night"] = result
            with timer.step(f"{name}: night features", memory):
                results[f"{name}_night_features"] = run_features(storage, NIGHT, night_config.features)
            if args.with_trends:
                with timer.step(f"{name}: night trends", memory):
                    run_trends(storage, NIGHT, night_config.trends)
    first_base = timer.total("baseline: first load ingest", "baseline: first load features")
    first_id = timer.total("identity: first load ingest", "identity: first load features")
    night_base = timer.total("baseline: night ingest", "baseline: night features")
    night_id = timer.total("identity: night ingest", "identity: night features")
    print(results.get("first"))
    print(results.get("night"))
    summary = {
        "customers": args.customers, "overlap": args.overlap,
        "seconds": {name: round(s, 1) for name, s, _ in timer.rows},
        "first_load_ratio": round(first_id / first_base, 3),
        "night_added_seconds": round(night_id - night_base, 1),
        "night_features_modes": {k: v.mode for k, v in results.items() if k.endswith("_night_features")},
    }
    print(f"\nfirst load: identity {first_id:.1f} s vs baseline {first_base:.1f} s = {summary['first_load_ratio']}x "
          f"(target <= 1.15x); regular night: {night_id:.1f} vs {night_base:.1f} s = "
          f"{summary['night_added_seconds']:+.1f} s (target <= +5 s)")
    if args.with_trends:
        first = {name: timer.total(f"{name}: first load ingest", f"{name}: first load features",
                                   f"{name}: first load trends") for name in setups}
        nights = {name: timer.total(f"{name}: night ingest", f"{name}: night features", f"{name}: night trends")
                  for name in setups}
        summary["with_trends"] = {"first_load_ratio": round(first["identity"] / first["baseline"], 3),
                                  "night_added_seconds": round(nights["identity"] - nights["baseline"], 1),
                                  "trends_seconds": {k: v for k, v in summary["seconds"].items() if "trends" in k}}
        print(f"with trends: first load {first['identity']:.1f} vs {first['baseline']:.1f} s = "
              f"{summary['with_trends']['first_load_ratio']}x; regular night {nights['identity']:.1f} vs "
              f"{nights['baseline']:.1f} s = {summary['with_trends']['night_added_seconds']:+.1f} s")
    print(json.dumps(summary))
    spark.stop()
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
