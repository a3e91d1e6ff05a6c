"""LTV stage: fit on sufficient statistics, score every customer with a vectorised pandas function.

Only small sufficient statistics reach the driver:

* purchase models: unique (frequency, recency, T) rows with their customer count;
* Gamma-Gamma: unique (frequency, monetary_value) rows of repeat customers with counts;
* cancellation: unique (n_orders, n_cancelled) rows with counts.

The purchase and spend statistics come from the basis's columns (:func:`on_basis`): gross
(``frequency``, ``recency``, ``T``, ``monetary_value``) or net (``net_*``: completed orders only,
customers without a completed order left out of the fit and counted).

Fits use the counts as ``weights``, which is exact (a weighted fit equals the fit on all rows).

**Channel-aware variants** (``models.by_channel``, :mod:`models.channels`): the purchase and spend
statistics come grouped by acquisition channel as well (one more key). That multiplies the rows by
up to the number of channels, bounded by the number of customers: at day resolution on 2M customers
the pooled statistics are already ~1.5M rows, so grouped by channel they come close to one row per
customer (``sizes["rfm_rows_by_channel"]`` says how many; weeks as the time unit shrink them). The
pooled statistics are their sums over the channels on the driver (the same rows
and counts as grouping without the channel, so the pooled fits do not change), and each BG/NBD or
MBG/NBD model gets a variant ``<model>_channel`` whose components per channel are shrunk towards the
pooled fit.

Scoring runs :meth:`models.bundle.ScoringBundle.predict` per Arrow batch through ``mapInPandas``
with the fitted bundle broadcast once, and writes ``customer_scores``, with the value intervals
(P10 / P50 / P90, :mod:`models.intervals`: closed forms, no random draws, so the numbers do not
depend on how customers fall into batches).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import ByChannelConf, Config
from core.errors import UserError
from core.results import StageResult
from core.storage import Storage
from core.tables import CUSTOMER_FEATURES, CUSTOMER_SCORES, SCORES_CARRIED_COLUMNS
from core.tracking import ChampionInfo
from models import CancellationRateModel, GammaGammaModel, make_model
from models.bundle import (GROUP_COLUMNS, INTERVAL_COLUMNS, LOADINGS_COLUMN, NET_FEATURE_COLUMNS, SCORE_COLUMNS,
                           ScoringBundle)
from models.channels import CHANNEL_SUFFIX, SHRUNK_PURCHASE_MODELS, fit_channel_components
from models.hybrid import bundle_from_payload, load_bundle

log = logging.getLogger(__name__)


class LtvInputError(UserError, ValueError):
    """The features cannot be fitted or scored; the message says what to run or change."""


# --------------------------------------------------------------------------------------------
# Sufficient statistics (Spark -> small pandas frames)
# --------------------------------------------------------------------------------------------
def on_basis(features_df: DataFrame, purchase_basis: str) -> DataFrame:
    """The BTYD statistics of ``purchase_basis`` under the gross names (frequency, recency, T,
    monetary_value); under the net basis only customers with a completed order."""
    if purchase_basis == "gross":
        return features_df
    if purchase_basis != "net":
        raise LtvInputError(f"purchase_basis must be gross or net here (got {purchase_basis!r})")
    missing = [c for c in NET_FEATURE_COLUMNS if c not in features_df.columns]
    if missing:
        raise LtvInputError(f"customer_features lacks {missing}: rebuild it with this release "
                            "(`cvseg features --as-of D --full`) to fit on the net basis")
    gross_names = ("frequency", "recency", "T", "monetary_value")
    kept = [F.col("acquisition_channel")] if "acquisition_channel" in features_df.columns else []
    return (features_df.where(F.col("net_frequency").isNotNull())
            .select(*[F.col(net).alias(gross) for net, gross in zip(NET_FEATURE_COLUMNS, gross_names)], *kept))


def _keys(keys: tuple[str, ...], by_channel: bool) -> list[Column]:
    """Grouping keys, led by ``channel`` (the acquisition channel, null kept) when ``by_channel``."""
    return ([F.col("acquisition_channel").alias("channel")] if by_channel else []) + [F.col(k) for k in keys]


def rfm_sufficient_stats(features_df: DataFrame, by_channel: bool = False) -> pd.DataFrame:
    """Unique (frequency, recency, T) rows with the number of customers in each (``by_channel``: per
    acquisition channel, a ``channel`` column first).

    Customers first seen on the as-of day (T = 0) carry no information about purchase rates and
    the likelihood is undefined for them, so they are left out of the fit (they are scored).
    """
    return _in_key_order(features_df.where(F.col("T") > 0).groupBy(*_keys(("frequency", "recency", "T"), by_channel))
                         .agg(F.count(F.lit(1)).alias("weight")).toPandas())


def spend_sufficient_stats(features_df: DataFrame, by_channel: bool = False) -> pd.DataFrame:
    """Unique (frequency, monetary_value) rows of repeat customers with positive spend (``by_channel``:
    per acquisition channel)."""
    return _in_key_order(features_df.where((F.col("frequency") > 0) & (F.col("monetary_value") > 0))
                         .groupBy(*_keys(("frequency", "monetary_value"), by_channel))
                         .agg(F.count(F.lit(1)).alias("weight")).toPandas())


def pooled_stats(stats_by_channel: pd.DataFrame) -> pd.DataFrame:
    """Statistics grouped by channel summed over the channels: the rows and counts that grouping
    without the channel gives (integer counts: exact), in key order."""
    keys = [c for c in stats_by_channel.columns if c not in ("channel", "weight")]
    summed = stats_by_channel.groupby(keys, sort=False)["weight"].sum().reset_index()
    return _in_key_order(summed[keys + ["weight"]])


def cancellation_sufficient_stats(features_df: DataFrame) -> pd.DataFrame:
    return _in_key_order(features_df.groupBy("n_orders", "n_cancelled").agg(F.count(F.lit(1)).alias("weight"))
                         .toPandas())


def _in_key_order(stats: pd.DataFrame) -> pd.DataFrame:
    """The rows sorted by their keys. A groupBy's rows reach the driver in whatever order its tasks
    finished; the fits sum over rows, so another order moves the parameters in the last bits and,
    through them, every score: a re-run of a date must give the same numbers."""
    keys = [c for c in stats.columns if c != "weight"]
    return stats.sort_values(keys, kind="mergesort").reset_index(drop=True)


@dataclass
class FittedModels:
    """Every fitted BTYD bundle by purchase-model name, with fit timings and sizes."""

    bundles: dict[str, ScoringBundle]
    seconds: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def fit_btyd_bundles(features_df: DataFrame, purchase_models: tuple[str, ...], time_unit: str,
                     horizon_months: int = 6, penalizer_coef: float = 0.0,
                     purchase_basis: str = "gross", by_channel: ByChannelConf | None = None) -> FittedModels:
    """Fit each purchase model plus the shared Gamma-Gamma and cancellation models on one basis; with
    ``by_channel`` enabled also ``<model>_channel`` for BG/NBD and MBG/NBD (see the module docstring)."""
    channel_aware = by_channel is not None and by_channel.enabled
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    basis_df = on_basis(features_df, purchase_basis)
    if channel_aware:
        rfm_by_channel = rfm_sufficient_stats(basis_df, by_channel=True)
        spend_by_channel = spend_sufficient_stats(basis_df, by_channel=True)
        rfm, spend = pooled_stats(rfm_by_channel), pooled_stats(spend_by_channel)
    else:
        rfm = rfm_sufficient_stats(basis_df)
        spend = spend_sufficient_stats(basis_df)
    cancels = cancellation_sufficient_stats(features_df)
    seconds["sufficient_statistics"] = time.perf_counter() - started
    if rfm.empty:
        raise LtvInputError("customer_features is empty for this date; run `cvseg features --as-of D` "
                            "on a date with orders")
    if spend.empty:
        raise LtvInputError("no repeat customers with positive spend: Gamma-Gamma cannot be fitted; "
                            "use an as-of date with more history")
    started = time.perf_counter()
    spend_model = GammaGammaModel(penalizer_coef=penalizer_coef).fit(
        spend["frequency"], spend["monetary_value"], weights=spend["weight"])
    seconds["fit_gamma_gamma"] = time.perf_counter() - started
    started = time.perf_counter()
    cancel_model = CancellationRateModel().fit(cancels["n_orders"], cancels["n_cancelled"],
                                               weights=cancels["weight"])
    seconds["fit_cancellation"] = time.perf_counter() - started
    bundles = {}
    for name in purchase_models:
        started = time.perf_counter()
        purchase = make_model(name, penalizer_coef=penalizer_coef, time_unit=time_unit).fit(
            rfm["frequency"], rfm["recency"], rfm["T"], weights=rfm["weight"])
        seconds[f"fit_{name}"] = time.perf_counter() - started
        bundles[name] = ScoringBundle(purchase=purchase, spend=spend_model, cancellation=cancel_model,
                                      value_model="btyd", horizon_months=horizon_months, time_unit=time_unit,
                                      purchase_basis=purchase_basis)
    if channel_aware:
        for name in [n for n in purchase_models if n in SHRUNK_PURCHASE_MODELS]:
            started = time.perf_counter()
            pooled = bundles[name]
            components = fit_channel_components(pooled.purchase, spend_model, rfm_by_channel, spend_by_channel,
                                                by_channel.prior_customers, by_channel.min_customers)
            seconds[f"fit_{name}{CHANNEL_SUFFIX}"] = time.perf_counter() - started
            # a bundle of its own (metadata too: the backtest writes into it per model)
            bundles[f"{name}{CHANNEL_SUFFIX}"] = dataclasses.replace(pooled, by_channel=components, metadata={})
    customers = int(cancels["weight"].sum())
    channel_sizes = ({"rfm_rows_by_channel": len(rfm_by_channel), "spend_rows_by_channel": len(spend_by_channel)}
                     if channel_aware else {})
    return FittedModels(bundles=bundles, seconds=seconds,
                        sizes={"rfm_rows": len(rfm), "spend_rows": len(spend), "cancel_rows": len(cancels),
                               "customers": int(rfm["weight"].sum()),
                               # net basis: customers who only cancelled (not in the purchase fit)
                               "customers_without_completed_orders": _only_cancelled(cancels),
                               "all_customers": customers, **channel_sizes})


def channel_run_params(bundle: ScoringBundle) -> dict[str, Any]:
    """MLflow parameters of a channel-aware bundle (the nightly run reads ``by_channel`` back to refit a
    channel-aware champion as such); empty for a pooled bundle. The per-channel parameters themselves go
    to the ``parameters`` artifact."""
    if bundle.by_channel is None:
        return {}
    return {"by_channel": True, "by_channel_prior_customers": bundle.by_channel.prior_customers,
            "by_channel_min_customers": bundle.by_channel.min_customers,
            "by_channel_channels": ",".join(bundle.by_channel.channels)}


def _only_cancelled(cancels: pd.DataFrame) -> int:
    only = cancels[cancels["n_orders"] == cancels["n_cancelled"]]
    return int(only["weight"].sum())


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
SCORE_SCHEMA = T.StructType([
    T.StructField("customer_id", T.StringType(), False),
    *[T.StructField(c, T.DoubleType(), False) for c in SCORE_COLUMNS[1:-1]],
    T.StructField("purchase_basis", T.StringType(), False),
    *[T.StructField(c, T.DoubleType(), True) for c in INTERVAL_COLUMNS + GROUP_COLUMNS],   # NaN -> null below
    T.StructField(LOADINGS_COLUMN, T.ArrayType(T.DoubleType()), True),
])


def score_customers(features_df: DataFrame, bundle: ScoringBundle, carry: tuple[str, ...] = ()) -> DataFrame:
    """Scores for every customer row of ``features_df`` (a vectorised pandas function per batch),
    followed by the ``carry`` columns of ``features_df`` as they are.

    Arrow batches in and out (``mapInArrow``), not ``mapInPandas``: Spark's pandas path turns every
    array cell (the loadings) into a Python list, row by row; here the scores frame goes to Arrow
    column by column (the loadings are an Arrow list column already). As with pandas' own
    conversion, a NaN double arrives as null. The carried columns stay Arrow arrays (never pandas):
    the model returns one row per input row, in order (checked)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    spark = features_df.sparkSession
    shared = spark.sparkContext.broadcast(bundle.to_payload())
    intervals = bundle.intervals        # a scoring-time switch, not part of the payload
    carried_fields = [features_df.schema[c] for c in carry]
    out_schema = T.StructType([*SCORE_SCHEMA.fields, *carried_fields])
    score_arrow, arrow_schema = to_arrow_schema(SCORE_SCHEMA), to_arrow_schema(out_schema)
    score_names = SCORE_SCHEMA.fieldNames()
    feature_names = list(bundle.feature_columns)

    def predict_batches(batches):
        import pyarrow as pa

        model = bundle_from_payload(shared.value)      # a ScoringBundle or a HybridBundle
        model.intervals = intervals
        for batch in batches:
            out = model.predict(batch.select(feature_names).to_pandas())
            if len(out) != batch.num_rows:
                raise RuntimeError(f"the model returned {len(out)} rows for {batch.num_rows} customers")
            # a value without group terms (the hybrid's trees) leaves them null
            for column in (c for c in score_names if c not in out.columns):
                out[column] = None if column == LOADINGS_COLUMN else np.nan
            scored = pa.RecordBatch.from_pandas(out[score_names], schema=score_arrow, preserve_index=False)
            yield pa.RecordBatch.from_arrays([*scored.columns, *[batch.column(c) for c in carry]],
                                             schema=arrow_schema)

    inputs = features_df.select(*[F.col(c).cast("double") if c in ("n_orders", "n_cancelled") else F.col(c)
                                  for c in feature_names],
                                *[c for c in carry if c not in feature_names])
    return inputs.mapInArrow(predict_batches, out_schema)


