"""`cvseg maintain [--as-of D] [--dry-run] [--tables a,b]`: compact small files, prune dated partitions past
retention, VACUUM and checkpoint every table, or the listed ones (see pipelines/maintenance.py); prints a
per-table summary."""
from __future__ import annotations

import argparse

from jobs.common import config_from, open_warehouse
from jobs.run import as_of_arg, resolve_as_of

HELP = ("table maintenance: compact small files, prune customer_features/customer_scores partitions past "
        "retention, VACUUM (storage.retention_hours), checkpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=as_of_arg, default="today",
                        help="YYYY-MM-DD, yesterday or today (default) in business.timezone: retention counts back from it")
    parser.add_argument("--dry-run", action="store_true",
                        help="change nothing: list the partitions retention would prune and the files VACUUM would delete")
    parser.add_argument("--tables", type=table_names, default=None,
                        help="comma-separated table names (default: every table), e.g. orders,customer_scores "
                             "after a backfill")


def table_names(value: str) -> tuple[str, ...]:
    """``a,b`` -> the names, each one of the catalogue's tables (else an error listing them)."""
    from core.tables import TABLES

    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in TABLES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown table(s) {unknown or [value]}; tables are: {', '.join(TABLES)}")
    return names


def main(args: argparse.Namespace):
    from pipelines.maintenance import format_summary, run_maintenance

    config = config_from(args)
    as_of = resolve_as_of(args.as_of, config.business.timezone)
    spark, storage = open_warehouse(args, config)
    print(f"[maintain {as_of}] warehouse {storage.warehouse} (backend {storage.backend})"
          + (" - dry run" if args.dry_run else ""), flush=True)
    summary = run_maintenance(storage, as_of, config.retention, config.storage.retention_hours, dry_run=args.dry_run,
                              progress=lambda line: print(line, flush=True), tables=args.tables)
    for line in format_summary(summary):
        print(line)
    return summary
