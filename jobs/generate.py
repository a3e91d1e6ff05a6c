"""`cvseg generate`: seeded synthetic order export (buy-till-you-die customers), written by Spark."""
from __future__ import annotations

import argparse
import datetime as dt

from jobs.common import build_session, config_from, parse_date, step

HELP = "generate a seeded synthetic order export with known true parameters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--customers", type=int, default=20_000, help="number of customers (default 20000)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--end-date", type=parse_date, default=dt.date(2026, 9, 30),
                        help="last day of the export (default 2026-09-30)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--dirty-share", type=float, default=0.001,
                        help="share of deliberately defective rows (default 0.001)")
    parser.add_argument("--cancellations", choices=("independent", "retry", "stray", "mixed"),
                        default="independent",
                        help="how cancelled orders arise: independent (default: random orders of the purchase "
                             "process are cancelled), retry (a cancelled order a day or two before a completed "
                             "one), stray (cancelled orders at random times, also after dropout), mixed (half each)")


def main(args: argparse.Namespace) -> dict:
    from pipelines.generate import GeneratorParams, generate

    config = config_from(args)
    spark = build_session(config)
    with step("generate"):
        summary = generate(spark, n_customers=args.customers, seed=args.seed, end_date=args.end_date,
                           out_dir=args.out, fmt=args.format, dirty_share=args.dirty_share,
                           params=GeneratorParams(cancellations=args.cancellations))
    print(f"wrote {summary['n_rows']:,} rows for {args.customers:,} customers to {summary['orders_path']}")
    print(f"true parameters: {summary['true_params_path']}")
    return summary