def scores_table_rows(scores_df: DataFrame, as_of_date: dt.date, value_model: str, model_version: str,
                      horizon_months: int) -> DataFrame:
    carried = [F.col(c) if c in scores_df.columns else F.lit(None).cast(CUSTOMER_SCORES.schema[c].dataType).alias(c)
               for c in SCORES_CARRIED_COLUMNS]
    return scores_df.select(
        F.lit(as_of_date).alias("as_of_date"), *SCORE_COLUMNS,
        F.lit(value_model).alias("value_model"), F.lit(str(model_version)).alias("model_version"),
        F.lit(horizon_months).alias("horizon_months"),
        # Arrow carries pandas' NaN as a NaN double, not null: "no interval" is stored as null
        *[F.nanvl(F.col(c), F.lit(None).cast("double")).alias(c) for c in INTERVAL_COLUMNS + GROUP_COLUMNS],
        LOADINGS_COLUMN, *carried)


@dataclass(frozen=True)
class ScoreResult(StageResult):
    """The ``customer_scores`` partition :func:`run_score` wrote."""
    as_of_date: dt.date
    customers: int
    predicted_net_value_total: float
    mean_p_alive: float
    model_version: str
    purchase_basis: str
    customers_placed_by_rule: int      # net basis: no completed order, value 0 by rule (not by the model)
    customers_with_interval: int

    def summary_line(self) -> str:
        return (f"{self.customers:,} customers scored with model version {self.model_version} "
                f"({self.purchase_basis} basis): predicted 6-month net value {self.predicted_net_value_total:,.0f}, "
                f"mean P(alive) {self.mean_p_alive:.3f}")


