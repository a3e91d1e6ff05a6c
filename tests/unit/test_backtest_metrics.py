"""Backtest metrics computed in Spark equal the numpy reference (models/metrics.py) on the same rows.

Tolerance: relative 1e-9 (absolute 1e-12 near zero). Both sides evaluate the same formulas in
double precision; only the order of summation differs (Spark sums per partition then merges), and
the rounding error of a sum of n <= 1,000 terms is about n x 2.2e-16 ~ 2e-13 relative. Anything
bigger is a different definition (ties, interpolation, deciles), which is what these tests catch.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from models import DEFAULT_BANDS, assign_cells
from models import metrics as reference
from models.bundle import cells_from_features
from pipelines.backtest import PREDICTION_SCHEMA, cohort_cell_stats, compute_metrics, with_cohort_cells

RTOL, ATOL = 1e-9, 1e-12


def _model_rows(rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Per model name: predicted and actual per customer, chosen to exercise ties and degenerate cases."""
    n = 397                                                    # not a multiple of 10: uneven deciles
    buyer = rng.random(n) < 0.35                               # most customers buy nothing (actual 0)
    actual = np.where(buyer, np.round(rng.gamma(2.0, 4000.0, n)), 0.0)
    signal = actual + rng.normal(0, 3000, n)
    rows = {
        # heavy ties in the predictions (few distinct values) and in the actuals (zeros)
        "tied": pd.DataFrame({"predicted": np.clip(np.round(signal / 2000.0), 0, 6) * 1000.0, "actual": actual}),
        # continuous predictions, ties only in the actuals
        "continuous": pd.DataFrame({"predicted": np.maximum(signal, 0) + rng.random(n), "actual": actual}),
        # a model that predicts the same for everyone: spearman NaN, gini 0, capture = the share itself
        "constant": pd.DataFrame({"predicted": np.full(n, 1234.5), "actual": actual}),
        # 3 of 10 customers tied at the top: decile 1 stays empty (reference docstring example)
        "top_tie": pd.DataFrame({"predicted": [9, 9, 9, 8, 7, 6, 5, 4, 3, 2.0],
                                 "actual": [1, 0, 5, 2, 0, 3, 0, 0, 1, 4.0]}),
        # nobody bought: every ratio to the actual total is NaN
        "no_revenue": pd.DataFrame({"predicted": rng.random(50) * 100, "actual": np.zeros(50)}),
    }
    return rows


@pytest.fixture(scope="module")
def computed(spark):
    rng = np.random.default_rng(20261123)
    per_model = _model_rows(rng)
    long_rows = pd.concat([frame.assign(model=name, customer_id=[f"{name}-{i}" for i in range(len(frame))])
                           for name, frame in per_model.items()], ignore_index=True)
    # value intervals for one model (a made-up 80% interval and atom at 0); none (null) for the others
    continuous = long_rows["model"] == "continuous"
    long_rows["p10"] = np.where(continuous, np.where(long_rows["predicted"] > 3000, 0.5 * long_rows["predicted"], 0.0),
                                np.nan)
    long_rows["p90"] = np.where(continuous, 2.0 * long_rows["predicted"], np.nan)
    long_rows["p_zero"] = np.where(continuous, np.clip(1.0 - long_rows["predicted"] / 8000.0, 0.0, 0.95), np.nan)
    for column in ("p10", "p90", "p_zero"):
        long_rows[column] = long_rows[column].astype(object).where(long_rows[column].notna(), None)
    predictions_df = spark.createDataFrame(
        long_rows[["model", "customer_id", "predicted", "actual", "p10", "p90", "p_zero"]], PREDICTION_SCHEMA)
    metrics, deciles = compute_metrics(predictions_df)
    return per_model, metrics.set_index("model"), deciles, long_rows


def test_interval_coverage_in_spark_equals_the_reference(computed):
    from models.intervals import interval_coverage

    _, metrics, _, long_rows = computed
    rows = long_rows[long_rows["model"] == "continuous"]
    expected = interval_coverage(rows["actual"], rows["p10"].astype(float), rows["p10"].astype(float),
                                 rows["p90"].astype(float), rows["p_zero"].astype(float))
    assert metrics.loc["continuous", "interval_coverage"] == pytest.approx(expected["coverage"], rel=1e-12)
    assert metrics.loc["continuous", "interval_closed_coverage"] == pytest.approx(expected["closed_coverage"],
                                                                                 rel=1e-12)
    assert 0 < expected["coverage"] < 1 and expected["coverage"] != expected["closed_coverage"]
    # models without intervals: no coverage (null -> NaN), not 0
    assert metrics.loc[["tied", "constant", "top_tie", "no_revenue"], "interval_coverage"].isna().all()


