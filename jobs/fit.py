"""`cvseg fit --as-of D`: fit every configured BTYD model on customer_features at D, track in MLflow."""
from __future__ import annotations

import argparse
import json

from jobs.common import UsageError, config_from, open_warehouse, parse_date, step

HELP = "fit the BTYD models (BG/NBD family + Gamma-Gamma + cancellation) on features as of a date"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True, help="YYYY-MM-DD (features must exist)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every fitted parameter")
    parser.add_argument("--register", action="store_true",
                        help="register the first configured purchase model's bundle; it becomes champion "
                             "when there is none yet")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def main(args: argparse.Namespace) -> dict:
    from pyspark.sql import functions as F

    from core import tracking
    from pipelines.ltv import LtvInputError, channel_run_params, describe_params, fit_btyd_bundles
    from pipelines.maintenance import ensure_not_pruned

    config = config_from(args)
    spark, storage = open_warehouse(args, config)
    features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(args.as_of))
    with step("fit") if not args.json else _quiet():
        try:
            # auto: `cvseg backtest` chooses the basis; a plain fit without one uses gross (today's default)
            basis = "gross" if config.models.purchase_basis == "auto" else config.models.purchase_basis
            fitted = fit_btyd_bundles(features_df, config.models.purchase_models, config.features.time_unit,
                                      config.models.horizon_months, config.models.penalizer_coef,
                                      purchase_basis=basis, by_channel=config.models.by_channel)
        except LtvInputError:
            ensure_not_pruned(storage, "customer_features", args.as_of)
            raise
    result = describe_params(fitted.bundles)
    result["fit_seconds"] = {k: round(v, 3) for k, v in fitted.seconds.items()}
    result["sufficient_statistics_rows"] = fitted.sizes
    if not args.no_tracking:
        target = tracking.tracking_target(config)
        tracking.start(target)
        runs = {}
        for position, (name, bundle) in enumerate(fitted.bundles.items()):
            register = args.register and position == 0
            run_id, version = tracking.log_fit(
                bundle, config, args.as_of, storage.version("customer_features"), fitted.seconds,
                run_name=f"fit-{name}-{args.as_of}", extra_params=channel_run_params(bundle),
                register_as=target.registered_model if register else None)
            runs[name] = run_id
            if version and tracking.champion_version(target.registered_model) is None:
                tracking.set_champion(target.registered_model, version)
                result["champion_version"] = version
        result["mlflow_run_ids"] = runs
        result["mlflow_run_id"] = next(iter(runs.values()))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for name, params in describe_params(fitted.bundles).items():
            print(f"  {name:<13} " + ", ".join(f"{k}={v:.4g}" for k, v in params.items()))
        print(f"  sufficient statistics: {fitted.sizes}")
    if not fitted.bundles:
        raise UsageError("no purchase models configured (models.purchase_models)")
    return result


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
