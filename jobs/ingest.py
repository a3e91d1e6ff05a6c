"""`cvseg ingest`: map the client's export onto `orders`, rejected rows to `orders_quarantine`."""
from __future__ import annotations

import argparse

from jobs.common import UsageError, config_from, open_warehouse, parse_date, step

HELP = ("ingest the client's order exports (columns mapped by conf) with validation and quarantine, then "
        "resolve one customer across sources (identity)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", help="file, folder or glob; default source.path from the config "
                                       "(with several sources, the path of the one named by --source)")
    parser.add_argument("--source", help="ingest only this source (a name of `sources`); identity still runs")
    parser.add_argument("--run-date", type=parse_date,
                        help="orders after this day are quarantined as future (default: validation.future_cutoff, "
                             "else today in business.timezone)")
    parser.add_argument("--all-files", action="store_true",
                        help="read every file again, also those already ingested unchanged "
                             "(source.new_files_only=false for this run)")


def main(args: argparse.Namespace):
    from pipelines.ingest import read_day
    from pipelines.sources import run_sources

    config = config_from(args)
    sources = config.order_sources
    if not args.path and any(not s.path for s in sources if args.source in (None, s.name)):
        raise UsageError("no source given: pass --path or set source.path (sources[].path) in your --conf file")
    spark, storage = open_warehouse(args, config)
    run_date = args.run_date or read_day(config.validation, config.business.timezone)
    with step("ingest"):
        result = run_sources(spark, storage, config, run_date, path=args.path, only=args.source,
                             all_files=args.all_files)
    print(result)
    return result