def _close(value: float, expected: float) -> bool:
    if math.isnan(expected):
        return math.isnan(value)
    return math.isclose(value, expected, rel_tol=RTOL, abs_tol=ATOL)


@pytest.mark.parametrize("model", ["tied", "continuous", "constant", "top_tie", "no_revenue"])
def test_every_spark_metric_equals_the_reference(computed, model):
    per_model, metrics, _, _ = computed
    frame = per_model[model]
    p, a = frame["predicted"].to_numpy(), frame["actual"].to_numpy()
    expected = {
        "mae": reference.mae(p, a), "rmse": reference.rmse(p, a),
        "total_error_pct": reference.total_error_pct(p, a),
        "abs_total_error_pct": abs(reference.total_error_pct(p, a)),
        "spearman": reference.spearman(p, a), "normalized_gini": reference.normalized_gini(p, a),
        "top_decile_capture": reference.top_share_capture(p, a, 0.1),
        "top20_capture": reference.top_share_capture(p, a, 0.2),
    }
    row = metrics.loc[model]
    assert int(row["n_customers"]) == len(frame)
    assert math.isclose(row["actual_total"], a.sum(), rel_tol=RTOL, abs_tol=ATOL)
    mismatches = {k: (float(row[k]), v) for k, v in expected.items() if not _close(float(row[k]), v)}
    assert not mismatches, f"{model}: spark vs reference {mismatches}"


def test_expected_special_values_so_the_comparison_is_not_vacuous(computed):
    """Pin a few values that do not depend on the reference: NaN where undefined, exact shares."""
    _, metrics, _, _ = computed
    assert math.isnan(metrics.loc["constant", "spearman"])
    assert metrics.loc["constant", "normalized_gini"] == pytest.approx(0.0, abs=1e-12)
    assert metrics.loc["constant", "top_decile_capture"] == pytest.approx(0.1, rel=1e-12)
    for column in ("total_error_pct", "normalized_gini", "top_decile_capture", "top20_capture"):
        assert math.isnan(metrics.loc["no_revenue", column]), column
    assert metrics.loc["continuous", "spearman"] > 0.5 and metrics.loc["continuous", "normalized_gini"] > 0.5
    # top_tie: the top 10% (1 customer) falls inside the 3-way tie: 1/3 of its 6 units of 16 in total
    assert metrics.loc["top_tie", "top_decile_capture"] == pytest.approx(2.0 / 16.0, rel=1e-12)


@pytest.mark.parametrize("model", ["tied", "continuous", "constant", "top_tie"])
def test_decile_table_equals_the_reference(computed, model):
    per_model, _, deciles, _ = computed
    frame = per_model[model]
    expected = reference.decile_table(frame["predicted"], frame["actual"])
    got = deciles[deciles["model"] == model].drop(columns="model").reset_index(drop=True)
    assert got["decile"].tolist() == list(range(1, 11))
    np.testing.assert_array_equal(got["n"].to_numpy(), expected["n"].to_numpy())
    for column in ("mean_predicted", "mean_actual", "sum_predicted", "sum_actual"):
        np.testing.assert_allclose(got[column].to_numpy(float), expected[column].to_numpy(float),
                                   rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=column)
    if model == "top_tie":
        assert got.loc[0, "n"] == 0 and got.loc[1, "n"] == 3    # the tie group is never split


