"""`cvseg trends --as-of D [--rebuild]`: update (or rebuild) the trend tables."""
from __future__ import annotations

import argparse

from jobs.common import config_from, open_warehouse, parse_date, step

HELP = ("trend tables (weekly by segment, new customers, F2, cohorts, yearly): incremental or --rebuild; "
        "and ltv_by_channel (predicted value by acquisition channel and month) when D is scored")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True,
                        help="YYYY-MM-DD (orders up to it are counted; customer_features must exist for it)")
    parser.add_argument("--rebuild", action="store_true",
                        help="recompute every period instead of only those touched since the last run")


def main(args: argparse.Namespace):
    from pipelines.trends import run_trends
    from pipelines.value_totals import run_ltv_by_channel

    config = config_from(args)
    spark, storage = open_warehouse(args, config)
    with step("trends"):   # a TrendsError is a UserError: its message says what to run
        summary = run_trends(storage, args.as_of, config.trends, rebuild=args.rebuild)
        channels = run_ltv_by_channel(storage, args.as_of)
    print(f"  trends as of {args.as_of} ({summary.mode}): recomputed from {summary.recomputed_from}")
    print(f"  partitions replaced: {summary.partitions}")
    print(f"  {channels.summary_line()}")
    return summary, channels
