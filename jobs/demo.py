"""`cvseg demo`: everything built so far, end to end, on generated data or lifetimes' CDNOW sample."""
from __future__ import annotations

import argparse
import datetime as dt
from dateutil.relativedelta import relativedelta
from importlib.resources import files
from pathlib import Path

from core.config import dump_config, load_config
from jobs.common import build_session, build_storage, step

HELP = "run generate -> ingest -> features -> calibration -> fit -> score end to end on sample data"

SYNTHETIC_END = dt.date(2026, 9, 30)
CDNOW_AS_OF = dt.date(1997, 9, 30)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("synthetic", "cdnow"), default="synthetic")
    parser.add_argument("--dir", default="demo", help="folder for the export, warehouse and conf (default ./demo)")
    parser.add_argument("--customers", type=int, default=20_000, help="synthetic customers (default 20000)")
    parser.add_argument("--seed", type=int, default=42)


def example_conf(name: str) -> Path:
    return Path(str(files("conf").joinpath("examples", f"{name}.yaml")))


def cdnow_sample_path() -> Path:
    import lifetimes

    return Path(lifetimes.__file__).parent / "datasets" / "CDNOW_sample.txt"


def main(args: argparse.Namespace) -> dict:
    from pipelines.calibration import run_calibration
    from pipelines.features import run_features
    from pipelines.ingest import run_ingest

    demo_dir = Path(args.dir).resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset == "synthetic":
        source_path = demo_dir / "export" / "orders"
        as_of = SYNTHETIC_END
    else:
        source_path = cdnow_sample_path()
        as_of = CDNOW_AS_OF
    overrides = [f"storage.warehouse={demo_dir / 'warehouse'}", f"source.path={source_path}", *args.overrides]
    config = load_config(args.conf or example_conf(args.dataset), overrides)
    conf_path = dump_config(config, demo_dir / "conf.yaml")

    spark = build_session(config)
    storage = build_storage(config, spark)
    print(f"storage backend: {storage.backend}; warehouse: {config.storage.warehouse}")
    if args.dataset == "synthetic":
        from pipelines.generate import generate

        with step(f"generate {args.customers:,} customers"):
            summary = generate(spark, n_customers=args.customers, seed=args.seed, end_date=as_of,
                               out_dir=str(demo_dir / "export"), fmt="csv")
        print(f"  {summary['n_rows']:,} export rows in {summary['orders_path']}")
    with step("ingest"):
        ingest_summary = run_ingest(spark, storage, config.source, config.validation,
                                    config.business.timezone, as_of, path=str(source_path))
    print(ingest_summary)
    with step(f"features as of {as_of}"):
        feature_stats = run_features(storage, as_of, config.features)
    print(f"  {feature_stats}")
    cutoff = as_of - relativedelta(months=config.features.horizon_months)
    with step(f"calibration/holdout at cutoff {cutoff}"):
        calibration_stats = run_calibration(storage, cutoff, config.features)
    print(f"  {calibration_stats}")

    from core import tracking
    from pipelines.ltv import describe_params, fit_btyd_bundles, run_score
    from pyspark.sql import functions as F

    with step(f"fit BTYD models on features as of {as_of}"):
        features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(as_of))
        fitted = fit_btyd_bundles(features_df, config.models.purchase_models[:1], config.features.time_unit,
                                  config.features.horizon_months, config.models.penalizer_coef)
        target = tracking.tracking_target(config)
        tracking.start(target)
        name, bundle = next(iter(fitted.bundles.items()))
        run_id, version = tracking.log_bundle(
            bundle, run_name=f"demo-fit-{name}-{as_of}",
            params={"purchase_model": name, "value_model": "btyd", "as_of": as_of.isoformat(),
                    "time_unit": config.features.time_unit},
            metrics={}, artifacts={"parameters": bundle.describe()}, tags={"kind": "fit"},
            register_as=target.registered_model)
        tracking.set_champion(target.registered_model, version)
    for model_name, params in describe_params(fitted.bundles).items():
        print(f"  {model_name:<13} " + ", ".join(f"{k}={v:.4g}" for k, v in params.items()))
    with step(f"score every customer with model version {version}"):
        score_stats = run_score(storage, as_of, bundle, version)
    print(f"  {score_stats}")

    from jobs.show import select_rows

    rows, _ = select_rows(storage, "customer_features", as_of=as_of, limit=5,
                          columns="customer_id,n_orders,frequency,recency,T,net_amount,cancel_rate_count,"
                                  "acquisition_channel,rfm_score")
    print(f"\ncustomer_features as of {as_of} (first 5 rows):")
    print(rows.to_string(index=False))
    print("\nTables:")
    for table in ("orders", "orders_quarantine", "ingest_runs", "customer_features", "calibration_holdout",
                  "customer_scores"):
        if storage.exists(table):
            print(f"  {table:<20} {storage.path(table)}")
    print(f"MLflow: {target.uri} (experiment {target.experiment}, model {target.registered_model})")
    print(f"\nResolved config: {conf_path}\nGo on with, e.g.:")
    print(f"  cvseg show customer_features --conf {conf_path} --as-of {as_of}")
    print(f"  cvseg show orders_quarantine --conf {conf_path}")
    print(f"  cvseg show customer_scores --conf {conf_path}")
    print(f"  cvseg fit --conf {conf_path} --as-of {as_of} --json")
    print(f"  cvseg models --conf {conf_path}")
    return {"conf": str(conf_path), "as_of": as_of, "ingest": ingest_summary,
            "features": feature_stats, "calibration": calibration_stats, "scores": score_stats}
