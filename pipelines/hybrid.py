"""The hybrid model's Spark side: training frame, bounded stratified sample, fit, and its place in the
backtest and the nightly refit (the model itself: :mod:`models.hybrid`).

For a cutoff ``C`` (the date the hybrid scores at) and the horizon ``H``:

* the **training frame** is ``calibration_holdout`` at ``C - H``: customer features as of ``C - H``
  (nothing later) with ``holdout_net``, the realised net value in ``(C - H, C]``, as the target;
* a BTYD bundle is fitted on the features at ``C - H`` (same purchase model and basis as the hybrid's
  base) and gives the training rows their BTYD outputs; the bundle fitted at ``C`` gives the scored
  rows theirs, so each side sees only what was known at its own date;
* only a **stratified sample** of the training frame comes to the driver, at most
  ``models.hybrid.sample_rows`` rows (:func:`training_sample`): strata are frequency band x whether
  the customer bought in the target window; each stratum keeps its share of the population
  (proportional allocation: the sample needs no weights), chosen by a hash of the customer id and
  the seed (the same sample on every run);
* scoring every customer is the bundles' ``mapInPandas`` pass (:func:`pipelines.ltv.score_customers`,
  :func:`pipelines.backtest.predict_all`) with the :class:`models.hybrid.HybridBundle` broadcast.

The hybrid needs two horizons of history before the date it scores at (customers at ``C - H`` and
their next horizon): with fewer than ``models.hybrid.min_train_customers`` customers at ``C - H`` it
is skipped with a line saying so (:class:`HybridSkipped`), not an error.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from core.config import Config, HybridConf
from core.dates import add_months
from core.storage import Storage
from models.bundle import ScoringBundle
from models.hybrid import BEHAVIOUR_COLUMNS, HybridBundle, HybridValueModel, design_matrix, training_target
from pipelines.features import orders_dated
from pipelines.identity import read_orders
from pipelines.ltv import fit_btyd_bundles

log = logging.getLogger(__name__)

#: Frequency bands of the sampling strata (repeat purchase days): 0, 1, 2-3, 4-7, 8+.
FREQUENCY_STRATA = (0.0, 1.0, 2.0, 4.0, 8.0)
HYBRID = "hybrid"


class HybridSkipped(Exception):
    """Too little history for the hybrid at this cutoff; the message is the line to print."""


def hybrid_model_name(purchase_basis: str) -> str:
    """Backtest / registry name: ``hybrid`` (gross basis), ``hybrid_net``."""
    return HYBRID if purchase_basis == "gross" else f"{HYBRID}_{purchase_basis}"


def training_cutoff(cutoff: dt.date, horizon_months: int) -> dt.date:
    """The date the training rows' inputs are taken at: one horizon before ``cutoff``."""
    return add_months(cutoff, -horizon_months)


# --------------------------------------------------------------------------------------------
# Column functions and transforms
# --------------------------------------------------------------------------------------------
def stratum(frequency: Column, target: Column) -> Column:
    """``<frequency band>_<bought>``, e.g. ``2_1``: frequency band index x bought in the target window."""
    band = F.lit(0)
    for index, edge in enumerate(FREQUENCY_STRATA[1:], start=1):
        band = F.when(frequency >= F.lit(edge), F.lit(index)).otherwise(band)
    return F.concat_ws("_", band.cast("string"), (target > 0).cast("int").cast("string"))


def sample_key(customer_id: Column, seed: int) -> Column:
    """A uniform number in [0, 1) from the customer id and the seed (the same on every run)."""
    return (F.abs(F.xxhash64(customer_id, F.lit(seed))) % F.lit(1_000_000_007)) / F.lit(1_000_000_007.0)


def with_stratum(train_df: DataFrame, seed: int) -> DataFrame:
    return (train_df.withColumn("_stratum", stratum(F.col("frequency"), F.col("holdout_net")))
            .withColumn("_u", sample_key(F.col("customer_id"), seed)))


