"""Benchmark of stage 2: features -> sufficient statistics -> each fit -> scoring -> backtest.

    python bench/models.py --customers 2000000 [--workdir DIR] [--skip-baseline] [--origins K] [--hybrid]

Prints wall seconds per step with peak RSS of the driver and the JVM, and compares the engine with a
single-node baseline measured IN THE SAME RUN on the same orders: lifetimes' own path
(``summary_data_from_transaction_data`` + ``BetaGeoFitter`` + ``GammaGammaFitter`` +
``customer_lifetime_value`` over 6 months, undiscounted), every step also as a ratio of it. The
machine is shared, so read the ratios rather than the absolute seconds.

The export and the ingested warehouse are kept in ``--workdir`` (default ``/tmp/cvseg-bench-models``)
and reused by the next run with the same ``--customers`` and ``--seed`` (``--fresh`` rebuilds them).
For large N the pandas baseline needs a lot of memory and time: ``--skip-baseline``.

``--hybrid`` also measures what a hybrid champion adds to a refit night (``models.hybrid``,
:mod:`pipelines.hybrid`): the training frame at D - 6 months (the stored customer_features of that
night joined with each customer's net value since, as ``refit_hybrid`` builds it; the features of
that night are computed first, as setup), the fit (BTYD at D - 6 months, the bounded training
sample to the driver, the trees) and scoring every customer with the hybrid bundle, beside the
BG/NBD bundle's scoring.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lifetimes_path import run_capped  # noqa: E402
from _measure import PeakMemory, Timer, use_engine_imports  # noqa: E402
from _orders_direct import write_orders_direct  # noqa: E402

use_engine_imports()   # this file is bench/models.py: `import models` must find the engine's package

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402

END_DATE = dt.date(2026, 9, 30)
HORIZON_MONTHS = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", default="/tmp/cvseg-bench-models",
                        help="export and warehouse are kept here and reused (default /tmp/cvseg-bench-models)")
    parser.add_argument("--fresh", action="store_true", help="regenerate the export and re-ingest")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the lifetimes single-node baseline")
    parser.add_argument("--skip-backtest", action="store_true")
    parser.add_argument("--origins", type=int, default=1, help="backtest origins (default 1)")
    parser.add_argument("--orders-direct", action="store_true",
                        help="write the clean generated orders straight into `orders` (bench/_orders_direct.py) "
                             "instead of export + ingest: for 1M+ customers, where ingest is measured by bench/features.py")
    parser.add_argument("--hybrid", action="store_true", help="also time the hybrid's training and scoring")
    parser.add_argument("--driver-memory", default="12g")
    parser.add_argument("--baseline-first", action="store_true",
                        help="run the lifetimes baseline before the engine's steps (for 10M+ customers: the JVM's "
                             "heap, once grown by the engine, would crowd the baseline's memory)")
    parser.add_argument("--baseline-cap-gib", type=float, default=None,
                        help="kill the baseline's process above this RSS (default: available memory less 1.5 GiB)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    workdir = Path(args.workdir)
    export_dir = workdir / f"export-{args.customers}-seed{args.seed}"
    warehouse = workdir / f"warehouse-{args.customers}-seed{args.seed}"
    if args.fresh:
        shutil.rmtree(export_dir, ignore_errors=True)
        shutil.rmtree(warehouse, ignore_errors=True)
    config = load_config(Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml", [
        f"storage.warehouse={warehouse}", "source.format=parquet", f"spark.driver_memory={args.driver_memory}",
        *args.overrides])

    from pyspark.sql import functions as F

    from models import CancellationRateModel, GammaGammaModel, make_model
    from models.bundle import ScoringBundle
    from pipelines.backtest import run_backtest
    from pipelines.features import run_features
    from datagen.generate import generate
    from pipelines.ingest import run_ingest
    from pipelines.ltv import (cancellation_sufficient_stats, rfm_sufficient_stats, run_score,
                               spend_sufficient_stats)

    timer = Timer()
    print(f"customers={args.customers:,} workdir={workdir}")
    units = config.features.time_unit
    with PeakMemory() as memory:
        with timer.step("spark session start", memory):
            spark = build_spark(config.spark, str(warehouse))
        storage = Storage(spark, str(warehouse), config.storage.backend)
        if args.orders_direct and not storage.exists("orders"):
            with timer.step("setup: generate orders directly", memory):
                write_orders_direct(spark, storage, args.customers, args.seed, END_DATE, config.business.timezone)
        if not storage.exists("orders") and not (export_dir / "true_params.json").exists():
            with timer.step("setup: generate", memory):
                generate(spark, n_customers=args.customers, seed=args.seed, end_date=END_DATE,
                         out_dir=str(export_dir), fmt="parquet")
        if not storage.exists("orders"):
            with timer.step("setup: ingest", memory):
                run_ingest(spark, storage, config.source, config.validation, config.business.timezone, END_DATE,
                           path=str(export_dir / "orders"))
        n_orders = storage.read("orders").count()
        print(f"  orders: {n_orders:,}")
        baseline = None
        if args.baseline_first and not args.skip_baseline:
            baseline = _lifetimes_baseline(storage, timer, args.baseline_cap_gib)

        # ---- the engine: features -> sufficient statistics -> fits -> scores ----------------------------
        with timer.step("features", memory):
            run_features(storage, END_DATE, config.features, full=True)   # every customer from all orders, also on a reused warehouse
        features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(END_DATE))
        with timer.step("sufficient statistics", memory):
            rfm = rfm_sufficient_stats(features_df)
            spend = spend_sufficient_stats(features_df)
            cancels = cancellation_sufficient_stats(features_df)
        print(f"  rows to the driver: rfm {len(rfm):,}, spend {len(spend):,}, cancellation {len(cancels):,}")
        with timer.step("fit gamma_gamma", memory):
            spend_model = GammaGammaModel().fit(spend["frequency"], spend["monetary_value"], weights=spend["weight"])
        with timer.step("fit cancellation", memory):
            cancel_model = CancellationRateModel().fit(cancels["n_orders"], cancels["n_cancelled"],
                                                       weights=cancels["weight"])
        purchase_models = {}
        for name in config.models.purchase_models:
            with timer.step(f"fit {name}", memory):
                purchase_models[name] = make_model(name, time_unit=units).fit(
                    rfm["frequency"], rfm["recency"], rfm["T"], weights=rfm["weight"])
        bundle = ScoringBundle(purchase=purchase_models["bgnbd"], spend=spend_model, cancellation=cancel_model,
                               horizon_months=HORIZON_MONTHS, time_unit=units)
        with timer.step("score (bgnbd bundle)", memory):
            score_stats = run_score(storage, END_DATE, bundle, "bench")
        print(f"  scored {score_stats.customers:,} customers, predicted net total "
              f"{score_stats.predicted_net_value_total:,.0f}")
        if args.hybrid:
            from pipelines.hybrid import fit_hybrid, training_cutoff, training_frame

            train_cutoff = training_cutoff(END_DATE, HORIZON_MONTHS)
            with timer.step("setup: features at D - 6 months (the night six months earlier)", memory):
                run_features(storage, train_cutoff, config.features, full=True)
            with timer.step("hybrid: training frame at D - 6 months", memory):
                frame = training_frame(storage, train_cutoff, config)     # as refit_hybrid: not cached
                print(f"  hybrid training frame from {frame.source}")
            with timer.step("hybrid: fit (BTYD at D - 6 months, sample to the driver, trees)", memory):
                fitted = fit_hybrid(frame.rows, bundle, config.models.hybrid, config.models.penalizer_coef,
                                    train_cutoff, END_DATE, btyd_df=frame.features)
            print(f"  hybrid: {fitted.sample['rows']:,} training rows of {fitted.sample['population']:,}; "
                  f"{ {k: round(v, 2) for k, v in fitted.seconds.items()} }")
            with timer.step("score (hybrid bundle)", memory):
                hybrid_stats = run_score(storage, END_DATE, fitted.bundle, "bench-hybrid")
            print(f"  hybrid scored {hybrid_stats.customers:,} customers, predicted net total "
                  f"{hybrid_stats.predicted_net_value_total:,.0f}")
        backtest_seconds = None
        if not args.skip_backtest:
            with timer.step(f"backtest ({args.origins} origin)", memory):
                backtest = run_backtest(storage, END_DATE, config, n_origins=args.origins)
            backtest_seconds = backtest.seconds
            print(f"  backtest champion {backtest.champion} by {backtest.champion_metric}; "
                  f"breakdown {backtest_seconds}")

        # ---- the single-node baseline: lifetimes' own path on the same orders ----------------------------
        if not args.baseline_first and not args.skip_baseline:
            baseline = _lifetimes_baseline(storage, timer, args.baseline_cap_gib)

    engine_steps = ["features", "sufficient statistics", "fit gamma_gamma", "fit cancellation",
                    *[f"fit {n}" for n in config.models.purchase_models], "score (bgnbd bundle)"]
    engine_bgnbd_path = timer.total("features", "sufficient statistics", "fit gamma_gamma", "fit cancellation",
                                    "fit bgnbd", "score (bgnbd bundle)")
    result = {
        "customers": args.customers, "orders": n_orders,
        "seconds": {name: round(s, 2) for name, s, _ in timer.rows},
        "engine_features_to_scores_bgnbd_s": round(engine_bgnbd_path, 2),
        "engine_all_models_s": round(timer.total(*engine_steps), 2),
        "peak_rss_gib": {name: {"driver": round(d / 1024**3, 2), "jvm": round(j / 1024**3, 2)}
                         for name, _, _, d, j in timer.peaks},
    }
    if args.hybrid:
        fit_s = timer.total("hybrid: fit (BTYD at D - 6 months, sample to the driver, trees)")
        extra_score_s = timer.total("score (hybrid bundle)") - timer.total("score (bgnbd bundle)")
        frame_s = timer.total("hybrid: training frame at D - 6 months")
        result["hybrid_refit_night_extra_s"] = round(frame_s + fit_s + extra_score_s, 2)
    print()
    if args.hybrid:
        print(f"hybrid on a refit night: training frame {frame_s:.1f} s + fit {fit_s:.1f} s + scoring "
              f"{extra_score_s:+.1f} s vs the BG/NBD bundle = {frame_s + fit_s + extra_score_s:.1f} s")
    print(f"engine features -> sufficient statistics -> BG/NBD + Gamma-Gamma + cancellation -> scores: "
          f"{engine_bgnbd_path:.1f} s")
    if baseline is not None and not baseline["finished"]:
        result["baseline"] = baseline["figures"]
        print(f"baseline (lifetimes, single node) did not finish: {baseline['figures']['failed']}")
    elif baseline is not None:
        base_total = timer.total(*baseline["steps"])
        base_from_loaded = timer.total(*[s for s in baseline["steps"] if s != "baseline: load orders to pandas"])
        result["baseline"] = {**baseline["figures"], "total_s": round(base_total, 2)}
        pairs = [("features + sufficient statistics", timer.total("features", "sufficient statistics"),
                  timer.total("baseline: load orders to pandas", "baseline: summary_data_from_transaction_data")),
                 ("fit BG/NBD", timer.total("fit bgnbd"), timer.total("baseline: BetaGeoFitter")),
                 ("fit Gamma-Gamma", timer.total("fit gamma_gamma"), timer.total("baseline: GammaGammaFitter")),
                 ("6-month value for every customer", timer.total("score (bgnbd bundle)"),
                  timer.total("baseline: customer_lifetime_value 6 months")),
                 ("whole path", engine_bgnbd_path, base_total)]
        result["ratios_engine_over_baseline"] = {}
        print(f"baseline (lifetimes, single node): {base_total:.1f} s including loading the orders into pandas "
              f"({base_from_loaded:.1f} s without)")
        print(f"{'step':<36} {'engine s':>9} {'lifetimes s':>12} {'engine/baseline':>16}")
        for label, engine_s, base_s in pairs:
            ratio = engine_s / base_s if base_s else float("nan")
            result["ratios_engine_over_baseline"][label] = round(ratio, 3)
            print(f"{label:<36} {engine_s:9.2f} {base_s:12.2f} {ratio:16.2f}x")
        engine_params = purchase_models["bgnbd"].params_
        result["bgnbd_params"] = {"engine": {k: round(v, 5) for k, v in engine_params.items()},
                                  "lifetimes": baseline["figures"]["bgnbd_params"]}
    print(json.dumps(result, default=str))


def _lifetimes_baseline(storage: Storage, timer: Timer, cap_gib: float | None) -> dict:
    """lifetimes' documented single-node path on the same orders (read from the Delta table with delta-rs),
    in a child process killed when its RSS passes the cap (``bench/_lifetimes_path.py``)."""
    import psutil

    if cap_gib is None:   # what this machine can give it now, less 1.5 GiB for the rest of the run
        cap_bytes = int(psutil.virtual_memory().available - 1.5 * 1024**3)
    else:
        cap_bytes = int(cap_gib * 1024**3)
    print(f"  baseline runs in a child process, killed above {cap_bytes / 1024**3:.2f} GiB RSS", flush=True)

    def on_step(name, seconds, peak_rss):
        timer.record(name, seconds, f"peak RSS baseline process {peak_rss / 1024**3:.2f} GiB", peak_rss)

    run = run_capped(storage.path("orders"), END_DATE, HORIZON_MONTHS, cap_bytes, on_step=on_step)
    steps = [name for name, _, _ in run["steps"]]
    figures = dict(run["figures"] or {})
    figures.pop("event", None)
    figures["sampled_peak_rss_gib"] = round(run["sampled_peak_rss"] / 1024**3, 2)
    figures["cap_gib"] = round(cap_bytes / 1024**3, 2)
    if run["failed"]:
        failed = run["failed"]
        figures["failed"] = {"step": failed["step"], "why": failed["why"],
                             "seconds_into_step": round(failed["seconds_into_step"], 1),
                             "sampled_peak_rss_gib": round(failed["sampled_peak_rss"] / 1024**3, 2)}
        print(f"  baseline did not finish: {failed['why']} {failed['seconds_into_step']:.0f} s into {failed['step']!r} "
              f"(sampled peak RSS {failed['sampled_peak_rss'] / 1024**3:.2f} GiB)", flush=True)
    return {"steps": steps, "figures": figures, "finished": run["failed"] is None}


if __name__ == "__main__":
    main()