def test_ranks_of_the_actuals_once_per_origin_equal_the_per_model_path(spark, computed):
    """The backtest's path: every model scored the same customers, the realised values' tie groups are
    computed once (from the holdout rows) and each row carries its rank: the metrics equal the per-model
    path and the reference."""
    from pipelines.backtest.metrics import actual_tie_groups, collect_actual_ranks, rank_lookup
    from pipelines.backtest.schema import RANKED_PREDICTION_SCHEMA

    per_model, _, _, _ = computed
    shared = ["tied", "continuous", "constant"]         # the same 397 customers and actuals
    actual = per_model["tied"]["actual"].to_numpy()
    holdout = spark.createDataFrame(pd.DataFrame({"customer_id": [f"c{i}" for i in range(len(actual))],
                                                  "holdout_net": actual}))
    groups = actual_tie_groups(holdout)
    values, ranks = collect_actual_ranks(groups)
    assert len(values) == len(np.unique(actual)) and np.all(np.diff(values) > 0)
    rank = rank_lookup(values, ranks, actual)
    expected_rank = pd.Series(actual).rank(method="average").to_numpy() - (len(actual) + 1) / 2.0
    np.testing.assert_allclose(rank, expected_rank, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="missing from the origin's ranks"):
        rank_lookup(values, ranks, np.array([0.5]))
    rows = pd.concat([pd.DataFrame({"model": name, "customer_id": [f"c{i}" for i in range(len(actual))],
                                    "predicted": per_model[name]["predicted"].to_numpy(float), "actual": actual,
                                    "p10": None, "p90": None, "p_zero": None, "actual_rank_centered": rank})
                      for name in shared], ignore_index=True)
    ranked_df = spark.createDataFrame(rows, RANKED_PREDICTION_SCHEMA)
    fast, fast_deciles = compute_metrics(ranked_df, groups)
    general, general_deciles = compute_metrics(ranked_df.drop("actual_rank_centered"))
    pd.testing.assert_frame_equal(fast.set_index("model").sort_index(), general.set_index("model").sort_index(),
                                  rtol=RTOL, atol=ATOL)
    pd.testing.assert_frame_equal(fast_deciles, general_deciles)
    continuous = per_model["continuous"]
    assert fast.set_index("model").loc["continuous", "spearman"] == pytest.approx(
        reference.spearman(continuous["predicted"].to_numpy(), actual), rel=RTOL)


def test_cohort_cells_in_spark_equal_assign_cells_and_the_cell_sums(spark, rng):
    """Spark's band columns give the same cells as models.cohort.assign_cells (what scoring uses)."""
    n = 300
    features = pd.DataFrame({
        "customer_id": [f"c{i}" for i in range(n)],
        "frequency": rng.integers(0, 25, n).astype(float),
        "T": rng.integers(0, 2000, n).astype(float) / 7.0,          # weeks, as features in weeks are
        "acquisition_channel": rng.choice(["web", "app", None], n),
        "holdout_net": np.where(rng.random(n) < 0.4, rng.gamma(2, 3000, n), 0.0),
    })
    features["recency"] = np.floor(rng.random(n) * features["T"] * 7.0) / 7.0
    features.loc[:4, ["T", "recency"]] = [[0.0, 0.0], [30 / 7, 0.0], [90 / 7, 90 / 7], [1825 / 7, 0.0],
                                          [2000 / 7, 1.0]]                  # band edges exactly
    features_df = spark.createDataFrame(features)
    spark_cells = (with_cohort_cells(features_df, "weeks", DEFAULT_BANDS, with_channel=True)
                   .select("customer_id", "frequency_band", "recency_band", "tenure_band", "channel")
                   .toPandas().set_index("customer_id").loc[features["customer_id"]])
    expected = cells_from_features(features, "weeks", DEFAULT_BANDS, with_channel=True)
    for column in ("frequency_band", "recency_band", "tenure_band", "channel"):
        np.testing.assert_array_equal(spark_cells[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    assert spark_cells["recency_band"].nunique() > 3 and spark_cells["tenure_band"].nunique() > 3

    stats = cohort_cell_stats(features_df, "weeks", DEFAULT_BANDS, with_channel=False).toPandas()
    by_hand = (assign_cells(features["frequency"], np.round((features["T"] - features["recency"]) * 7, 6),
                            np.round(features["T"] * 7, 6))
               .assign(net=features["holdout_net"], sq=features["holdout_net"] ** 2)
               .groupby(["frequency_band", "recency_band", "tenure_band"], as_index=False)
               .agg(n_customers=("net", "size"), revenue_sum=("net", "sum"), revenue_sq_sum=("sq", "sum")))
    merged = stats.merge(by_hand, on=["frequency_band", "recency_band", "tenure_band"], how="outer",
                         suffixes=("", "_ref"), indicator=True)
    assert (merged["_merge"] == "both").all()
    np.testing.assert_array_equal(merged["n_customers"], merged["n_customers_ref"])
    np.testing.assert_allclose(merged["revenue_sum"], merged["revenue_sum_ref"], rtol=RTOL)
    np.testing.assert_allclose(merged["revenue_sq_sum"], merged["revenue_sq_sum_ref"], rtol=RTOL)