def training_sample(train_df: DataFrame, max_rows: int, seed: int) -> tuple[DataFrame, dict[str, Any]]:
    """At most ``max_rows`` rows of ``train_df``, each stratum keeping its share (see the module doc).

    One small aggregate (rows per stratum) reaches the driver; the sample stays a DataFrame. Each
    stratum ``s`` of ``n_s`` rows keeps its ``floor(max_rows * n_s / N)`` rows with the smallest key
    (a first pass keeps keys below a slightly higher fraction, so the window sorts only about the
    sample, not the population). Returns (sample, {population, strata counts, quota}).
    """
    if max_rows < 1:
        raise ValueError(f"models.hybrid.sample_rows must be at least 1 (got {max_rows})")
    keyed_df = with_stratum(train_df, seed)
    counts = {r["_stratum"]: int(r["n"]) for r in keyed_df.groupBy("_stratum").agg(F.count(F.lit(1)).alias("n"))
              .collect()}
    population = sum(counts.values())
    info: dict[str, Any] = {"population": population, "strata": counts, "max_rows": max_rows}
    if population <= max_rows:
        info["quota"] = counts
        return keyed_df.drop("_stratum", "_u"), info
    quota = {s: int(max_rows * n // population) for s, n in counts.items()}
    info["quota"] = quota
    # keys are uniform: a stratum's quota lies below quota/n plus a margin of ~5 standard deviations
    limits = {}
    for s, n in counts.items():
        share = quota[s] / n
        limits[s] = min(1.0, share + 5.0 * (share * (1.0 - share) / n) ** 0.5 + 1.0 / n)
    limit = F.lit(0.0)
    for s, bound in limits.items():
        limit = F.when(F.col("_stratum") == F.lit(s), F.lit(bound)).otherwise(limit)
    quota_col = F.lit(0)
    for s, q in quota.items():
        quota_col = F.when(F.col("_stratum") == F.lit(s), F.lit(q)).otherwise(quota_col)
    ordered = Window.partitionBy("_stratum").orderBy("_u", "customer_id").rowsBetween(
        Window.unboundedPreceding, Window.currentRow)
    # the same rows, plus the highest limit as a bound on the key alone, which Spark pushes below a
    # join in ``train_df``: only that share of the rows travels through the join and the window
    sample_df = (keyed_df.where(F.col("_u") < F.lit(max(limits.values()))).where(F.col("_u") < limit)
                 .withColumn("_rank", F.count(F.lit(1)).over(ordered))
                 .where(F.col("_rank") <= quota_col)
                 .drop("_stratum", "_u", "_rank"))
    return sample_df, info


# --------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------
@dataclass
class HybridFit:
    bundle: HybridBundle
    seconds: dict[str, float]
    sample: dict[str, Any]


def check_history(customers: int, train_cutoff: dt.date, scored_at: dt.date, min_customers: int) -> int:
    """Raises :class:`HybridSkipped` (the line to print) when the training frame has too few customers."""
    if customers < min_customers:
        raise HybridSkipped(
            f"hybrid skipped at {scored_at}: it trains on customers as of {train_cutoff} (two horizons before "
            f"the end of the holdout) and there are {customers:,} of them, fewer than "
            f"models.hybrid.min_train_customers={min_customers:,}; it needs two horizons of history")
    return customers


def fit_hybrid(train_df: DataFrame, scoring_btyd: ScoringBundle, conf: HybridConf, penalizer_coef: float,
               train_cutoff: dt.date, scored_at: dt.date, btyd_df: DataFrame | None = None) -> HybridFit:
    """Trees trained on ``train_df`` (``calibration_holdout`` at ``train_cutoff``), on top of
    ``scoring_btyd`` (the BTYD bundle fitted at ``scored_at``). The BTYD bundle at ``train_cutoff`` is
    fitted on ``btyd_df`` (default ``train_df``): the features alone, when ``train_df`` joins them
    with the target and the fit needs no target."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    sample_df, sample = training_sample(train_df, conf.sample_rows, conf.seed)   # counts the strata
    check_history(sample["population"], train_cutoff, scored_at, conf.min_train_customers)
    seconds["strata_counts"] = time.perf_counter() - started
    started = time.perf_counter()
    purchase_model = scoring_btyd.purchase.name
    fitted = fit_btyd_bundles(train_df if btyd_df is None else btyd_df, (purchase_model,), scoring_btyd.time_unit, scoring_btyd.horizon_months,
                              penalizer_coef, purchase_basis=scoring_btyd.purchase_basis)
    train_btyd = fitted.bundles[purchase_model]
    seconds["fit_btyd_at_training_cutoff"] = time.perf_counter() - started
    started = time.perf_counter()
    columns = list(dict.fromkeys((*train_btyd.feature_columns, *BEHAVIOUR_COLUMNS, "holdout_net")))
    rows = sample_df.select(*[F.col(c).cast("double") if c in ("n_orders", "n_cancelled", "n_purchase_days",
                                                               "orders_3m", "orders_6m") else F.col(c)
                              for c in columns]).toPandas()          # bounded: at most sample_rows rows
    if len(rows) > conf.sample_rows:
        raise AssertionError(f"training sample of {len(rows)} rows exceeds models.hybrid.sample_rows")
    sample["rows"] = len(rows)
    seconds["sample_to_driver"] = time.perf_counter() - started
    started = time.perf_counter()
    trees = model_from_conf(conf).fit(design_matrix(rows, train_btyd), training_target(rows))
    seconds["fit_trees"] = time.perf_counter() - started
    importances = dict(zip(trees.inputs_, _split_gain_importance(trees)))
    bundle = HybridBundle(btyd=scoring_btyd, trees=trees, metadata={
        "training_cutoff": train_cutoff.isoformat(), "scored_at": scored_at.isoformat(),
        "training_rows": len(rows), "training_population": sample["population"],
        "purchase_model": purchase_model, "purchase_basis": scoring_btyd.purchase_basis,
        "feature_importances": importances})
    return HybridFit(bundle=bundle, seconds=seconds, sample=sample)


def model_from_conf(conf: HybridConf) -> HybridValueModel:
    return HybridValueModel(max_iter=conf.max_iter, learning_rate=conf.learning_rate,
                            max_leaf_nodes=conf.max_leaf_nodes, min_samples_leaf=conf.min_samples_leaf,
                            loss=conf.loss, monotonic=conf.monotonic, random_state=conf.seed)


def _split_gain_importance(trees: HybridValueModel) -> list[float]:
    """Each input's share of the trees' total split gain (what the trees used while fitting; the
    report's permutation importance says what the predictions lean on)."""
    import numpy as np

    gains = np.zeros(len(trees.inputs_))
    for stage in trees.estimator_._predictors:                  # noqa: SLF001 -- scikit-learn keeps no public API
        for predictor in stage:
            nodes = predictor.nodes
            split = nodes["is_leaf"] == 0
            np.add.at(gains, nodes["feature_idx"][split], nodes["gain"][split])
    total = gains.sum()
    return [float(g / total) if total > 0 else 0.0 for g in gains]


# --------------------------------------------------------------------------------------------
# Hooks: backtest and nightly refit
# --------------------------------------------------------------------------------------------
def hybrid_bundles(train_df: DataFrame, bundles: Mapping[str, ScoringBundle], conf: HybridConf,
                   purchase_models: tuple[str, ...], penalizer_coef: float, train_cutoff: dt.date,
                   scored_at: dt.date) -> tuple[dict[str, HybridBundle], dict[str, float], list[str]]:
    """The hybrid on each basis present in ``bundles`` (base: ``models.hybrid.base_model``, default the
    first purchase model). Returns (bundles by name, seconds, lines to print: skips)."""
    base_model = conf.base_model or purchase_models[0]
    out: dict[str, HybridBundle] = {}
    seconds: dict[str, float] = {}
    bases = dict.fromkeys(b.purchase_basis for b in bundles.values() if b.value_model == "btyd"
                          and b.purchase.name == base_model)
    for basis in bases:
        btyd = next(b for b in bundles.values() if b.value_model == "btyd" and b.purchase.name == base_model
                    and b.purchase_basis == basis)
        name = hybrid_model_name(basis)
        try:
            fit = fit_hybrid(train_df, btyd, conf, penalizer_coef, train_cutoff, scored_at)
        except HybridSkipped as skipped:
            return {}, seconds, [str(skipped)]
        out[name] = fit.bundle
        seconds.update({f"{k}_{name}": v for k, v in fit.seconds.items()})
    return out, seconds, []


def holdout_importance(bundle: HybridBundle, holdout_df: DataFrame, conf: HybridConf) -> pd.DataFrame:
    """Permutation importance of the hybrid's inputs on a bounded sample of ``holdout_df`` (features at
    the scoring cutoff, with the realised ``holdout_net``): how much the mean absolute error per
    customer grows when one input is shuffled."""
    sample_df, _ = training_sample(holdout_df, conf.importance_rows, conf.seed + 1)
    columns = list(dict.fromkeys((*bundle.feature_columns, "holdout_net")))
    rows = sample_df.select(*[F.col(c).cast("double") if c in ("n_orders", "n_cancelled", "n_purchase_days",
                                                               "orders_3m", "orders_6m") else F.col(c)
                              for c in columns]).toPandas()
    table = bundle.trees.permutation_importance(design_matrix(rows, bundle.btyd),
                                                rows["holdout_net"].to_numpy(float), seed=conf.seed)
    table.attrs["rows"] = len(rows)
    return table


@dataclass(frozen=True)
class TrainingFrame:
    """The hybrid's training rows at a cutoff: ``rows`` (features with ``holdout_net``), ``features``
    (the same customers' features without the target: what the BTYD fit reads) and where they came from."""

    rows: DataFrame
    features: DataFrame
    source: str


def training_frame(storage: Storage, train_cutoff: dt.date, config: Config) -> TrainingFrame:
    """The training rows at ``train_cutoff``: the stored ``customer_features`` partition of that date (the
    nightly run of that day wrote it) with each customer's net value in the next horizon from ``orders``,
    when it exists in this release's columns and time unit; else ``calibration_holdout`` (reused or built
    from every order)."""
    from core.tables import CUSTOMER_FEATURES
    from pipelines.backtest import ensure_calibration, lacks_net_basis
    from pipelines.calibration import holdout_end

    horizon = config.models.horizon_months
    if storage.exists(CUSTOMER_FEATURES):
        features_df = storage.read(CUSTOMER_FEATURES, partitions={"as_of_date": [train_cutoff]})
        stored = features_df.select("time_unit").limit(1).collect()
        if stored and stored[0]["time_unit"] == config.features.time_unit and not lacks_net_basis(features_df):
            end = holdout_end(train_cutoff, horizon)
            # only the horizon's order months are read (the history before it is most of the table);
            # the trees need the net value only (holdout_actuals' distinct order days cost a second shuffle)
            actuals_df = (orders_dated(read_orders(storage), train_cutoff, end)
                          .groupBy("customer_id").agg(F.sum("net_amount").alias("holdout_net")))
            rows_df = (features_df.join(actuals_df, on="customer_id", how="left")
                       .fillna(0.0, subset=["holdout_net"]))
            return TrainingFrame(rows=rows_df, features=features_df, source="customer_features")
    train_df, _ = ensure_calibration(storage, train_cutoff, config)
    return TrainingFrame(rows=train_df, features=train_df, source="calibration_holdout")


def refit_hybrid(storage: Storage, as_of_date: dt.date, scoring_btyd: ScoringBundle, config: Config
                 ) -> tuple[HybridBundle | None, str | None, dict[str, float]]:
    """The nightly refit of a hybrid champion at D: trees on the customers as of D - H (:func:`training_frame`)
    on top of ``scoring_btyd`` (fitted at D). Returns (bundle or None, the skip line, seconds)."""
    cutoff = training_cutoff(as_of_date, config.models.horizon_months)
    started = time.perf_counter()
    base_model = config.models.hybrid.base_model
    if base_model and base_model != scoring_btyd.purchase.name:     # the base the backtest's hybrid had
        from core.tables import CUSTOMER_FEATURES

        features_df = storage.read(CUSTOMER_FEATURES, partitions={"as_of_date": [as_of_date]})
        scoring_btyd = fit_btyd_bundles(features_df, (base_model,), scoring_btyd.time_unit,
                                        scoring_btyd.horizon_months, config.models.penalizer_coef,
                                        purchase_basis=scoring_btyd.purchase_basis).bundles[base_model]
    frame = training_frame(storage, cutoff, config)
    # not cached: caching the 2M-row frame cost more (~11 s at 2M) than the two passes that read it
    # (the strata counts read two columns; the sample only the rows under its key bound)
    try:
        fit = fit_hybrid(frame.rows, scoring_btyd, config.models.hybrid, config.models.penalizer_coef, cutoff,
                         as_of_date, btyd_df=frame.features)
    except HybridSkipped as skipped:
        return None, str(skipped), {}
    return fit.bundle, None, {"training_frame_and_fit": time.perf_counter() - started, **fit.seconds}


def origin_hybrids(storage: Storage, cutoff: dt.date, config: Config, bundles: Mapping[str, ScoringBundle],
                   rebuild: bool = False) -> tuple[dict[str, HybridBundle], dict[str, float], list[str]]:
    """The backtest's hybrids at one cutoff (trained on ``calibration_holdout`` at cutoff - H), or a
    skip line when the orders start after that date (nothing is built then)."""
    from core.tables import ORDERS
    from pipelines.backtest import ensure_calibration

    horizon = config.models.horizon_months
    train_cutoff = training_cutoff(cutoff, horizon)
    first = storage.read(ORDERS).agg(F.min("order_date").alias("first")).first()["first"]
    if first is None or first > train_cutoff:
        return {}, {}, [f"hybrid skipped at cutoff {cutoff}: it trains on customers as of {train_cutoff} and the "
                        f"orders start on {first}; it needs two horizons of history before the end of the holdout"]
    started = time.perf_counter()
    train_df, _ = ensure_calibration(storage, train_cutoff, config, rebuild)
    seconds = {"hybrid_calibration": time.perf_counter() - started}
    out, fit_seconds, lines = hybrid_bundles(train_df, bundles, config.models.hybrid, config.models.purchase_models,
                                             config.models.penalizer_coef, train_cutoff, cutoff)
    return out, {**seconds, **fit_seconds}, lines


def tracking_extras(bundle: HybridBundle) -> tuple[dict[str, Any], dict[str, Any]]:
    """MLflow params (training cutoff and sample size) and artifacts (feature importances) of a hybrid."""
    meta = bundle.metadata
    params = {"hybrid_training_cutoff": meta.get("training_cutoff"), "hybrid_training_rows": meta.get("training_rows"),
              "hybrid_training_population": meta.get("training_population"),
              "hybrid_inputs": list(bundle.trees.inputs_ or ()), "hybrid_loss": bundle.trees.loss,
              "hybrid_max_iter": bundle.trees.max_iter, "hybrid_min_samples_leaf": bundle.trees.min_samples_leaf}
    importances = pd.DataFrame(sorted((meta.get("feature_importances") or {}).items(), key=lambda kv: -kv[1]),
                               columns=["feature", "split_gain_share"])
    artifacts: dict[str, Any] = {"feature_importances": importances}
    if meta.get("permutation_importance") is not None:
        artifacts["permutation_importance"] = pd.DataFrame(meta["permutation_importance"])
    return params, artifacts


def importance_rows(bundles: Mapping[str, Any], holdout_df: DataFrame, conf: HybridConf, backtest_run_id: str,
                    origin: dt.date, cutoff: dt.date, created_at: dt.datetime) -> list[dict[str, Any]]:
    """``model_importances`` rows of every hybrid in ``bundles`` on the holdout at ``cutoff``; the
    permutation importance is also kept in the bundle's metadata (an MLflow artifact)."""
    rows: list[dict[str, Any]] = []
    for name, bundle in bundles.items():
        if bundle.value_model != HYBRID:
            continue
        table = holdout_importance(bundle, holdout_df, conf)
        bundle.metadata["permutation_importance"] = table.to_dict("records")
        gains = bundle.metadata.get("feature_importances") or {}
        described = bundle.btyd.describe()
        base_params = json.dumps({**(described["purchase_params"] or {}),
                                  **{f"gamma_gamma_{k}": v for k, v in (described["spend_params"] or {}).items()}})
        for rank, record in enumerate(table.to_dict("records"), start=1):
            rows.append({"backtest_run_id": backtest_run_id, "origin_date": origin, "cutoff_date": cutoff,
                         "model": name, "feature": record["feature"], "rank": rank,
                         "importance": float(record["importance"]), "importance_std": float(record["importance_std"]),
                         "split_gain_share": gains.get(record["feature"]),
                         "training_cutoff": dt.date.fromisoformat(bundle.metadata["training_cutoff"]),
                         "training_rows": int(bundle.metadata["training_rows"]),
                         "holdout_rows": int(table.attrs["rows"]),
                         "base_model": bundle.purchase.name, "base_params": base_params, "created_at": created_at})
    return rows
