"""`cvseg ingest`: map the client's export onto `orders`, rejected rows to `orders_quarantine`."""
from __future__ import annotations

import argparse

from jobs.common import UsageError, config_from, open_warehouse, parse_date, step

HELP = "ingest the client's order export (columns mapped by conf) with validation and quarantine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", help="file, folder or glob; default source.path from the config")
    parser.add_argument("--run-date", type=parse_date,
                        help="orders after this day are quarantined as future (default: validation.future_cutoff, "
                             "else today in business.timezone)")
    parser.add_argument("--all-files", action="store_true",
                        help="read every file again, also those already ingested unchanged "
                             "(source.new_files_only=false for this run)")


def main(args: argparse.Namespace):
    from pipelines.ingest import read_day, run_ingest

    config = config_from(args)
    path = args.path or config.source.path
    if not path:
        raise UsageError("no source given: pass --path or set source.path in your --conf file")
    spark, storage = open_warehouse(args, config)
    run_date = args.run_date or read_day(config.validation, config.business.timezone)
    source = config.source.model_copy(update={"new_files_only": False}) if args.all_files else config.source
    with step("ingest"):
        summary = run_ingest(spark, storage, source, config.validation,
                             config.business.timezone, run_date, path=path)
    print(summary)
    return summary
