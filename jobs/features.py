"""`cvseg features --as-of D`: one row per customer as of D into `customer_features`."""
from __future__ import annotations

import argparse

from jobs.common import config_from, open_warehouse, parse_date, step

HELP = "build customer features as of a date"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True, help="YYYY-MM-DD")
    parser.add_argument("--full", action="store_true",
                        help="compute every customer from all orders (no update from an earlier date)")


def main(args: argparse.Namespace):
    from pipelines.features import run_features

    config = config_from(args)
    spark, storage = open_warehouse(args, config)
    with step("features"):
        stats = run_features(storage, args.as_of, config.features, full=args.full)
    print(f"customer_features as of {args.as_of}: {stats.summary_line()}")
    return stats
