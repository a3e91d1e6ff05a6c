"""`cvseg backtest --as-of D`: which model predicts the next horizon best, tracked in MLflow, champion registered."""
from __future__ import annotations

import argparse
import json

from jobs.common import config_from, open_warehouse, parse_date, step

HELP = ("backtest every configured model (BG/NBD family + Gamma-Gamma, cohort method, naive) on the horizon "
        "before a date; register the best as champion")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True,
                        help="YYYY-MM-DD: the last origin; models are fitted at as-of minus the horizon")
    parser.add_argument("--origins", type=int, default=1,
                        help="number of rolling origins: as-of, as-of - spacing, ... (default 1)")
    parser.add_argument("--spacing-months", type=int, default=1,
                        help="months between origins (default 1; the horizon gives non-overlapping holdouts)")
    parser.add_argument("--run-id", default=None,
                        help="backtest run id (default: new); re-using one replaces that run's table rows")
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild calibration_holdout partitions even when they exist")
    parser.add_argument("--no-tracking", action="store_true",
                        help="do not log to MLflow or register models (tables are still written)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results")


def main(args: argparse.Namespace):
    """A BacktestError is a UserError: its message says what to change (exit 2, no traceback)."""
    from pipelines.backtest import run_backtest

    config = config_from(args)
    spark, storage = open_warehouse(args, config)
    def backtest():
        return run_backtest(storage, args.as_of, config, n_origins=args.origins, spacing_months=args.spacing_months,
                            backtest_run_id=args.run_id, rebuild=args.rebuild, track=not args.no_tracking)

    if args.json:
        result = backtest()
        print(json.dumps(result.asdict(), default=str))
        return result
    with step(f"backtest as of {args.as_of} ({args.origins} origin(s))"):
        result = backtest()
    print(f"  backtest_run_id {result.backtest_run_id}  origins {', '.join(map(str, result.origins))}")
    print(f"  {'model':<10} {'origin':<10} {'mae':>10} {'rmse':>10} {'total err %':>11} {'spearman':>9} "
          f"{'gini':>6} {'top10%':>7} {'top20%':>7}")
    for row in result.metrics:
        print(f"  {row['model']:<10} {row['origin_date']:<10} {_fmt(row['mae'], 10, 1)} {_fmt(row['rmse'], 10, 1)} "
              f"{_fmt(row['total_error_pct'], 11, 1)} {_fmt(row['spearman'], 9, 3)} "
              f"{_fmt(row['normalized_gini'], 6, 3)} {_fmt(row['top_decile_capture'], 7, 3)} "
              f"{_fmt(row['top20_capture'], 7, 3)}")
    for note in result.notes:
        print(f"  {note}")
    print(f"  {result.summary_line()}")
    print("  tables: model_backtest, model_backtest_deciles (`cvseg show model_backtest`)")
    return result


def _fmt(value, width: int, digits: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
