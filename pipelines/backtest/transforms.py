"""The backtest's origins, the six-month cohort method's cells and every model's predictions for every
customer (one ``mapInPandas`` pass): DataFrame transforms, no I/O."""
from __future__ import annotations

import datetime as dt
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from core.dates import add_months
from models import CELL_COLUMNS
from models.bundle import DAYS_PER_UNIT, ScoringBundle
from models.hybrid import bundle_from_payload
from pipelines.backtest.metrics import rank_lookup
from pipelines.backtest.schema import PREDICTION_SCHEMA, RANKED_PREDICTION_SCHEMA, BacktestError



# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------
def backtest_origins(as_of: dt.date, n_origins: int = 1, spacing_months: int = 1) -> list[dt.date]:
    """``as_of``, ``as_of - spacing``, ... (``n_origins`` dates, newest first).

    Monthly origins (the default spacing) overlap in their holdout windows, so they are not
    independent samples; they show whether the ranking of the models holds across starting months.
    ``spacing_months = horizon_months`` gives non-overlapping holdouts (needing more history).
    """
    if n_origins < 1:
        raise BacktestError(f"--origins must be at least 1 (got {n_origins})")
    if spacing_months < 1:
        raise BacktestError(f"--spacing-months must be at least 1 (got {spacing_months})")
    return [add_months(as_of, -spacing_months * k) for k in range(n_origins)]


# --------------------------------------------------------------------------------------------
# Cohort cells (column functions + transforms)
# --------------------------------------------------------------------------------------------
def band_column(value: Column, edges: Sequence[float]) -> Column:
    """Band number: the largest ``i`` with ``edges[i] <= value`` (as :func:`models.cohort.band_index`).

    Values below the first edge get null: the cohort model rejects missing keys, so such a row fails
    loudly instead of landing in band 0.
    """
    edges = [float(e) for e in edges]
    band = F.when(value >= F.lit(edges[-1]), F.lit(len(edges) - 1))
    for index in range(len(edges) - 2, -1, -1):
        band = band.when(value >= F.lit(edges[index]), F.lit(index))
    return band.cast("long")


def with_cohort_cells(features_df: DataFrame, time_unit: str, bands: Mapping[str, Sequence[float]],
                      with_channel: bool) -> DataFrame:
    """Adds the cell keys (``frequency_band``, ``recency_band``, ``tenure_band`` [, ``channel``]).

    Same definitions as :func:`models.bundle.cells_from_features` (which scoring uses): recency
    band on days since the last order, tenure band on days since the first, both rounded to 6
    decimals so weeks x 7 give whole days.
    """
    per_unit = F.lit(DAYS_PER_UNIT[time_unit])
    days_since_last = F.round((F.col("T") - F.col("recency")) * per_unit, 6)
    tenure_days = F.round(F.col("T") * per_unit, 6)
    cells_df = (features_df
                .withColumn("frequency_band", band_column(F.col("frequency"), bands["frequency"]))
                .withColumn("recency_band", band_column(days_since_last, bands["recency_days"]))
                .withColumn("tenure_band", band_column(tenure_days, bands["tenure_days"])))
    if with_channel:
        cells_df = cells_df.withColumn("channel", F.coalesce(F.col("acquisition_channel"), F.lit("unknown")))
    return cells_df


def cohort_key_columns(with_channel: bool) -> tuple[str, ...]:
    return CELL_COLUMNS + (("channel",) if with_channel else ())


def cohort_cell_stats(holdout_df: DataFrame, time_unit: str, bands: Mapping[str, Sequence[float]],
                      with_channel: bool) -> DataFrame:
    """One row per cell: customers, sum and sum of squares of their actual holdout net revenue."""
    keys = list(cohort_key_columns(with_channel))
    return (with_cohort_cells(holdout_df, time_unit, bands, with_channel)
            .groupBy(*keys)
            .agg(F.count(F.lit(1)).alias("n_customers"),
                 F.sum("holdout_net").alias("revenue_sum"),
                 F.sum(F.col("holdout_net") * F.col("holdout_net")).alias("revenue_sq_sum")))


# --------------------------------------------------------------------------------------------
# Predictions: every model, every customer, one mapInPandas pass
# --------------------------------------------------------------------------------------------
def predict_all(holdout_df: DataFrame, bundles: Mapping[str, ScoringBundle], intervals: bool = True,
                actual_ranks: tuple[np.ndarray, np.ndarray] | None = None) -> DataFrame:
    """Long rows (model, customer_id, predicted, actual, p10, p90, p_zero): each bundle's predicted net
    value over the horizon, its 80% interval (``intervals``: where the model has one, else null) and
    the customer's actual ``holdout_net``. The bundles are broadcast once. With ``actual_ranks``
    (:func:`~pipelines.backtest.metrics.collect_actual_ranks` of ``holdout_df``'s tie groups) each row
    also carries the customer's ``actual_rank_centered``, looked up once per customer for every model."""
    if not bundles:
        raise BacktestError("no models to backtest: list models.purchase_models or enable compare_cohort/naive")
    spark = holdout_df.sparkSession
    shared = spark.sparkContext.broadcast({name: b.to_payload() for name, b in bundles.items()})
    ranked = actual_ranks is not None
    shared_ranks = spark.sparkContext.broadcast(actual_ranks) if ranked else None

    def predict_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        models = {name: bundle_from_payload(payload) for name, payload in shared.value.items()}
        for model in models.values():
            model.intervals = intervals
            model.group_terms = False          # each customer's own interval only: no group-total terms
        for batch in batches:
            actual = batch["holdout_net"].to_numpy(float)
            ranks = {"actual_rank_centered": rank_lookup(*shared_ranks.value, actual)} if ranked else {}
            for name, model in models.items():
                scores = model.predict(batch)
                # every model returns every row of the batch, in order: `actual` and its rank stay aligned
                yield pd.DataFrame({"model": name, "customer_id": scores["customer_id"].to_numpy(),
                                    "predicted": scores["predicted_net_value"].to_numpy(float),
                                    "actual": actual,
                                    "p10": scores["predicted_net_value_p10"].to_numpy(float),
                                    "p90": scores["predicted_net_value_p90"].to_numpy(float),
                                    "p_zero": scores["p_zero_value"].to_numpy(float), **ranks})

    columns = list(dict.fromkeys(c for b in bundles.values() for c in b.feature_columns))
    inputs = holdout_df.select(*[F.col(c).cast("double") if c in ("n_orders", "n_cancelled") else F.col(c)
                                 for c in columns], "holdout_net")
    # pandas' NaN ("no interval") arrives as a NaN double: null, so that averages skip it
    return inputs.mapInPandas(predict_batches, RANKED_PREDICTION_SCHEMA if ranked else PREDICTION_SCHEMA).select(
        "model", "customer_id", "predicted", "actual",
        *[F.nanvl(F.col(c), F.lit(None).cast("double")).alias(c) for c in ("p10", "p90", "p_zero")],
        *(["actual_rank_centered"] if ranked else []))


