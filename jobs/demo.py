"""`cvseg demo`: the nightly pipeline end to end on generated data or lifetimes' CDNOW sample."""
from __future__ import annotations

import argparse
import datetime as dt
import os
from dateutil.relativedelta import relativedelta
from importlib.resources import files
from pathlib import Path

from core.config import dump_config, load_config
from jobs.common import build_session, build_storage, step

HELP = ("generate sample data, then the nightly pipeline (ingest -> features -> score -> segments -> trends "
        "-> export) and the calibration table, end to end")

SYNTHETIC_END = dt.date(2026, 9, 30)
# the last day of the CDNOW sample (1997-01-01 .. 1998-06-30): one horizon back (1997-12-31) the
# backtest still has a whole year of history for the cohort method
CDNOW_AS_OF = dt.date(1998, 6, 30)
# the omni demo's key for hashing e-mail and phone when none is set: sample data only
DEMO_HMAC_KEY = "cvseg-demo-key-for-sample-data-only"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("synthetic", "cdnow", "omni"), default="synthetic",
                        help="synthetic: one generated export; cdnow: lifetimes' CDNOW sample; omni: two generated "
                             "sources (EC and store, own customer ids, 20%% of customers in both) joined by e-mail "
                             "and phone")
    parser.add_argument("--dir", default="demo", help="folder for the export, warehouse and conf (default ./demo)")
    parser.add_argument("--customers", type=int, default=20_000, help="synthetic customers (default 20000)")
    parser.add_argument("--seed", type=int, default=42)


def example_conf(name: str) -> Path:
    return Path(str(files("conf").joinpath("examples", f"{name}.yaml")))


def cdnow_sample_path() -> Path:
    import lifetimes

    return Path(lifetimes.__file__).parent / "datasets" / "CDNOW_sample.txt"


DATASET_MARKER = ".cvseg-demo-dataset"


def claim_demo_dir(demo_dir: Path, dataset: str, given: str) -> None:
    """Mark the folder with the demo's data set; a folder another demo wrote is refused before anything
    is written (its warehouse holds other customers and dates: CDNOW's 1998 night after the synthetic
    demo's 2026 one failed at segments, which only move forward)."""
    marker = demo_dir / DATASET_MARKER
    if marker.exists() and (earlier := marker.read_text(encoding="utf-8").strip()) != dataset:
        from jobs.common import UsageError

        raise UsageError(f"{given} holds the {earlier} demo's warehouse; run the {dataset} demo in a folder of its "
                         f"own (`cvseg demo --dataset {dataset} --dir {given.rstrip('/')}-{dataset}`) or remove {given}")
    demo_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(dataset + "\n", encoding="utf-8")


