"""Every model fitted at one cutoff: the BTYD family on each purchase basis, their channel-aware variants,
the cohort method, the naive baseline and the hybrid."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from pyspark.sql import DataFrame

from core.config import Config
from models import DEFAULT_BANDS, CohortModel, NaiveRepeatModel
from models.bundle import ScoringBundle
from pipelines.backtest.schema import BacktestError
from pipelines.backtest.transforms import cohort_cell_stats, cohort_key_columns
from pipelines.ltv import fit_btyd_bundles


log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Models fitted at one cutoff
# --------------------------------------------------------------------------------------------
def fit_cohort_model(cohort_train_df: DataFrame, time_unit: str, min_cell_size: int, with_channel: bool,
                     bands: Mapping[str, Sequence[float]] = DEFAULT_BANDS) -> CohortModel:
    """Cells at ``C - H`` with their actual net revenue in ``(C - H, C]`` -> a fitted cohort model."""
    cells = cohort_cell_stats(cohort_train_df, time_unit, bands, with_channel).toPandas()  # one row per cell
    if cells.empty:
        raise BacktestError("the cohort method has no customers one horizon before the cutoff; backtest a later "
                            "--as-of, or set models.compare_cohort=false")
    if cells[list(cohort_key_columns(with_channel))].isna().any(axis=None):
        raise BacktestError("some customers fall below the first cohort band edge (negative recency or tenure); "
                            "check customer_features for this cutoff")
    return CohortModel(key_columns=cohort_key_columns(with_channel), min_cell_size=min_cell_size).fit(cells)


@dataclass
class OriginModels:
    bundles: dict[str, ScoringBundle]
    seconds: dict[str, float]
    sizes: dict[str, int]
    notes: list[str] = field(default_factory=list)     # lines for the output, e.g. why the hybrid was skipped


def purchase_bases(configured: str) -> tuple[str, ...]:
    """The bases a backtest compares: both under ``auto``, else the configured one."""
    return ("gross", "net") if configured == "auto" else (configured,)


def basis_model_name(purchase_model: str, purchase_basis: str) -> str:
    """Backtest / registry name of a purchase model on a basis: ``bgnbd`` (gross), ``bgnbd_net``."""
    return purchase_model if purchase_basis == "gross" else f"{purchase_model}_{purchase_basis}"


def fit_origin_models(holdout_df: DataFrame, cohort_train_df: DataFrame | None, config: Config) -> OriginModels:
    """Every configured model fitted at one cutoff, each as a scoring bundle keyed by model name
    (:func:`basis_model_name`: one per purchase model and basis).

    The cohort and naive bundles carry the first purchase model's BTYD components (first basis), so
    their scores still report p_alive and expected purchases; only the net value comes from the method.
    """
    models_conf, features_conf = config.models, config.features
    bundles: dict[str, ScoringBundle] = {}
    seconds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for basis in purchase_bases(models_conf.purchase_basis):
        fitted = fit_btyd_bundles(holdout_df, models_conf.purchase_models, features_conf.time_unit,
                                  models_conf.horizon_months, models_conf.penalizer_coef, purchase_basis=basis,
                                  by_channel=models_conf.by_channel)
        suffix = "" if basis == "gross" else f"_{basis}"
        bundles.update({basis_model_name(name, basis): b for name, b in fitted.bundles.items()})
        seconds.update({f"{k}{suffix}": v for k, v in fitted.seconds.items()})
        sizes.update({f"{k}{suffix}": v for k, v in fitted.sizes.items()})
    base = next(iter(bundles.values()))
    shared = dict(purchase=base.purchase, spend=base.spend, cancellation=base.cancellation,
                  horizon_months=models_conf.horizon_months, time_unit=features_conf.time_unit)
    if cohort_train_df is not None:
        started = time.perf_counter()
        cohort = fit_cohort_model(cohort_train_df, features_conf.time_unit, models_conf.cohort_min_cell_size,
                                  models_conf.cohort_by_channel)
        seconds["fit_cohort"] = time.perf_counter() - started
        bundles["cohort"] = ScoringBundle(value_model="cohort", cohort=cohort,
                                          cohort_with_channel=models_conf.cohort_by_channel, **shared)
    if models_conf.compare_naive:
        if models_conf.horizon_months != 6:
            log.warning("naive baseline skipped: it repeats the trailing six months (net_6m), which only "
                        "compares with a six-month horizon (models.horizon_months=%d)",
                        models_conf.horizon_months)
        else:
            bundles["naive"] = ScoringBundle(value_model="naive", naive=NaiveRepeatModel().fit(), **shared)
    return OriginModels(bundles=bundles, seconds=seconds, sizes=sizes)


