"""`cvseg report --as-of D [--weekly] [--language ja|en]`: the diagnostic or the weekly report."""
from __future__ import annotations

import argparse

from jobs.common import build_session, build_storage, config_from, parse_date, step

HELP = "diagnostic report (or --weekly report) as self-contained HTML and A4 PDF from the engine's tables"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=parse_date, required=True,
                        help="YYYY-MM-DD (customer_features must exist for it; other tables are used when present)")
    parser.add_argument("--weekly", action="store_true",
                        help="the short weekly report: this week vs last week vs the same week last year")
    parser.add_argument("--language", choices=("ja", "en"), action="append",
                        help="report language (default report.language); repeat for both")
    parser.add_argument("--out", metavar="DIR", help="output folder (default report.output_dir or <warehouse>/reports)")


def main(args: argparse.Namespace) -> list[str]:
    from jobs.common import UsageError
    from report import ReportError, report_dir, run_report

    config = config_from(args)
    languages = list(dict.fromkeys(args.language or [config.report.language]))
    try:
        out_dir = report_dir(config.storage.warehouse, args.out or config.report.output_dir)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    spark = build_session(config)
    storage = build_storage(config, spark)
    kind = "weekly report" if args.weekly else "diagnostic report"
    with step(f"{kind} as of {args.as_of} ({', '.join(languages)})"):
        try:
            paths = run_report(storage, args.as_of, weekly=args.weekly, languages=languages,
                               currency=config.business.currency, client=config.client, out_dir=out_dir,
                               formats=config.report.formats)
        except ReportError as exc:
            raise UsageError(str(exc)) from None
    for path in paths:
        print(path)
    return [str(p) for p in paths]
