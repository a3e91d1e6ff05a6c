"""What the value intervals cost: scoring N customers with and without them, in the same run.

    python bench/intervals.py --customers 2000000 [--workdir DIR] [--repeats 2] [--purchase-model paretonbd]
                              [--sink delta|parquet] [--hybrid]

The customers' features (frequency, recency, T, monetary value, orders and cancellations, in days)
are simulated in numpy from the generator's default BG/NBD + Gamma-Gamma parameters
(``datagen.generate.GeneratorParams``: first orders uniform over 5 years, ~6.5% cancelled orders)
and written once as parquet (kept in ``--workdir`` and reused); ingest and features are not what is
measured. A BG/NBD (``--purchase-model``: MBG/NBD, Pareto/NBD) + Gamma-Gamma + cancellation bundle is fitted on them with the engine's
``fit_btyd_bundles``, then the engine's ``score_customers`` runs over every customer and the scores
are written, alternately without (``models.intervals: false``) and with intervals, ``--repeats``
times each (``--hybrid``: a :class:`models.hybrid.HybridBundle` on that BTYD bundle, its trees fitted on
a 200k sample of the customers with a simulated next-six-months value, so the scoring also runs the
trees and the interval is the base's rescaled): ``--sink delta`` (default) as ``cvseg score`` writes them (``scores_table_rows`` into the
``customer_scores`` partition of the date, through the engine's ``Storage`` on delta-spark, with the
table's properties), ``--sink parquet`` as plain parquet files (no table, no commit). Reported: seconds per run,
the median of each and their ratio (the issue's target: at most 1.5x), plus the cost per
customer of ``ScoringBundle.predict`` on a 200k sample (no Spark). The machine is shared: read the
ratio, measured in the same session minutes apart, rather than the absolute seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import use_engine_imports  # noqa: E402

use_engine_imports()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402


def simulate_features(n: int, seed: int, chunk: int = 500_000) -> pd.DataFrame:
    """BG/NBD + Gamma-Gamma customer statistics (days, yen), as customer_features holds them."""
    from datagen.generate import GeneratorParams

    params = GeneratorParams()
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        T = rng.integers(1, params.history_days, m).astype(float)
        lam = rng.gamma(params.r, 1.0 / params.alpha, m)
        drop = rng.beta(params.a, params.b, m)
        repeats = np.minimum(rng.geometric(drop), rng.poisson(lam * T))
        arrivals = rng.poisson(lam * T)
        x = np.minimum(repeats, arrivals).astype(float)
        recency = np.where(x > 0, np.round(T * rng.beta(np.maximum(x, 1), np.maximum(arrivals - x + 1, 1))), 0.0)
        nu = rng.gamma(params.spend_q, 1.0 / params.spend_v, m)
        monetary = np.where(x > 0, rng.gamma(params.spend_p * np.maximum(x, 1), 1.0) / nu / np.maximum(x, 1), 0.0)
        n_orders = x + 1
        n_cancelled = rng.binomial(n_orders.astype(int), 0.065).astype(float)
        since = T - recency
        parts.append(pd.DataFrame({
            "customer_id": [f"C{start + i}" for i in range(m)], "frequency": x, "recency": recency, "T": T,
            "monetary_value": monetary, "n_orders": n_orders, "n_cancelled": n_cancelled,
            "net_6m": np.where(since < 183, monetary, 0.0), "acquisition_channel": "web",
            # what the hybrid's trees read besides (models.hybrid.BEHAVIOUR_COLUMNS), derived coarsely
            "n_purchase_days": n_orders, "avg_order_value": monetary, "cancel_rate_count": n_cancelled / n_orders,
            "cancel_rate_amount": n_cancelled / n_orders,
            "gap_mean_days": np.where(x > 0, recency / np.maximum(x, 1), np.nan), "gap_std_days": np.nan,
            "orders_3m": (since < 91).astype(float), "net_3m": np.where(since < 91, monetary, 0.0),
            "orders_6m": (since < 183).astype(float), "first_category": "food"}))
    return pd.concat(parts, ignore_index=True)


def hybrid_on(btyd, features_df, seed: int, rows: int = 200_000):
    """A HybridBundle on ``btyd``: trees fitted on ``rows`` customers, the target their BTYD value times
    gamma noise (what the trees learn does not matter here, only what scoring them costs)."""
    from models.hybrid import HybridBundle, HybridValueModel, design_matrix

    started = time.perf_counter()
    sample = features_df.limit(rows).toPandas()
    design = design_matrix(sample, btyd)
    target = design["btyd_net_value"].to_numpy() * np.random.default_rng(seed).gamma(2.0, 0.5, len(sample))
    trees = HybridValueModel().fit(design, target)
    print(f"hybrid trees fitted on {len(sample):,} customers in {time.perf_counter() - started:.1f} s")
    return HybridBundle(btyd=btyd, trees=trees, metadata={"training_cutoff": "2026-03-31"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/cvseg-bench-intervals")
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--purchase-model", default="bgnbd", choices=("bgnbd", "mbgnbd", "paretonbd"),
                        help="the bundle's purchase model (the simulated customers stay BG/NBD)")
    parser.add_argument("--sink", default="delta", choices=("delta", "parquet"),
                        help="delta: the customer_scores table as `cvseg score` writes it; parquet: plain files")
    parser.add_argument("--hybrid", action="store_true", help="score with a hybrid bundle on the BTYD bundle")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    features_path = workdir / f"features-v2-{args.customers}-seed{args.seed}"   # v2: with the hybrid's inputs
    scratch = workdir / "scores"
    if not features_path.exists():
        started = time.perf_counter()
        features_path.mkdir(parents=True)
        simulate_features(args.customers, args.seed).to_parquet(features_path / "part-0.parquet", index=False)
        print(f"simulated {args.customers:,} customers' features in {time.perf_counter() - started:.1f} s")
    config = load_config(Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml", [
        f"storage.warehouse={workdir / 'warehouse'}", f"spark.driver_memory={args.driver_memory}"])

    import datetime as dt

    from core.storage import Storage
    from core.tables import CUSTOMER_SCORES
    from pipelines.ltv import fit_btyd_bundles, score_customers, scores_table_rows

    spark = build_spark(config.spark, str(workdir / "warehouse"))
    as_of = dt.date(2026, 9, 30)

    def write_scores(scored_bundle, target: Path) -> Storage | None:
        """The scores into a new table (a new warehouse folder each time: Delta's log cache never sees
        a table deleted under it) or a new parquet folder."""
        scores_df = score_customers(features_df, scored_bundle)
        if args.sink == "parquet":
            scores_df.write.parquet(str(target))
            return None
        storage = Storage(spark, str(target), backend="delta-spark")
        rows_df = scores_table_rows(scores_df, as_of, scored_bundle.value_model, "bench", scored_bundle.horizon_months)
        storage.replace_partitions(CUSTOMER_SCORES, rows_df, partitions={"as_of_date": [as_of]})
        return storage

    features_df = spark.read.parquet(str(features_path)).cache()
    print(f"customers: {features_df.count():,}")
    started = time.perf_counter()
    bundle = fit_btyd_bundles(features_df, (args.purchase_model,), "days").bundles[args.purchase_model]
    print(f"fit {time.perf_counter() - started:.1f} s; params {bundle.describe()['purchase_params']}; "
          f"covariance stored: {bundle.purchase.fit_info_.get('log_param_covariance') is not None}")
    if args.hybrid:
        bundle = hybrid_on(bundle, features_df, args.seed)

    shutil.rmtree(scratch, ignore_errors=True)
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    for repeat in range(args.repeats):
        for variant in ("without", "with"):
            scored = dataclasses.replace(bundle, intervals=variant == "with")
            target = scratch / f"{repeat}-{variant}"
            started = time.perf_counter()
            storage = write_scores(scored, target)
            seconds[variant].append(time.perf_counter() - started)
            print(f"  run {repeat + 1} {variant:>7} intervals: {seconds[variant][-1]:.1f} s")
    median = {k: statistics.median(v) for k, v in seconds.items()}
    written = storage.read(CUSTOMER_SCORES) if storage is not None else spark.read.parquet(str(target))
    with_interval = written.where("predicted_net_value_p10 is not null").count()

    sample = features_df.limit(200_000).toPandas()
    per_customer = {}
    for variant in ("without", "with"):
        scored = dataclasses.replace(bundle, intervals=variant == "with")
        scored.predict(sample.head(1000))                      # warm-up
        started = time.perf_counter()
        for start in range(0, len(sample), 10_000):            # Arrow batches of 10,000 rows, as in Spark
            scored.predict(sample.iloc[start:start + 10_000])
        per_customer[variant] = (time.perf_counter() - started) / len(sample) * 1e6
    spark.stop()

    ratio = median["with"] / median["without"]
    print()
    print(f"score + write ({args.sink}) {args.customers:,} customers: without intervals {median['without']:.1f} s, with "
          f"{median['with']:.1f} s (medians of {args.repeats}): ratio {ratio:.2f} (target <= 1.5)")
    print(f"{type(bundle).__name__}.predict without Spark: {per_customer['without']:.2f} us per customer without, "
          f"{per_customer['with']:.2f} us with intervals")
    print(json.dumps({"customers": args.customers, "sink": args.sink, "hybrid": args.hybrid, "seconds": seconds, "median": median, "ratio": round(ratio, 3),
                      "customers_with_interval": with_interval,
                      "numpy_predict_us_per_customer": {k: round(v, 3) for k, v in per_customer.items()}}))


if __name__ == "__main__":
    main()
