"""`cvseg demo`: everything built so far, end to end, on generated data or lifetimes' CDNOW sample."""
from __future__ import annotations

import argparse
import datetime as dt
from dateutil.relativedelta import relativedelta
from importlib.resources import files
from pathlib import Path

from core.config import dump_config, load_config
from jobs.common import build_session, build_storage, step

HELP = "run generate -> ingest -> features -> calibration end to end on sample data"

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

    from jobs.show import select_rows

    rows, _ = select_rows(storage, "customer_features", as_of=as_of, limit=5,
                          columns="customer_id,n_orders,frequency,recency,T,net_amount,cancel_rate_count,"
                                  "acquisition_channel,rfm_score")
    print(f"\ncustomer_features as of {as_of} (first 5 rows):")
    print(rows.to_string(index=False))
    print("\nTables:")
    for name in ("orders", "orders_quarantine", "ingest_runs", "customer_features", "calibration_holdout"):
        if storage.exists(name):
            print(f"  {name:<20} {storage.path(name)}")
    print(f"\nResolved config: {conf_path}\nGo on with, e.g.:")
    print(f"  cvseg show customer_features --conf {conf_path} --as-of {as_of}")
    print(f"  cvseg show orders_quarantine --conf {conf_path}")
    print(f"  cvseg features --conf {conf_path} --as-of {as_of - relativedelta(months=1)}")
    return {"conf": str(conf_path), "as_of": as_of, "ingest": ingest_summary,
            "features": feature_stats, "calibration": calibration_stats}
