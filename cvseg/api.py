"""`cvseg.Engine`: the stage runners behind one object holding the session, the storage and the config."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Sequence

from core.config import Config
from core.config import load_config as _load_config
from core.dates import to_date
from core.errors import UserError

DateLike = dt.date | str


def load_config(conf: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """``conf/base.yaml`` + the environment file + ``conf`` (a YAML path) + ``KEY=VALUE`` overrides,
    exactly as the command line's ``--conf`` / ``--set`` layer them."""
    return _load_config(str(conf) if conf is not None else None, list(overrides))


def sample_conf(name: str) -> Path:
    """A shipped example configuration: ``"cdnow"`` (lifetimes' CDNOW sample) or ``"synthetic"``."""
    from jobs.demo import example_conf

    return example_conf(name)


def cdnow_sample_path() -> Path:
    """lifetimes' CDNOW sample (23,570 customers, 1997-01 .. 1998-06), as the engine ingests it."""
    from jobs.demo import cdnow_sample_path as path

    return path()


class Engine:
    """One warehouse, its config and a Spark session; one method per stage."""

    def __init__(self, spark, config: Config):
        from core.storage import Storage

        self.spark, self.config = spark, config
        self.storage = Storage(spark, config.storage.warehouse, config.storage.backend, config.storage.catalog,
                               s3=config.storage.s3)

    @classmethod
    def local(cls, warehouse: str | Path, conf: str | Path | None = None, overrides: Sequence[str] = ()) -> "Engine":
        """A session built from the config (local Spark by default) on the warehouse folder or URI
        ``warehouse`` (MLflow's local store inside it, as for the command line)."""
        from jobs.common import build_session

        config = load_config(conf, [f"storage.warehouse={warehouse}", *overrides])
        return cls(build_session(config), config)

    # ---- stages ------------------------------------------------------------------------------
    def ingest(self, path: str | Path | None = None, run_date: DateLike | None = None, *, source: str | None = None):
        """The order export(s) into ``orders`` (bad rows to ``orders_quarantine``), then identities.
        ``run_date``: orders after it are quarantined as future (default: today in business.timezone)."""
        from pipelines.ingest import read_day
        from pipelines.sources import run_sources

        day = to_date(run_date) if run_date is not None else read_day(self.config.validation,
                                                                       self.config.business.timezone)
        return run_sources(self.spark, self.storage, self.config, day, path=str(path) if path else None, only=source)

    def features(self, as_of: DateLike, full: bool = False):
        from pipelines.features import run_features

        return run_features(self.storage, to_date(as_of), self.config.features, full=full)

    def calibration(self, cutoff: DateLike):
        from pipelines.calibration import run_calibration

        return run_calibration(self.storage, to_date(cutoff), self.config.features,
                               self.config.models.horizon_months)

    def backtest(self, as_of: DateLike, origins: int = 1, spacing_months: int = 1, track: bool = True):
        """Every configured model fitted one horizon before each origin and measured on what followed;
        with ``track`` logged to MLflow and the best registered as the champion."""
        from pipelines.backtest import run_backtest

        return run_backtest(self.storage, to_date(as_of), self.config, n_origins=origins,
                            spacing_months=spacing_months, track=track)

    def score(self, as_of: DateLike, bundle=None, model_version: str | None = None):
        """Every customer scored with ``bundle`` (default: the registered champion)."""
        from core import tracking
        from pipelines.ltv import load_champion, run_score

        if bundle is None:
            target = tracking.tracking_target(self.config)
            tracking.start(target)
            bundle, model_version = load_champion(target.registered_model)
        return run_score(self.storage, to_date(as_of), bundle, model_version or "unregistered",
                         intervals=self.config.models.intervals)

    def segments(self, as_of: DateLike, new_generation: bool = False):
        from pipelines.segments import run_segments

        return run_segments(self.storage, to_date(as_of), self.config.segments, new_generation=new_generation)

    def trends(self, as_of: DateLike, rebuild: bool = False):
        from pipelines.trends import run_trends

        return run_trends(self.storage, to_date(as_of), self.config.trends, rebuild=rebuild)

    def export(self, as_of: DateLike, dest: str | Path | None = None):
        from pipelines.export import run_export

        return run_export(self.storage, to_date(as_of), self.config.export, dest=str(dest) if dest else None,
                          horizon_months=self.config.models.horizon_months, labels=self.config.segments.labels)

    def night(self, as_of: DateLike, **options: Any):
        """The nightly pipeline for one date, as `cvseg run` (options: see ``pipelines.nightly.run_nightly``)."""
        from pipelines.nightly import run_nightly

        return run_nightly(self.spark, self.storage, self.config, to_date(as_of), progress=lambda line: None,
                           **options)

    # ---- tables ------------------------------------------------------------------------------
    def table(self, name: str, as_of: DateLike | None = None):
        """A warehouse table as a Spark DataFrame; ``as_of`` keeps one date of a dated table
        (``as_of_date``, ``cutoff_date`` or ``origin_date``)."""
        from pyspark.sql import functions as F

        from core.tables import TABLES

        if name not in TABLES:
            raise TableArgumentError(f"unknown table {name!r}; tables are: {', '.join(TABLES)}")
        column = _date_column(name)
        if as_of is not None and column is None:
            dated = [table for table in TABLES if _date_column(table)]
            raise TableArgumentError(f"table {name} has no date column to select as_of on (it holds one current "
                                     f"state); read it without as_of. Tables with dates: {', '.join(dated)}")
        df = self.storage.read(name)
        return df if as_of is None else df.where(F.col(column) == F.lit(to_date(as_of)))


class TableArgumentError(UserError, ValueError):
    """``Engine.table`` was asked for a table the catalogue does not have, or for a date of an undated one."""


def _date_column(name: str) -> str | None:
    """The column a dated table is selected on (``Engine.table(..., as_of=)``), or None."""
    from core.tables import table_spec

    columns = table_spec(name).stored_columns
    return next((c for c in ("as_of_date", "cutoff_date", "origin_date") if c in columns), None)
