"""`cvseg` command line: one verb per stage, each a thin job (parse, configure, call the pipeline)."""
from __future__ import annotations

import argparse
import sys

from core import __version__
from jobs import calibrate, demo, dump, features, fit, generate, ingest, models_cmd, score, show
from jobs import export as export_cmd, run as run_cmd
from jobs import maintain as maintain_cmd
from jobs import segments as segments_cmd, trends as trends_cmd
from jobs import report as report_cmd
from jobs import backtest as backtest_cmd
from jobs.common import add_config_args, run_main

VERBS = {
    "generate": generate,
    "ingest": ingest,
    "features": features,
    "calibrate": calibrate,
    "fit": fit,
    "backtest": backtest_cmd,
    "score": score,
    "segments": segments_cmd,
    "trends": trends_cmd,
    "export": export_cmd,
    "run": run_cmd,
    "maintain": maintain_cmd,
    "report": report_cmd,
    "models": models_cmd,
    "show": show,
    "dump": dump,
    "demo": demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvseg", description="Customer 6-month value, segments and trends on Apache Spark.")
    parser.add_argument("--version", action="version", version=f"cvseg {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, module in VERBS.items():
        verb = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(verb)
        add_config_args(verb)
        verb.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
