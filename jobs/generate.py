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
    parser.add_argument("--sources", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                        help="split the customers over several order sources, e.g. ec,store: one export per "
                             "source (its own customer ids, e-mail and phone written its own way), an identity "
                             "map of the overlapping customers and a conf (sources.yaml)")
    parser.add_argument("--overlap", type=float, default=0.2,
                        help="with --sources: share of customers with an account in every source (default 0.2)")


def main(args: argparse.Namespace) -> dict:
    from datagen.generate import GeneratorParams, generate, generate_sources

    config = config_from(args)
    spark = build_session(config)
    if args.sources:
        with step("generate"):
            summary = generate_sources(spark, n_customers=args.customers, seed=args.seed, end_date=args.end_date,
                                       out_dir=args.out, sources=args.sources, overlap=args.overlap, fmt=args.format,
                                       params=GeneratorParams(cancellations=args.cancellations),
                                       dirty_share=args.dirty_share)
        for name in summary["sources"]:
            counts = summary["per_source"].get(name, {"rows": 0, "customers": 0})
            print(f"source {name}: {counts['rows']:,} rows, {counts['customers']:,} customers -> {summary['paths'][name]}")
        print(f"{summary['shared_customers']:,} customers in every source; identity map: {summary['identity_map_path']}")
        print(f"conf: {summary['conf_path']} (matching on email and phone; CVSEG_EXPORT_HMAC_KEY must hold a key)")
        return summary
    with step("generate"):
        summary = generate(spark, n_customers=args.customers, seed=args.seed, end_date=args.end_date,
                           out_dir=args.out, fmt=args.format, dirty_share=args.dirty_share,
                           params=GeneratorParams(cancellations=args.cancellations))
    print(f"wrote {summary['n_rows']:,} rows for {args.customers:,} customers to {summary['orders_path']}")
    print(f"true parameters: {summary['true_params_path']}")
    return summary
