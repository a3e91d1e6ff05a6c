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


def main(args: argparse.Namespace) -> dict:
    from jobs.common import UsageError
    from pipelines.segments import SegmentsError, run_segments

    config = config_from(args)
    spark, storage = open_warehouse(args, config)
    with step("segments"):
        try:
            summary = run_segments(storage, args.as_of, config, new_generation=args.new_generation)
        except SegmentsError as exc:   # the message already says what to run
            raise UsageError(str(exc)) from None
    action = "cut generation" if summary["new_generation"] else "placed newcomers in generation"
    print(f"  {action} {summary['generation_id']} as of {args.as_of}: "
          f"{summary['customers_placed']} placed {summary['placed_by_segment']}")
    print(f"  segments_current: {summary['customers']} customers {summary['segment_counts']}")
    if summary.get("note"):
        print(f"  note: {summary['note']}")
    return summary
