"""`cvseg show TABLE`: print any table without writing Spark code (a bounded number of rows)."""
from __future__ import annotations

import argparse
import sys

from jobs.common import UsageError, build_session, build_storage, config_from, parse_date

HELP = "print rows of a table (csv or aligned text)"

# The column that an --as-of date selects, for tables that are snapshots by date.
AS_OF_COLUMNS = {"customer_features": "as_of_date", "calibration_holdout": "cutoff_date",
                 "customer_scores": "as_of_date"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from core.tables import TABLES

    parser.add_argument("table", choices=sorted(TABLES), metavar="TABLE",
                        help="one of: " + ", ".join(sorted(TABLES)))
    parser.add_argument("--as-of", type=parse_date,
                        help="snapshot date for dated tables (default: the latest)")
    parser.add_argument("--format", choices=("table", "csv"), default="table")
    parser.add_argument("--limit", type=int, default=20, help="rows to print (default 20)")
    parser.add_argument("--version", type=int, help="read this Delta version of the table")
    parser.add_argument("--where", help="Spark SQL filter, e.g. \"customer_id = 'C00000001'\"")
    parser.add_argument("--columns", help="comma-separated columns to print")


def select_rows(storage, table: str, as_of=None, version=None, where=None, columns=None, limit=20):
    """The rows `show` prints, as a small pandas frame, plus the snapshot date used (if any)."""
    from pyspark.sql import functions as F

    df = storage.read(table, version=version)
    date_column = AS_OF_COLUMNS.get(table)
    if as_of is not None and date_column is None:
        raise UsageError(f"table {table!r} has no as-of date; drop --as-of")
    if date_column is not None:
        if as_of is None:
            as_of = df.agg(F.max(date_column)).first()[0]
        df = df.where(F.col(date_column) == F.lit(as_of))
    if where:
        df = df.where(where)
    if columns:
        wanted = [c.strip() for c in columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in df.columns]
        if unknown:
            raise UsageError(f"unknown columns {unknown}; {table} has: {', '.join(df.columns)}")
        df = df.select(*wanted)
    key_order = [c for c in ("customer_id", "order_id", "source_file", "source_row") if c in df.columns]
    if key_order:
        df = df.orderBy(*key_order)
    return df.limit(max(limit, 0)).toPandas(), as_of


def main(args: argparse.Namespace) -> None:
    if args.limit < 0:
        raise UsageError("--limit must be 0 or more")
    config = config_from(args)
    spark = build_session(config)
    storage = build_storage(config, spark)
    rows, as_of = select_rows(storage, args.table, args.as_of, args.version, args.where, args.columns,
                              args.limit)
    if args.format == "csv":
        rows.to_csv(sys.stdout, index=False)
        return
    import pandas as pd

    title = f"{args.table}" + (f" as of {as_of}" if as_of is not None else "")
    print(f"{title}: {len(rows)} row(s) shown (limit {args.limit})")
    with pd.option_context("display.max_columns", None, "display.width", 200,
                           "display.max_colwidth", 40):
        print(rows.to_string(index=False) if len(rows) else "(no rows)")
