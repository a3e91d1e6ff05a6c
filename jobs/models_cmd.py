"""`cvseg models`: registered model versions and which one is champion."""
from __future__ import annotations

import argparse

from jobs.common import config_from

HELP = "list registered model versions and the champion"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace):
    import pandas as pd

    from core import tracking

    config = config_from(args)
    target = tracking.tracking_target(config)
    tracking.start(target)
    versions = tracking.list_versions(target.registered_model)
    print(f"registered model {target.registered_model} at {target.uri}")
    if versions.empty:
        print("(no versions yet: run `cvseg fit --register` or `cvseg backtest`)")
        return versions
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(versions.drop(columns=["run_id"]).to_string(index=False))
    champion = tracking.champion_version(target.registered_model)
    print(f"champion: version {champion}" if champion else "champion: none")
    return versions
