"""The backtest stage runner: :func:`run_backtest` builds (or reuses) the calibration tables, fits and
measures every model at each origin, logs the run to MLflow (:func:`core.tracking.log_backtest`), picks
the champion and writes ``model_backtest`` / ``model_backtest_deciles``."""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.config import ByChannelConf, Config
from core.dates import add_months
from core.results import StageResult
from core.storage import Storage
from core.tracking import BacktestFit, BacktestRuns
from core.tables import CALIBRATION_HOLDOUT, MODEL_BACKTEST, MODEL_BACKTEST_DECILES, ORDERS
from models.bundle import ScoringBundle
from models.metrics import METRIC_COLUMNS, METRIC_DIRECTION
from pipelines.backtest.fits import OriginModels, fit_origin_models
from pipelines.backtest.metrics import actual_tie_groups, collect_actual_ranks, compute_metrics
from pipelines.backtest.schema import INTERVAL_METRIC_COLUMNS, BacktestError
from pipelines.backtest.transforms import backtest_origins, predict_all
from pipelines.calibration import holdout_end, run_calibration
from pipelines.ltv import channel_run_params


log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------
def ensure_calibration(storage: Storage, cutoff: dt.date, config: Config, rebuild: bool = False
                       ) -> tuple[DataFrame, bool]:
    """The ``calibration_holdout`` rows at ``cutoff``; reused when the partition exists with the same
    horizon end and time unit (else built and written). Returns (rows, reused)."""
    features_conf = config.features
    expected_end = holdout_end(cutoff, config.models.horizon_months)
    if not rebuild and storage.exists(CALIBRATION_HOLDOUT):
        existing = (storage.read(CALIBRATION_HOLDOUT).where(F.col("cutoff_date") == F.lit(cutoff))
                    .select("horizon_end", "time_unit").limit(1).collect())
        if existing and existing[0]["horizon_end"] == expected_end \
                and existing[0]["time_unit"] == features_conf.time_unit \
                and not lacks_net_basis(calibration_rows(storage, cutoff)):
            return calibration_rows(storage, cutoff), True
        if existing:
            log.warning("calibration_holdout at %s was built with horizon end %s / %s; rebuilding it for %s / %s",
                        cutoff, existing[0]["horizon_end"], existing[0]["time_unit"], expected_end,
                        features_conf.time_unit)
    run_calibration(storage, cutoff, features_conf, config.models.horizon_months)
    return calibration_rows(storage, cutoff), False


def lacks_net_basis(rows_df: DataFrame) -> bool:
    """A partition written before the net-basis columns existed (they read as null there)."""
    lacks = F.col("net_first_order_date").isNull() & (F.col("n_orders") > F.col("n_cancelled"))
    return bool(rows_df.where(lacks).limit(1).count())


def calibration_rows(storage: Storage, cutoff: dt.date) -> DataFrame:
    return storage.read(CALIBRATION_HOLDOUT).where(F.col("cutoff_date") == F.lit(cutoff))


@dataclass
class OriginResult:
    origin: dt.date
    cutoff: dt.date
    horizon_end: dt.date
    calibration_version: int
    reused: dict[str, bool]
    models: OriginModels
    metrics: pd.DataFrame
    deciles: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)


