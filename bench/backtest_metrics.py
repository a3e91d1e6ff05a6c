"""Benchmark of the backtest's predictions + metrics step, two ways in the same run on the same fits:

* per model: every model's ranks by realised value from its own rows (tie groups of N x models rows)
  and a join of the predictions back to them for Spearman (the engine's path before 2026-12-05);
* once per origin: the realised values' tie groups from the N holdout rows, each customer's rank
  looked up inside the scoring UDF, Spearman from the predicted tie groups' sums (the backtest's path).

    python bench/backtest_metrics.py --warehouse DIR [--as-of 2026-09-30] [--rounds 2]

The warehouse needs ``orders`` (e.g. ``bench/pipeline.py``'s, 2M customers); the calibration at
D - 6 months is built there when absent (timed apart, not in the comparison). The models are the
configured BTYD models on both bases plus the naive baseline (no cohort, no hybrid: their fits are
not what is measured). Rounds alternate the two ways; the metrics of both must agree. Read the ratio:
the machine is shared.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import use_engine_imports  # noqa: E402

use_engine_imports()

from pyspark import StorageLevel  # noqa: E402

from core.config import load_config  # noqa: E402
from core.dates import add_months  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warehouse", required=True)
    parser.add_argument("--as-of", type=dt.date.fromisoformat, default=dt.date(2026, 9, 30))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from pipelines.backtest import fit_origin_models, predict_all
    from pipelines.backtest.metrics import actual_tie_groups, collect_actual_ranks, compute_metrics
    from pipelines.backtest.runner import ensure_calibration

    config = load_config(None, [f"storage.warehouse={args.warehouse}", "storage.backend=delta-spark",
                                "models.compare_cohort=false", "models.hybrid.enabled=false", *args.overrides])
    spark = build_spark(config.spark, args.warehouse)
    storage = Storage(spark, args.warehouse, config.storage.backend)
    cutoff = add_months(args.as_of, -config.models.horizon_months)
    started = time.perf_counter()
    holdout_df, reused = ensure_calibration(storage, cutoff, config)
    holdout_df = holdout_df.persist(StorageLevel.MEMORY_AND_DISK)
    customers = holdout_df.count()
    print(f"calibration at {cutoff}: {customers:,} customers ({'reused' if reused else 'built'}) "
          f"{time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    bundles = fit_origin_models(holdout_df, None, config).bundles
    print(f"fits: {len(bundles)} models ({', '.join(bundles)}) {time.perf_counter() - started:.1f} s")

    def per_model():
        predictions = predict_all(holdout_df, bundles, config.models.intervals).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            return compute_metrics(predictions)
        finally:
            predictions.unpersist()

    def once_per_origin():
        groups = actual_tie_groups(holdout_df).persist(StorageLevel.MEMORY_AND_DISK)
        predictions = predict_all(holdout_df, bundles, config.models.intervals,
                                  collect_actual_ranks(groups)).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            return compute_metrics(predictions, groups)
        finally:
            predictions.unpersist()
            groups.unpersist()

    seconds: dict[str, list[float]] = {"per model": [], "once per origin": []}
    results = {}
    for round_number in range(1, args.rounds + 1):
        for name, run in (("per model", per_model), ("once per origin", once_per_origin)):
            started = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - started)
            print(f"round {round_number} {name:<16} {seconds[name][-1]:7.1f} s", flush=True)
    before, after = (results[k][0].set_index("model").sort_index() for k in ("per model", "once per origin"))
    numeric = before.select_dtypes("number").columns
    worst = float(((after[numeric] - before[numeric]).abs() / before[numeric].abs().clip(lower=1e-12))
                  .max().max())
    best = {k: min(v) for k, v in seconds.items()}
    print(f"\n{customers:,} customers x {len(bundles)} models: predictions + metrics per model "
          f"{best['per model']:.1f} s, once per origin {best['once per origin']:.1f} s "
          f"({best['once per origin'] / best['per model']:.2f}x; best of {args.rounds} each)")
    print(f"largest relative difference between the two ways' metrics: {worst:.2e}")
    print(after[["spearman", "normalized_gini", "top20_capture", "mae"]].to_string())


if __name__ == "__main__":
    main()
