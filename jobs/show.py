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
    parser.add_argument("--limit", type=_limit, default=20,
                        help=f"rows to print (default 20), or `all` (up to {SHOW_ALL_MAX:,}; "
                             "`cvseg dump` writes whole tables to a file)")
    add_selection_arguments(parser)


#: `show --limit all` prints at most this many rows: more belong in a file (`cvseg dump`), not a terminal.
SHOW_ALL_MAX = 100_000


def _limit(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows or `all`") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} prints nothing; give a number of rows above 0, or `all`")
    return value


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Which rows of a table (shared by `show` and `dump`)."""
    parser.add_argument("--version", type=int, help="read this Delta version of the table")
    parser.add_argument("--where", help="Spark SQL filter, e.g. \"customer_id = 'C00000001'\"")
    parser.add_argument("--columns", help="comma-separated columns")


def select_frame(storage, table: str, as_of=None, version=None, where=None, columns=None):
    """The table's rows `show` and `dump` take, as a DataFrame (dated tables: one as-of date, by
    default the latest), plus the snapshot date used (if any)."""
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
    return df, as_of


def select_rows(storage, table: str, as_of=None, version=None, where=None, columns=None, limit: int | None = 20):
    """The rows `show` prints (``limit`` None: all, up to SHOW_ALL_MAX) as a small pandas frame,
    the snapshot date used (if any) and whether rows beyond the limit exist."""
    df, as_of = select_frame(storage, table, as_of, version, where, columns)
    cap = SHOW_ALL_MAX if limit is None else limit
    rows = df.limit(cap + 1).toPandas()   # one more than shown: tells whether the output is cut
    if limit is None and len(rows) > cap:
        raise UsageError(f"{table} has more than {cap:,} rows to show; write them to a file with "
                         f"`cvseg dump {table} --out FILE` (add --where / --columns to narrow them)")
    return rows.head(cap), as_of, len(rows) > cap


def main(args: argparse.Namespace) -> None:
    config = config_from(args)
    spark = build_session(config)
    storage = build_storage(config, spark)
    rows, as_of, cut = select_rows(storage, args.table, args.as_of, args.version, args.where, args.columns,
                                   args.limit)
    more = (f"more rows exist: --limit N, --limit all, or `cvseg dump {args.table} --out FILE` for every row"
            if cut else "")
    if args.format == "csv":
        rows.to_csv(sys.stdout, index=False)
        if cut:
            print(f"(cut after {len(rows):,} rows; {more})", file=sys.stderr)
        return
    import pandas as pd

    title = f"{args.table}" + (f" as of {as_of}" if as_of is not None else "")
    print(f"{title}: {len(rows):,} row(s) shown" + (f"; {more}" if cut else ""))
    with pd.option_context("display.max_columns", None, "display.width", 200,
                           "display.max_colwidth", 40):
        print(rows.to_string(index=False) if len(rows) else "(no rows)")