def run_score(storage: Storage, as_of_date: dt.date, bundle: ScoringBundle, model_version: str,
              intervals: bool = True) -> ScoreResult:
    """Read ``customer_features`` at D, write the D partition of ``customer_scores``; ``intervals``
    (``models.intervals``): fill the value interval columns where the model has them."""
    from pipelines.maintenance import ensure_not_pruned

    features_df = storage.read(CUSTOMER_FEATURES).where(F.col("as_of_date") == F.lit(as_of_date))
    try:
        time_unit = _time_unit_of(features_df)
    except LtvInputError:
        ensure_not_pruned(storage, CUSTOMER_FEATURES.name, as_of_date)
        raise
    if bundle.time_unit != time_unit:
        raise LtvInputError(f"the model was fitted in {bundle.time_unit} but customer_features as of {as_of_date} "
                            f"is in {time_unit}; rebuild features with features.time_unit="
                            f"{bundle.time_unit} or refit")
    bundle = dataclasses.replace(bundle, intervals=intervals)
    rows_df = scores_table_rows(score_customers(features_df, bundle, carry=SCORES_CARRIED_COLUMNS), as_of_date,
                                bundle.value_model, model_version, bundle.horizon_months)
    storage.replace_partitions(CUSTOMER_SCORES, rows_df, partitions={"as_of_date": [as_of_date]})
    written = storage.read(CUSTOMER_SCORES).where(F.col("as_of_date") == F.lit(as_of_date))
    stats = written.agg(F.count(F.lit(1)).alias("customers"), F.sum("predicted_net_value").alias("total"),
                        F.avg("p_alive").alias("mean_p_alive"),
                        F.count_if(F.col("purchase_basis") == "net_rule").alias("placed_by_rule"),
                        F.count("predicted_net_value_p10").alias("with_interval")).first()
    return ScoreResult(as_of_date, int(stats["customers"]), float(stats["total"] or 0.0),
                       float(stats["mean_p_alive"] or 0.0), str(model_version), bundle.purchase_basis,
                       customers_placed_by_rule=int(stats["placed_by_rule"]),
                       customers_with_interval=int(stats["with_interval"]))


