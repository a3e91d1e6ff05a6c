"""`cvseg run --as-of D`: the nightly pipeline (ingest -> features -> score -> segments -> trends -> export
-> maintain, the last on a cadence).

Committed steps are skipped on a re-run, so a crashed run resumes where it stopped; each executed step
is recorded in `pipeline_runs`. On failure: a one-line reason on stderr and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys

from jobs.common import config_from, known_errors, open_warehouse, parse_date, today_in

HELP = ("nightly pipeline for a date: ingest -> features -> score (refit on cadence) -> segments -> trends -> export "
        "-> maintain (every maintenance.every_days)")

STEP_NAMES = ("ingest", "features", "score", "segments", "trends", "export", "maintain")   # = pipelines.nightly.STEPS


def as_of_arg(text: str) -> str | dt.date:
    """YYYY-MM-DD, or `yesterday` / `today` (resolved in business.timezone once the config is read)."""
    if text in ("yesterday", "today"):
        return text
    return parse_date(text)


def steps_arg(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEP_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown or [text]}; steps are: {', '.join(STEP_NAMES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=as_of_arg, required=True,
                        help="YYYY-MM-DD, or yesterday/today in business.timezone (schedulers)")
    parser.add_argument("--path", help="order export to ingest (default: source.path from the config)")
    parser.add_argument("--steps", type=steps_arg, metavar="STEP[,STEP...]",
                        help=f"run only these steps (in pipeline order): {','.join(STEP_NAMES)}")
    parser.add_argument("--refit", choices=("auto", "always", "never"), default="auto",
                        help="auto: on cadence (models.refit_every_days / champion_max_age_days) or without a "
                             "champion (default); always; never")
    parser.add_argument("--new-generation", action="store_true", help="cut a new segment generation at D")
    parser.add_argument("--rebuild-trends", action="store_true", help="rebuild the trend tables from scratch")
    parser.add_argument("--force", action="store_true",
                        help="re-run the selected steps even if committed for D (maintain: also when not due)")
    parser.add_argument("--dest", metavar="PATH_OR_S3_URI", help="export destination (default: export.dest)")
    parser.add_argument("--fail-after", choices=STEP_NAMES, help=argparse.SUPPRESS)   # fault injection (tests)


def resolve_as_of(value: str | dt.date, timezone: str) -> dt.date:
    if isinstance(value, dt.date):
        return value
    today = today_in(timezone)
    return today - dt.timedelta(days=1) if value == "yesterday" else today


def main(args: argparse.Namespace):
    from pipelines.nightly import PipelineStepError, run_nightly

    config = config_from(args)
    as_of = resolve_as_of(args.as_of, config.business.timezone)
    spark, storage = open_warehouse(args, config)
    try:
        return run_nightly(spark, storage, config, as_of, source_path=args.path, steps=args.steps,
                           refit=args.refit, new_generation=args.new_generation,
                           rebuild_trends=args.rebuild_trends, force=args.force, dest=args.dest,
                           fail_after=args.fail_after)
    except PipelineStepError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        # 2: the cause says what to fix (bad input, missing table, config, S3 down); 1: unexpected
        from core.s3 import s3_error_summary

        known = isinstance(exc.cause, known_errors()) or s3_error_summary(exc.cause) is not None
        raise SystemExit(2 if known else 1) from None


