"""`cvseg calibrate --cutoff C`: features as of C with actual orders in (C, C+horizon] for backtests."""
from __future__ import annotations

import argparse

from jobs.common import config_from, open_warehouse, parse_date, step

HELP = "build the calibration/holdout table for a cutoff date (backtests)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cutoff", type=parse_date, required=True, help="YYYY-MM-DD")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="allow a holdout window that runs past the last order in the data")


def main(args: argparse.Namespace):
    from pipelines.calibration import run_calibration

    config = config_from(args)
    spark, storage = open_warehouse(args, config)
    with step("calibrate"):
        stats = run_calibration(storage, args.cutoff, config.features, config.models.horizon_months,
                                allow_incomplete=args.allow_incomplete)
    print(f"calibration_holdout: {stats.summary_line()}")
    return stats