def run_origin(storage: Storage, origin: dt.date, config: Config, rebuild: bool = False) -> OriginResult:
    """Calibration at ``origin - H`` (and ``- 2H`` for the cohort cells), fits, predictions, metrics."""
    horizon = config.models.horizon_months
    cutoff = add_months(origin, -horizon)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    holdout_df, reused = ensure_calibration(storage, cutoff, config, rebuild)
    reused_flags = {"calibration": reused}
    cohort_train_df = None
    if config.models.compare_cohort:
        cohort_train_df, reused_flags["cohort_cells"] = ensure_calibration(
            storage, add_months(cutoff, -horizon), config, rebuild)
    seconds["calibration"] = time.perf_counter() - started
    version = storage.version(CALIBRATION_HOLDOUT)
    models = fit_origin_models(holdout_df, cohort_train_df, config)
    if config.models.hybrid.enabled:    # the hybrid, trained one horizon back: pipelines/hybrid.py
        from pipelines.hybrid import origin_hybrids

        hybrids, hybrid_seconds, models.notes = origin_hybrids(storage, cutoff, config, models.bundles, rebuild)
        models.bundles.update(hybrids)
        models.seconds.update(hybrid_seconds)
    started = time.perf_counter()
    # the realised values' ranks: the same for every model, computed once per origin
    actual_groups = actual_tie_groups(holdout_df).persist(StorageLevel.MEMORY_AND_DISK)
    predictions_df = predict_all(holdout_df, models.bundles, config.models.intervals,
                                 collect_actual_ranks(actual_groups)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        metrics, deciles = compute_metrics(predictions_df, actual_groups)
    finally:
        predictions_df.unpersist()
        actual_groups.unpersist()
    seconds["predict_and_metrics"] = time.perf_counter() - started
    return OriginResult(origin=origin, cutoff=cutoff, horizon_end=holdout_end(cutoff, horizon),
                        calibration_version=version, reused=reused_flags, models=models, metrics=metrics,
                        deciles=deciles, seconds=seconds)


def choose_champion(metrics: pd.DataFrame, metric: str) -> tuple[str, pd.Series]:
    """The model with the best mean of ``metric`` over the origins (NaN origins ignored).

    Returns (model name, mean metric per model). Lower is better for errors, higher for
    spearman, gini and capture (:data:`METRIC_DIRECTION`).
    """
    if metric not in METRIC_DIRECTION:
        raise BacktestError(f"models.champion_metric {metric!r}: must be one of {sorted(METRIC_DIRECTION)}")
    means = metrics.groupby("model")[metric].mean().dropna()
    if means.empty:
        raise BacktestError(f"no model has a finite {metric} (e.g. no revenue in any holdout); choose another "
                            "models.champion_metric or a period with sales")
    best = means.idxmax() if METRIC_DIRECTION[metric] else means.idxmin()
    return str(best), means


def compare_bases(means: pd.Series, bundles: Mapping[str, ScoringBundle], metric: str) -> dict[str, Any]:
    """Per basis: its best BTYD model and that model's mean ``metric`` (what decided the basis)."""
    better_high = METRIC_DIRECTION[metric]
    out: dict[str, Any] = {}
    for name, value in means.items():
        bundle = bundles.get(name)
        if bundle is None or bundle.value_model != "btyd" or not math.isfinite(float(value)):
            continue
        best = out.get(bundle.purchase_basis)
        if best is None or (value > best["value"] if better_high else value < best["value"]):
            out[bundle.purchase_basis] = {"model": name, "value": float(value)}
    return out


def calibration_figure(deciles: pd.DataFrame, title: str):
    """Predicted vs actual mean 6-month net value per predicted decile (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    x = deciles["decile"].to_numpy()
    width = 0.4
    axes.bar(x - width / 2, deciles["mean_predicted"].fillna(0.0), width, label="predicted (mean)")
    axes.bar(x + width / 2, deciles["mean_actual"].fillna(0.0), width, label="actual (mean)")
    axes.set_xticks(x)
    axes.set_xlabel("decile of predicted value (1 = highest)")
    axes.set_ylabel("net value per customer over the horizon")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure


def parameter_table(bundle: ScoringBundle) -> pd.DataFrame:
    """Component, parameter, value and standard error (when the fit reports one) for the CSV artifact."""
    rows = []
    components = {"purchase": bundle.purchase, "spend": bundle.spend, "cancellation": bundle.cancellation}
    for role, model in components.items():
        errors = (model.fit_info_ or {}).get("standard_errors") or {}
        for name, value in model.params_.items():
            if np.isscalar(value):
                rows.append({"component": role, "model": model.name, "parameter": name, "value": float(value),
                             "standard_error": errors.get(name)})
    if bundle.by_channel is not None:          # per channel, component "purchase:<channel>" / "spend:<channel>"
        for role, by_channel in (("purchase", bundle.by_channel.purchase), ("spend", bundle.by_channel.spend)):
            for channel, model in sorted(by_channel.items()):
                for name, value in model.params_.items():
                    rows.append({"component": f"{role}:{channel}", "model": model.name, "parameter": name,
                                 "value": float(value), "standard_error": None})
                rows.append({"component": f"{role}:{channel}", "model": model.name, "parameter": "n_customers",
                             "value": float(model.fit_info_.get("n_customers", 0.0)), "standard_error": None})
    if bundle.cohort is not None:
        info = bundle.cohort.fit_info_
        rows.append({"component": "cohort", "model": "cohort", "parameter": "population_mean",
                     "value": bundle.cohort.params_["population_mean"], "standard_error": None})
        for key in ("n_cells", "n_sparse_cells", "customers_in_sparse_cells"):
            rows.append({"component": "cohort", "model": "cohort", "parameter": key, "value": float(info[key]),
                         "standard_error": None})
    return pd.DataFrame(rows, columns=["component", "model", "parameter", "value", "standard_error"])


def channel_params(conf: ByChannelConf) -> dict[str, Any]:
    """MLflow parameters of the channel-aware variants' settings (``models.by_channel``)."""
    return {"by_channel_enabled": conf.enabled, "by_channel_prior_customers": conf.prior_customers,
            "by_channel_min_customers": conf.min_customers}


@dataclass(frozen=True)
class BacktestResult(StageResult):
    """What :func:`run_backtest` measured and registered (``metrics``: one JSON row per model and
    origin; ``seconds``: the stages' wall times; ``calibration_reused``: per origin, whether its
    calibration partitions were read rather than rebuilt)."""
    backtest_run_id: str
    as_of: dt.date
    origins: tuple[dt.date, ...]
    horizon_months: int
    champion: str
    champion_metric: str
    champion_purchase_basis: str
    purchase_basis: str                  # models.purchase_basis as configured (auto | gross | net)
    basis_comparison: dict[str, Any]
    champion_version: str | None
    mean_metric: dict[str, float]
    model_versions: dict[str, str | None]
    mlflow_parent_run_id: str | None
    metrics: list[dict[str, Any]]
    calibration_reused: dict[str, dict[str, bool]]
    notes: tuple[str, ...]
    seconds: dict[str, float]

    def summary_line(self) -> str:
        version = (f" -> registered version {self.champion_version} has alias 'champion'" if self.champion_version
                   else " (not registered)")
        return (f"backtest {self.backtest_run_id}, {len(self.origins)} origin(s): champion by mean "
                f"{self.champion_metric}: {self.champion}{version}")


def run_backtest(storage: Storage, as_of: dt.date, config: Config, n_origins: int = 1,
                 spacing_months: int = 1, backtest_run_id: str | None = None, rebuild: bool = False,
                 track: bool = True) -> BacktestResult:
    """Backtest every configured model at ``n_origins`` origins, log to MLflow, register and pick the
    champion, and merge the results into ``model_backtest`` / ``model_backtest_deciles``.

    ``backtest_run_id`` (default: a new id) keys the rows: re-running with the same id replaces that
    run's rows instead of adding them.
    """
    origins = backtest_origins(as_of, n_origins, spacing_months)
    run_id = backtest_run_id or f"bt-{as_of.isoformat()}-{uuid.uuid4().hex[:8]}"
    started_all = time.perf_counter()
    results = [run_origin(storage, origin, config, rebuild) for origin in origins]
    all_metrics = pd.concat([r.metrics.assign(origin_date=r.origin) for r in results], ignore_index=True)
    champion_metric = config.champion_metric
    champion, means = choose_champion(all_metrics, champion_metric)
    champion_basis = results[0].models.bundles[champion].purchase_basis
    basis_comparison = compare_bases(means, results[0].models.bundles, champion_metric)
    created_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    importance_rows = []
    if any(b.value_model == "hybrid" for b in results[0].models.bundles.values()):
        from pipelines.hybrid import importance_rows as hybrid_importance_rows

        newest = results[0]
        importance_rows = hybrid_importance_rows(newest.models.bundles, calibration_rows(storage, newest.cutoff),
                                                 config.models.hybrid, run_id, newest.origin, newest.cutoff, created_at)

    runs = None
    started = time.perf_counter()
    if track:
        from core import tracking

        target = tracking.tracking_target(config)
        tracking.start(target)
        parent_params = {"backtest_run_id": run_id, "as_of": as_of.isoformat(), "origins": len(origins),
                         "spacing_months": spacing_months, "horizon_months": config.models.horizon_months,
                         "time_unit": config.features.time_unit, "penalizer_coef": config.models.penalizer_coef,
                         "purchase_models": list(config.models.purchase_models),
                         "compare_cohort": config.models.compare_cohort, "compare_naive": config.models.compare_naive,
                         "champion_metric": champion_metric, "orders_version": storage.version(ORDERS),
                         "purchase_basis": config.models.purchase_basis,
                         **channel_params(config.models.by_channel)}
        runs = tracking.log_backtest(
            target.registered_model, f"backtest-{as_of.isoformat()}", parent_params,
            {"kind": "backtest", "backtest_run_id": run_id}, _backtest_fits(results, run_id, config), champion,
            summary_metrics={f"mean_{champion_metric}_{m}": v for m, v in means.items()},
            summary_artifacts={"backtest_metrics": all_metrics,
                               "champion": {"model": champion, "metric": champion_metric,
                                            "purchase_basis": champion_basis, "basis_comparison": basis_comparison}})
    tracking_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _write_backtest_tables(storage, results, run_id, config, champion, runs, created_at, importance_rows)
    write_seconds = time.perf_counter() - started
    return BacktestResult(
        backtest_run_id=run_id, as_of=as_of, origins=tuple(origins), horizon_months=config.models.horizon_months,
        champion=champion, champion_metric=champion_metric, champion_purchase_basis=champion_basis,
        purchase_basis=config.models.purchase_basis, basis_comparison=basis_comparison,
        champion_version=runs.champion_version if runs else None, mean_metric={k: float(v) for k, v in means.items()},
        model_versions=dict(runs.versions) if runs else {}, mlflow_parent_run_id=runs.parent_run_id if runs else None,
        metrics=[{**{k: _json_value(v) for k, v in r.items()}, "origin_date": r["origin_date"].isoformat()}
                 for r in all_metrics.to_dict("records")],
        calibration_reused={r.origin.isoformat(): r.reused for r in results},
        notes=tuple(note for r in results for note in r.models.notes),
        seconds={"total": round(time.perf_counter() - started_all, 2), "mlflow": round(tracking_seconds, 2),
                 "write_tables": round(write_seconds, 2),
                 **{f"{r.origin.isoformat()}_{k}": round(v, 2) for r in results
                    for k, v in {**r.seconds, **r.models.seconds}.items()}})


def _backtest_fits(results: Sequence[OriginResult], run_id: str, config: Config) -> Iterator[BacktestFit]:
    """Each fitted model at each origin as MLflow logs it; the newest origin's fits are registered
    (what was just measured). MLflow parameter names are read back by ``cvseg models`` and the
    nightly refit: keep them."""
    horizon = config.models.horizon_months
    for position, result in enumerate(results):
        for name, bundle in result.models.bundles.items():
            row = result.metrics.set_index("model").loc[name]
            deciles = result.deciles[result.deciles["model"] == name].drop(columns="model")
            params = {"model": name, "value_model": bundle.value_model,
                      "purchase_model": bundle.purchase.name, "purchase_basis": bundle.purchase_basis,
                      "as_of": result.cutoff.isoformat(), "origin": result.origin.isoformat(),
                      "cutoff_date": result.cutoff.isoformat(), "horizon_end": result.horizon_end.isoformat(),
                      "horizon_months": horizon, "time_unit": config.features.time_unit,
                      "penalizer_coef": config.models.penalizer_coef,
                      "calibration_holdout_version": result.calibration_version,
                      "backtest_run_id": run_id}
            params.update(channel_run_params(bundle))    # nightly refits a channel-aware champion as such
            if name == "cohort":
                params.update(cohort_min_cell_size=config.models.cohort_min_cell_size,
                              cohort_by_channel=config.models.cohort_by_channel)
            metrics = {m: row[m] for m in (*METRIC_COLUMNS, *INTERVAL_METRIC_COLUMNS, "n_customers",
                                           "predicted_total", "actual_total")}
            suffix = "" if bundle.purchase_basis == "gross" else f"_{bundle.purchase_basis}"
            metrics.update({f"fit_seconds_{k.removeprefix('fit_')}": v
                            for k, v in result.models.seconds.items()
                            if k == f"fit_{name}" or k in (f"fit_gamma_gamma{suffix}",
                                                           f"sufficient_statistics{suffix}")})
            artifacts = {"decile_table": deciles, "parameters": parameter_table(bundle),
                         "calibration_plot": calibration_figure(
                             deciles, f"{name}: origin {result.origin}, cutoff {result.cutoff}")}
            bundle.metadata.update({"backtest_run_id": run_id, "cutoff_date": result.cutoff.isoformat(),
                                    "origin": result.origin.isoformat(), "model": name})
            if bundle.value_model == "hybrid":     # training cutoff, sample size, importances
                from pipelines.hybrid import tracking_extras

                extra_params, extra_artifacts = tracking_extras(bundle)
                params.update(extra_params)
                artifacts.update(extra_artifacts)
            yield BacktestFit(result.origin, name, bundle, params, metrics, artifacts,
                              {"kind": "backtest_fit", "backtest_run_id": run_id}, register=position == 0)


def _write_backtest_tables(storage: Storage, results: Sequence[OriginResult], run_id: str, config: Config,
                           champion: str, runs: BacktestRuns | None, created_at: dt.datetime,
                           importance_rows: list[dict[str, Any]]) -> None:
    """Merge the run's rows into ``model_backtest``, ``model_backtest_deciles`` (and the hybrid's
    ``model_importances``): a few rows per model, built on the driver, merged by key (a re-run with
    the same ``run_id`` replaces its rows)."""
    spark = storage.spark
    rows = []
    decile_rows = []
    for result in results:
        for record in result.metrics.to_dict("records"):
            name = record["model"]
            bundle = result.models.bundles[name]
            rows.append({
                "backtest_run_id": run_id, "origin_date": result.origin, "cutoff_date": result.cutoff,
                "horizon_end": result.horizon_end, "horizon_months": config.models.horizon_months,
                "time_unit": config.features.time_unit,
                "model": name, "value_model": bundle.value_model, "purchase_model": bundle.purchase.name,
                "purchase_basis": bundle.purchase_basis,
                "penalizer_coef": float(config.models.penalizer_coef),
                "n_customers": int(record["n_customers"]), "actual_total": float(record["actual_total"]),
                "predicted_total": float(record["predicted_total"]),
                **{m: _finite_or_none(record[m]) for m in (*METRIC_COLUMNS, *INTERVAL_METRIC_COLUMNS)},
                "calibration_holdout_version": int(result.calibration_version),
                "mlflow_run_id": runs.run_ids.get((result.origin, name)) if runs else None,
                "mlflow_parent_run_id": runs.parent_run_id if runs else None,
                "model_version": runs.versions.get(name) if runs and result is results[0] else None,
                "is_champion": bool(name == champion),
                "champion_metric": config.champion_metric, "created_at": created_at})
        for record in result.deciles.to_dict("records"):
            decile_rows.append({
                "backtest_run_id": run_id, "origin_date": result.origin, "model": record["model"],
                "decile": int(record["decile"]), "n": int(record["n"]),
                "mean_predicted": _finite_or_none(record["mean_predicted"]),
                "mean_actual": _finite_or_none(record["mean_actual"]),
                "sum_predicted": float(record["sum_predicted"]), "sum_actual": float(record["sum_actual"]),
                "created_at": created_at})
    storage.merge(MODEL_BACKTEST, spark.createDataFrame(rows, MODEL_BACKTEST.schema))
    storage.merge(MODEL_BACKTEST_DECILES, spark.createDataFrame(decile_rows, MODEL_BACKTEST_DECILES.schema))
    if importance_rows:
        from core.tables import MODEL_IMPORTANCES

        storage.merge(MODEL_IMPORTANCES, spark.createDataFrame(importance_rows, MODEL_IMPORTANCES.schema))


def _json_value(value: Any) -> Any:
    """numpy scalars to Python, NaN to None (for the JSON summary)."""
    if isinstance(value, (float, np.floating)):
        return _finite_or_none(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _finite_or_none(value: Any) -> float | None:
    """Delta/JSON-friendly: NaN (a degenerate metric) is stored as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
