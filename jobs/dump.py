"""`cvseg dump TABLE --out PATH`: a whole table (or one as-of date of it) to a file, written by Spark."""
from __future__ import annotations

import argparse
from pathlib import Path

from jobs.common import UsageError, build_session, build_storage, config_from, parse_date, step
from jobs.show import add_selection_arguments, select_frame

HELP = "write a whole table (dated tables: one as-of date) to a CSV file or a parquet folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from core.tables import TABLES

    parser.add_argument("table", choices=sorted(TABLES), metavar="TABLE",
                        help="one of: " + ", ".join(sorted(TABLES)))
    parser.add_argument("--as-of", type=parse_date,
                        help="snapshot date for dated tables (default: the latest)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="csv: a local file; parquet: a folder (local or s3a://) Spark writes its files into")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--encoding", choices=("utf-8", "utf-8-sig", "cp932"), default="utf-8",
                        help="csv only (default utf-8; utf-8-sig for Excel)")
    parser.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    add_selection_arguments(parser)


def main(args: argparse.Namespace) -> dict:
    from pipelines.export import write_csv_file

    out = args.out
    local = "://" not in out or out.startswith("file://")
    if args.format == "csv" and not local:
        raise UsageError(f"--format csv writes a local file, not {out}; use --format parquet for object storage")
    if local and Path(out.removeprefix("file://")).exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    config = config_from(args)
    spark = build_session(config)
    storage = build_storage(config, spark)
    df, as_of = select_frame(storage, args.table, args.as_of, args.version, args.where, args.columns)
    what = args.table + (f" as of {as_of}" if as_of is not None else "")
    with step(f"dump {what} -> {out}"):
        if args.format == "parquet":
            df.write.mode("overwrite" if args.overwrite else "errorifexists").parquet(out)
            rows = spark.read.parquet(out).count()   # from the files' footers
        else:
            path = Path(out.removeprefix("file://")).resolve()
            rows = write_csv_file(df, path, args.encoding).lines - 1
    print(f"  {rows:,} rows of {what} -> {out}")
    return {"rows": rows, "out": out, "as_of": as_of}
