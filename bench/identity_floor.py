"""The least work identity resolution needs at a first load (issue #20), against the baseline first
load measured in the same run: is the 1.15x budget above what any method costs here?

    python bench/identity_floor.py --export DIR [--workdir DIR]

``DIR``: a two-source export (`cvseg generate --sources ec,store`, parquet; `bench/identity.py
--workdir W` leaves one in ``W/sources-<customers>-<overlap>``). In one session:

* **baseline**: both sources ingested without matching keys, then features (as `bench/identity.py`'s
  baseline): the denominator;
* the **skeleton passes**, each a bare Spark job with nothing computed that is not needed, run twice
  (cold, warm):
  - ``pairs <source>``: the source's distinct (customer id, key type, raw key) pairs, from the
    export's id, e-mail and phone columns (no normalisation, no HMAC): what matching must read;
  - ``source ids``: every stored source id with its first order date (a group-by of the orders):
    every id needs a unified id, with keys or without;
  - ``keys by key``: the pairs of both sources brought together by key, holders counted (the
    shuffle that finds which ids share a key);
  - ``one shuffle``: the same answer straight from both exports' rows (exploded, grouped by key,
    each key's holders as a set): pairs and grouping in one exchange;
  - ``write keys`` / ``write map``: the pairs (each key as its SHA-256, the size of the stored
    HMAC; no clear key is written) and the source ids written as Delta tables (the tables identity
    must leave: ``identity_keys``, ``identity_map``).

Prints each pass and two floors as a share of the baseline: the engine's design (pairs per source,
then keys by key from the stored keys) and a one-shuffle design. A floor above 1.15x means no
method of that shape can meet the budget on this machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from functools import reduce
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import PeakMemory, Timer, use_engine_imports  # noqa: E402

use_engine_imports()

from pyspark.sql import DataFrame  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402

END_DATE = dt.date(2026, 9, 30)
KEY_TYPES = ("email", "phone")


def key_rows(spark, source) -> DataFrame:
    """(source_name, customer_id, key_type, raw) of every export row's e-mail and phone (not null)."""
    columns = source.columns.model_dump()
    pairs = F.array(*[F.struct(F.lit(key_type).alias("key_type"), F.col(columns[key_type]).alias("raw"))
                      for key_type in KEY_TYPES])
    return (spark.read.parquet(source.path)
            .select(F.lit(source.name).alias("source_name"), F.col(columns["customer_id"]).alias("customer_id"),
                    F.inline(pairs))
            .where(F.col("raw").isNotNull()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="a two-source export folder holding sources.yaml")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--driver-memory", default="12g")
    args = parser.parse_args()

    from pipelines.features import run_features
    from pipelines.identity import source_customer_ids
    from pipelines.ingest import run_ingest

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-identity-floor-"))
    conf_path = Path(args.export) / "sources.yaml"
    timer, memory = Timer(), PeakMemory()
    with memory:
        with timer.step("spark session start", memory):
            base = load_config(None, [f"spark.driver_memory={args.driver_memory}"])
            spark = build_spark(base.spark, str(workdir / "warehouses"))
        shutil.rmtree(workdir / "wh-baseline", ignore_errors=True)
        config = load_config(conf_path, ["source.format=parquet", "validation.future_cutoff=2027-12-31",
                                         "storage.backend=delta-spark", "identity.match_on=[]",
                                         "source.columns.email=null", "source.columns.phone=null",
                                         f"storage.warehouse={workdir / 'wh-baseline'}"])
        storage = Storage(spark, str(workdir / "wh-baseline"), backend="delta-spark")
        with timer.step("baseline: first load ingest", memory):
            for source in config.order_sources:   # as bench/identity.py's baseline: each source on its own
                run_ingest(spark, storage, source, config.validation, config.business.timezone, END_DATE,
                           order_id_prefix=f"{source.name}:")
        with timer.step("baseline: first load features", memory):
            run_features(storage, END_DATE, config.features)

        keyed = load_config(conf_path, ["source.format=parquet"])
        passes: dict[str, list[float]] = {}

        def timed(name: str, action) -> None:
            for attempt in ("cold", "warm"):
                with timer.step(f"{name} ({attempt})", memory):
                    action()
            passes[name] = [timer.total(f"{name} (cold)"), timer.total(f"{name} (warm)")]

        pairs = {}
        for source in keyed.order_sources:
            timed(f"pairs {source.name}", lambda s=source: key_rows(spark, s).distinct().count())
            pairs[source.name] = key_rows(spark, source).distinct().localCheckpoint()
        all_pairs_df = reduce(DataFrame.unionByName, pairs.values())
        ids_df = source_customer_ids(storage.read("orders"))   # what the full resolution reads
        timed("source ids", ids_df.count)
        timed("keys by key", lambda: all_pairs_df.groupBy("key_type", "raw").count()
              .where(F.col("count") > 1).count())

        def one_shuffle() -> int:
            rows_df = reduce(DataFrame.unionByName, [key_rows(spark, source) for source in keyed.order_sources])
            holder = F.struct("source_name", "customer_id")
            return (rows_df.groupBy("key_type", "raw").agg(F.collect_set(holder).alias("holders"))
                    .where(F.size("holders") > 1).count())
        timed("one shuffle", one_shuffle)

        # the stored form: a hash of the key (identity_keys holds 64 hex characters), never the clear
        # text, also when the export is a client's
        hashed_df = all_pairs_df.select("source_name", "customer_id", "key_type",
                                       F.sha2(F.concat_ws(":", "key_type", "raw"), 256).alias("key_hash"))
        timed("write keys", lambda: hashed_df.write.format("delta").mode("overwrite").save(str(workdir / "floor-keys")))
        timed("write map", lambda: ids_df.write.format("delta").mode("overwrite").save(str(workdir / "floor-map")))
    spark.stop()

    baseline = timer.total("baseline: first load ingest", "baseline: first load features")
    warm = {name: seconds[1] for name, seconds in passes.items()}
    pair_names = [f"pairs {s.name}" for s in keyed.order_sources]
    engine_design = sum(warm[n] for n in pair_names) + warm["source ids"] + warm["keys by key"]
    one_shuffle_design = warm["one shuffle"] + warm["source ids"]
    writes = warm["write keys"] + warm["write map"]
    summary = {
        "baseline_seconds": round(baseline, 1),
        "passes_cold_warm": {name: [round(s, 1) for s in seconds] for name, seconds in passes.items()},
        "floor_engine_design": round((baseline + engine_design + writes) / baseline, 3),
        "floor_one_shuffle": round((baseline + one_shuffle_design + writes) / baseline, 3),
        "budget": 1.15,
    }
    print("\npass (cold / warm s):")
    for name, (cold, hot) in passes.items():
        print(f"  {name:<14} {cold:7.1f} / {hot:7.1f}")
    print(f"baseline first load (ingest + features) {baseline:.1f} s; budget 1.15x = +{0.15 * baseline:.1f} s")
    print(f"floor, the engine's design (pairs per source, keys by key, source ids, two writes): "
          f"+{engine_design + writes:.1f} s = {summary['floor_engine_design']}x")
    print(f"floor, one shuffle (pairs and grouping together, source ids, two writes): "
          f"+{one_shuffle_design + writes:.1f} s = {summary['floor_one_shuffle']}x")
    print(json.dumps(summary))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("CVSEG_EXPORT_HMAC_KEY", "bench-identity-key")
    main()
