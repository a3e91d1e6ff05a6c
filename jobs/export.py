"""`cvseg export --as-of D [--dest PATH_OR_S3_URI]`: the customer -> segment CSV plus its manifest."""
from __future__ import annotations

import argparse

from jobs.common import build_session, build_storage, config_from, parse_date, step

HELP = "write the customer -> segment CSV for a date (local folder or s3://bucket/prefix/) with a manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True, help="YYYY-MM-DD (scores and segments must exist)")
    parser.add_argument("--dest", metavar="PATH_OR_S3_URI",
                        help="local folder or s3://bucket/prefix/ (default: export.dest from the config)")


def main(args: argparse.Namespace):
    from pipelines.export import run_export

    config = config_from(args)
    spark = build_session(config)
    storage = build_storage(config, spark)
    with step(f"export as of {args.as_of}"):   # an ExportError is a UserError: one line, exit 2
        result = run_export(storage, args.as_of, config.export, dest=args.dest,
                            horizon_months=config.models.horizon_months,
                            labels=config.segments.labels)
    print(f"  {result.rows:,} rows -> {result.file}\n  manifest: {result.manifest} (sha256 {result.sha256})")
    return result
