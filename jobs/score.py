"""`cvseg score --as-of D`: every customer's predicted 6-month value with the champion model."""
from __future__ import annotations

import argparse

from jobs.common import config_from, open_warehouse, parse_date, step

HELP = "score every customer (p_alive, expected purchases and 6-month net value) with the champion"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True, help="YYYY-MM-DD (features must exist)")


def main(args: argparse.Namespace):
    from core import tracking
    from jobs.common import UsageError
    from pipelines.ltv import load_champion, run_score

    config = config_from(args)
    target = tracking.tracking_target(config)
    tracking.start(target)
    try:
        bundle, version = load_champion(target.registered_model)
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    spark, storage = open_warehouse(args, config)
    with step(f"score with {target.registered_model} v{version} ({bundle.value_model})"):
        stats = run_score(storage, args.as_of, bundle, version, intervals=config.models.intervals)
    print(f"  customer_scores as of {args.as_of}: {stats.summary_line()}")
    return stats