def refit_basis(configured: str, champion: ChampionInfo | None) -> str:
    """The basis of a nightly refit: the configured one, or under ``auto`` the champion's (which the
    last backtest chose); gross before any backtest."""
    if configured != "auto":
        return configured
    return champion.purchase_basis if champion is not None else "gross"


def refit_purchase_model(configured: tuple[str, ...], champion: ChampionInfo | None) -> str:
    """The purchase model of a nightly refit: the champion's (the one the last backtest chose) while it
    is still among ``models.purchase_models``; else, and before any champion, the first configured."""
    if champion is not None and champion.purchase_model in configured:
        return champion.purchase_model
    return configured[0]


def refit_by_channel(conf: ByChannelConf, purchase_model: str, champion: ChampionInfo | None) -> bool:
    """Whether the nightly refit is channel-aware: the last backtest chose a channel-aware champion, the
    variants are still switched on and the refitted purchase model has one."""
    return (conf.enabled and champion is not None and champion.by_channel
            and purchase_model in SHRUNK_PURCHASE_MODELS)


@dataclass(frozen=True)
class Refit:
    """A nightly refit registered as the champion (:func:`refit_champion`)."""
    bundle: ScoringBundle
    version: str
    name: str                       # the model fitted: bgnbd, mbgnbd_channel, hybrid, ...
    seconds: float
    hybrid_skipped: str | None      # the champion is a hybrid but the trees could not be refitted: why


