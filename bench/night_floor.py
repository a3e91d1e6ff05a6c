"""The customer-sized passes a regular night makes, each alone: what a night costs at least while every
customer table is a full snapshot for D.

    python bench/night_floor.py --warehouse WORKDIR/run/warehouse [--date 2026-10-01] [--repeats 3]

Reads a warehouse ``bench/pipeline.py --workdir WORKDIR`` leaves (``--date`` featured, scored and
segmented, a champion registered) and writes only to a scratch folder. Per repeat, in one session:

* ``features write``: D's ``customer_features`` rows read and written as a new Delta table partitioned
  like the engine's (the incremental features step's write, with nothing computed);
* ``scoring``: the champion's scores (with intervals) of those rows into Spark's no-op sink (the model's
  compute and the Arrow round trip, nothing written);
* ``scores write``: D's ``customer_scores`` rows read and written the same way;
* ``export rows``: D's scores joined with ``segments_current`` and written as CSV, unsorted and without
  pseudonymised ids (the export's pass without its sort and its HMAC);
* ``read``: D's features and scores rows read whole into the no-op sink (the reads alone).

Printed: seconds per pass (medians over the repeats), their sum, and the session's first (cold) repeat.
The engine's regular night makes each of these passes once (plus the sort of the export, the small
tables and the planning around them), so the sum is a floor for a night that keeps full snapshots.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import champion_session, use_engine_imports, warehouse_arguments  # noqa: E402

use_engine_imports()

PASSES = ("read", "features write", "scoring", "scores write", "export rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", required=True, help="WORKDIR/run/warehouse of a bench/pipeline.py run")
    warehouse_arguments(parser, default_repeats=3)
    args = parser.parse_args(argv)
    from pyspark.sql import functions as F

    import pipelines.ltv as ltv
    from core.tables import CUSTOMER_FEATURES, CUSTOMER_SCORES, SCORES_CARRIED_COLUMNS

    config, bundle, _, spark, storage = champion_session(args)
    bundle = dataclasses.replace(bundle, intervals=config.models.intervals)     # as run_score scores
    at_date = F.col("as_of_date") == F.lit(args.date)
    features_df = storage.read(CUSTOMER_FEATURES).where(at_date)
    scores_df = storage.read(CUSTOMER_SCORES).where(at_date)
    segments_df = storage.read("segments_current").select("customer_id", "segment", "generation_id")
    scratch = Path(tempfile.mkdtemp(prefix="night-floor-"))

    def delta_write(df, name: str, spec) -> None:
        (df.write.format("delta").options(**spec.table_properties).partitionBy(*spec.partition_by)
         .save(str(scratch / name)))

    def export_rows() -> None:
        (scores_df.select("customer_id", "predicted_net_value", "p_alive")
         .join(segments_df, on="customer_id", how="left")
         .select("customer_id", "segment", "generation_id",
                 F.format_string("%.2f", F.col("predicted_net_value")).alias("predicted_value"),
                 F.format_string("%.6f", F.col("p_alive")).alias("p_alive"))
         .write.option("header", False).csv(str(scratch / "export")))

    work = {
        "read": lambda: [df.write.format("noop").mode("overwrite").save() for df in (features_df, scores_df)],
        "features write": lambda: delta_write(features_df, "features", CUSTOMER_FEATURES),
        "scoring": lambda: ltv.score_customers(features_df, bundle, carry=SCORES_CARRIED_COLUMNS)
        .write.format("noop").mode("overwrite").save(),
        "scores write": lambda: delta_write(scores_df, "scores", CUSTOMER_SCORES),
        "export rows": export_rows,
    }
    seconds: dict[str, list[float]] = {name: [] for name in PASSES}
    try:
        for repeat in range(args.repeats):
            for name in PASSES:
                for folder in ("features", "scores", "export"):
                    shutil.rmtree(scratch / folder, ignore_errors=True)
                started = time.perf_counter()
                work[name]()
                seconds[name].append(time.perf_counter() - started)
            print(f"  repeat {repeat + 1}: " + ", ".join(f"{name} {seconds[name][-1]:.1f} s" for name in PASSES),
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    later = {name: statistics.median(values[1:]) if len(values) > 1 else values[0] for name, values in seconds.items()}
    total = sum(v for name, v in median.items() if name != "read")
    print(f"\nat {args.date}, medians of {args.repeats}: " + ", ".join(f"{name} {median[name]:.1f} s" for name in PASSES)
          + f"; the four passes {total:.1f} s (without the cold first repeat "
          f"{sum(v for name, v in later.items() if name != 'read'):.1f} s; cold "
          f"{sum(seconds[name][0] for name in PASSES if name != 'read'):.1f} s)")
    print(json.dumps({"date": args.date.isoformat(), "seconds": seconds, "median": median,
                      "four_passes_median": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
