"""`cvseg segments --as-of D [--new-generation]`: cut a segment generation or place newcomers."""
from __future__ import annotations

import argparse

from jobs.common import config_from, open_warehouse, parse_date, step

HELP = ("segments from customer_scores: cut a generation when due (or --new-generation), "
        "otherwise place customers without a segment")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True,
                        help="YYYY-MM-DD (customer_scores and customer_features must exist for it)")
    parser.add_argument("--new-generation", action="store_true",
                        help="cut a new generation now instead of waiting segments.generation_months")


def main(args: argparse.Namespace):
    from pipelines.segments import run_segments

    config = config_from(args)
    spark, storage = open_warehouse(args, config)
    with step("segments"):   # a SegmentsError is a UserError: its message says what to run
        summary = run_segments(storage, args.as_of, config.segments, new_generation=args.new_generation)
    print(f"  as of {args.as_of}: {summary.summary_line()}")
    return summary