def refit_champion(storage: Storage, as_of_date: dt.date, config: Config, champion: ChampionInfo | None,
                   registered_model: str) -> Refit:
    """Fit the champion's kind of model on ``customer_features`` at D, log it (:func:`core.tracking.log_fit`)
    and give it the ``champion`` alias: the same purchase model, basis and channel awareness the last
    backtest chose (:func:`refit_purchase_model`, :func:`refit_basis`, :func:`refit_by_channel`), and
    for a hybrid champion its trees retrained too (:mod:`pipelines.hybrid`)."""
    from core import tracking

    started = time.perf_counter()
    models = config.models
    features_df = storage.read(CUSTOMER_FEATURES).where(F.col("as_of_date") == F.lit(as_of_date))
    basis = refit_basis(models.purchase_basis, champion)
    # the champion's purchase model, not always the first configured: a backtest that chose MBG/NBD
    # must not see its champion replaced by a BG/NBD fit at the next refit
    purchase_model = refit_purchase_model(models.purchase_models, champion)
    channel_aware = refit_by_channel(models.by_channel, purchase_model, champion)
    fitted = fit_btyd_bundles(features_df, (purchase_model,), config.features.time_unit,
                              config.models.horizon_months, models.penalizer_coef, purchase_basis=basis,
                              by_channel=models.by_channel if channel_aware else None)
    # the channel-aware variant comes after the pooled bundle it was built from
    name, bundle = list(fitted.bundles.items())[-1 if channel_aware else 0]
    extra_params = channel_run_params(bundle)
    skipped = None
    if champion is not None and champion.value_model == "hybrid":
        from pipelines.hybrid import refit_hybrid, tracking_extras

        hybrid, skipped, hybrid_seconds = refit_hybrid(storage, as_of_date, bundle, config)
        if hybrid is not None:
            bundle, name = hybrid, "hybrid"
            extra_params = {**tracking_extras(hybrid)[0], **extra_params}
            fitted.seconds.update(hybrid_seconds)
    _, version = tracking.log_fit(
        bundle, config, as_of_date, storage.version(CUSTOMER_FEATURES), fitted.seconds,
        run_name=f"nightly-fit-{name}-{as_of_date}", extra_params=extra_params, tags={"trigger": "nightly"},
        register_as=registered_model)
    tracking.set_champion(registered_model, version)
    return Refit(bundle, version, name, round(time.perf_counter() - started, 2), skipped)