def main(args: argparse.Namespace) -> dict:
    from pipelines.calibration import run_calibration

    demo_dir = Path(args.dir).resolve()
    claim_demo_dir(demo_dir, args.dataset, args.dir)
    generated = args.dataset in ("synthetic", "omni")
    if args.dataset == "synthetic":
        source_path = demo_dir / "export" / "orders"
        as_of = SYNTHETIC_END
    elif args.dataset == "omni":
        source_path = None   # one path per source, in the conf the generator writes
        as_of = SYNTHETIC_END
    else:
        source_path = cdnow_sample_path()
        as_of = CDNOW_AS_OF
    export_dir = demo_dir / "exports"
    overrides = [f"storage.warehouse={demo_dir / 'warehouse'}", f"export.dest={export_dir}"]
    if source_path is not None:
        overrides.append(f"source.path={source_path}")
    if generated:
        # the generated export is "made" on its end date: the rows it dates later are the future ones
        overrides.append(f"validation.future_cutoff={as_of}")
    overrides += args.overrides
    config = load_config(args.conf or example_conf("synthetic" if generated else args.dataset), overrides)

    spark = build_session(config)
    if args.dataset == "omni":
        from datagen.generate import generate_sources

        if not os.environ.get(config.export.hmac_key_env):
            # matching keys are hashed with the export's key; a fixed one is fine for sample data only
            os.environ[config.export.hmac_key_env] = DEMO_HMAC_KEY
            print(f"{config.export.hmac_key_env} is not set: the demo hashes e-mail and phone with a demo key "
                  "(set your own secret for real data)")
        with step(f"generate {args.customers:,} customers in two sources (ec, store)"):
            summary = generate_sources(spark, args.customers, args.seed, as_of, str(demo_dir / "export"), overlap=0.2)
        print(f"  {summary['shared_customers']:,} customers bought in both; conf: {summary['conf_path']}")
        # the generator's conf (sources, identity) under the demo's settings; each source's own ids exported too
        config = load_config(args.conf or summary["conf_path"], [*overrides, "export.source_ids=true"])
    conf_path = dump_config(config, demo_dir / "conf.yaml")
    storage = build_storage(config, spark)
    print(f"storage backend: {storage.backend}; warehouse: {config.storage.warehouse}")
    if args.dataset == "synthetic":
        from datagen.generate import generate

        with step(f"generate {args.customers:,} customers"):
            summary = generate(spark, n_customers=args.customers, seed=args.seed, end_date=as_of,
                               out_dir=str(demo_dir / "export"), fmt="csv")
        print(f"  {summary['n_rows']:,} export rows in {summary['orders_path']}")

    from pipelines.nightly import STEPS, PipelineStepError, run_nightly

    # The same orchestrator as `cvseg run`; force: the demo re-runs every step even if a previous
    # demo in this folder committed them (the export may have been regenerated). One night has
    # nothing to maintain: the table maintenance step is left out (`cvseg maintain` runs it).
    try:
        result = run_nightly(spark, storage, config, as_of, source_path=str(source_path) if source_path else None,
                             force=True, refit="always",
                             dest=str(export_dir), steps=[s for s in STEPS if s != "maintain"])
    except PipelineStepError as exc:
        from jobs.common import UsageError

        raise UsageError(str(exc)) from exc
    cutoff = as_of - relativedelta(months=config.models.horizon_months)
    with step(f"calibration/holdout at cutoff {cutoff} (for `cvseg backtest`)"):
        calibration_stats = run_calibration(storage, cutoff, config.features, config.models.horizon_months)
    print(f"  {calibration_stats.summary_line()}")
    _print_what_was_made(storage, config, as_of, result)
    _print_next_commands(args.dataset, config, conf_path, as_of, demo_dir)
    return {"conf": str(conf_path), "as_of": as_of, "run": result, "calibration": calibration_stats,
            "export": result.outcome("export").details}


def _print_what_was_made(storage, config, as_of: dt.date, result) -> None:
    """A few customer_features rows, every table written, the export and the MLflow champion."""
    from core import tracking
    from core.tables import TABLES
    from jobs.show import select_rows

    target = tracking.tracking_target(config)
    score = result.outcome("score")
    export = result.outcome("export")
    rows, _, _ = select_rows(storage, "customer_features", as_of=as_of, limit=5,
                          columns="customer_id,n_orders,frequency,recency,T,net_amount,cancel_rate_count,"
                                  "acquisition_channel,rfm_score")
    print(f"\ncustomer_features as of {as_of} (first 5 rows):")
    print(rows.to_string(index=False))
    print("\nTables:")
    for table in TABLES:
        if storage.exists(table):
            print(f"  {table:<26} {storage.path(table)}")
    print(f"Export: {export.details['file']}\n        {export.details['manifest']} "
          f"({export.details['rows']:,} rows, sha256 {export.details['sha256'][:16]}...)")
    print(f"MLflow: {target.uri} (experiment {target.experiment}, model {target.registered_model}, "
          f"champion v{score.details['model_version']})")


def _print_next_commands(dataset: str, config, conf_path: Path, as_of: dt.date, demo_dir: Path) -> None:
    """The commands a user goes on with, on the demo's resolved config."""
    print(f"\nResolved config: {conf_path}\nGo on with, e.g.:")
    if dataset == "omni":
        key = os.environ[config.export.hmac_key_env]
        shown = key if key == DEMO_HMAC_KEY else "<the key you set>"
        print(f"  export {config.export.hmac_key_env}={shown}   # the key the demo hashed e-mail and phone with: "
              "the commands below need it")
    print(f"  cvseg run --conf {conf_path} --as-of {as_of}            # again: every step is skipped")
    print(f"  cvseg show segments_current --conf {conf_path}")
    print(f"  cvseg show pipeline_runs --conf {conf_path}")
    print(f"  cvseg show customer_scores --conf {conf_path}")
    print(f"  cvseg export --conf {conf_path} --as-of {as_of} --dest {demo_dir / 'crm'}   # or s3://bucket/prefix/")
    print(f"  cvseg models --conf {conf_path}")
    print(f"  cvseg report --conf {conf_path} --as-of {as_of} --language ja --language en   # HTML + PDF")
    print(f"  cvseg backtest --conf {conf_path} --as-of {as_of}       # all models vs the cohort method")