def load_champion(registered_model: str) -> tuple[ScoringBundle, str]:
    """The registered champion (a BTYD or hybrid bundle) and its version."""
    from core import tracking

    bundle_dir, version = tracking.download_champion(registered_model)
    return load_bundle(bundle_dir), version


def _time_unit_of(features_df: DataFrame) -> str | None:
    row = features_df.select("time_unit").limit(1).first()
    if row is None:
        raise LtvInputError("customer_features has no rows for this date; run `cvseg features --as-of D` first")
    return row["time_unit"]


def describe_params(bundles: dict[str, ScoringBundle]) -> dict[str, Any]:
    """``{"bgnbd": {"r":..,"alpha":..,"a":..,"b":..}, "gamma_gamma": {...}, ...}`` for --json output;
    a channel-aware bundle adds ``"bgnbd_channel:<channel>"`` and ``"gamma_gamma:<channel>"`` entries."""
    out: dict[str, Any] = {}
    for name, bundle in bundles.items():
        if bundle.by_channel is None:
            out[name] = {k: float(v) for k, v in bundle.purchase.params_.items() if np.isscalar(v)}
            continue
        # channel-aware: one entry per channel with own parameters ("bgnbd_channel:web", "gamma_gamma:web")
        for models, label in ((bundle.by_channel.purchase, name),
                              (bundle.by_channel.spend, "gamma_gamma")):
            for channel, model in sorted(models.items()):
                out[f"{label}:{channel}"] = {k: float(v) for k, v in model.params_.items()}
    if bundles:
        any_bundle = next(iter(bundles.values()))
        out["gamma_gamma"] = {k: float(v) for k, v in any_bundle.spend.params_.items() if np.isscalar(v)}
        out["cancellation"] = {k: float(v) for k, v in any_bundle.cancellation.params_.items() if np.isscalar(v)}
    return out
