"""Synthetic order export: reproducibility, the shape of the process, and every injected defect.

Expectations come from the parameters (analytic BG/NBD mean via lifetimes, shares, the window),
never from re-running the generator's own code; tolerances are 4 standard errors estimated from
the sample (customer-clustered where orders of one customer are correlated).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from datagen.generate import (
    DEFECT_KINDS, EXPORT_COLUMNS, TIMESTAMP_FORMAT, GeneratorError, GeneratorParams, generate, generate_orders,
)

END = dt.date(2026, 9, 30)
PARAMS = GeneratorParams()
START = END - dt.timedelta(days=PARAMS.history_days - 1)
N_CUSTOMERS = 3000
CONF = Path(__file__).resolve().parents[2] / "conf" / "examples" / "synthetic.yaml"


def _clustered_ratio_se(num: pd.Series, den: pd.Series) -> tuple[float, float]:
    """Ratio sum(num)/sum(den) over customers and its linearised standard error."""
    ratio = num.sum() / den.sum()
    resid = num - ratio * den
    return ratio, math.sqrt(len(num) / (len(num) - 1) * (resid ** 2).sum()) / den.sum()


@pytest.fixture(scope="module")
def labelled(spark):
    """Rows with the generator's own defect label, in output order (pandas, ~21k rows)."""
    return generate_orders(spark, N_CUSTOMERS, 11, END, dirty_share=0.02, block_size=500,
                           include_defect_kind=True).toPandas()


@pytest.fixture(scope="module")
def clean(labelled):
    out = labelled[labelled["injected_defect"].isna()].copy()
    out["ts"] = pd.to_datetime(out["order_datetime"], format="%Y/%m/%d %H:%M:%S")
    out["amount"] = out["amount"].astype("int64")
    return out


WRITTEN = {"n_customers": 1000, "seed": 11, "end_date": END, "dirty_share": 0.05, "block_size": 250}


@pytest.fixture(scope="module")
def written(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = generate(spark, out_dir=str(out), fmt="csv", **WRITTEN)
    return summary, out


# ---- reproducibility ------------------------------------------------------------------------

def _rows(spark, seed, partitions, dirty_share=0.02):
    return generate_orders(spark, 1200, seed, END, dirty_share=dirty_share, block_size=200,
                           num_partitions=partitions, include_defect_kind=True).collect()


@pytest.fixture(scope="module")
def base_rows(spark):
    return _rows(spark, 5, 1)


def test_same_inputs_give_the_same_rows_in_the_same_order_whatever_the_partitioning(spark, base_rows):
    assert len(base_rows) > 7000
    assert _rows(spark, 5, 4) == base_rows


def test_a_different_seed_gives_different_rows(spark, base_rows):
    one = pd.DataFrame(base_rows)
    other = pd.DataFrame(_rows(spark, 6, 2))
    merged = one.merge(other, how="inner", on=list(one.columns))
    assert len(merged) < 0.01 * len(one)


def test_clean_rows_do_not_depend_on_the_dirty_share(spark, base_rows):
    clean_rows = [r for r in base_rows if r["injected_defect"] is None]
    assert len(clean_rows) < len(base_rows)
    assert _rows(spark, 5, 3, dirty_share=0.0) == clean_rows


def test_text_does_not_depend_on_the_session_time_zone(spark, base_rows):
    spark.conf.set("spark.sql.session.timeZone", "Pacific/Honolulu")
    try:
        shifted = _rows(spark, 5, 2)
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    assert shifted == base_rows


# ---- the process ----------------------------------------------------------------------------

def test_export_columns_ids_and_text_formats(labelled, clean):
    assert tuple(labelled.columns[:-1]) == EXPORT_COLUMNS
    assert clean["order_id"].is_unique
    assert clean["order_id"].str.fullmatch(r"O\d{12}").all()
    assert clean["customer_id"].str.fullmatch(r"C\d{8}").all()
    assert clean["customer_id"].nunique() == N_CUSTOMERS
    assert {clean["customer_id"].min(), clean["customer_id"].max()} == {"C00000001", f"C{N_CUSTOMERS:08d}"}
    assert clean["order_datetime"].str.fullmatch(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}").all()
    assert set(clean["status"]) == {"completed", "cancelled"}
    assert set(clean["currency"]) == {"JPY"}
    # Orders of a customer come in time order (the export is sorted by customer, then time).
    assert (clean.groupby("customer_id", sort=False)["ts"].apply(lambda s: s.is_monotonic_increasing)).all()


def test_orders_per_customer_match_the_bg_nbd_expectation(clean):
    from lifetimes import BetaGeoFitter

    fitter = BetaGeoFitter()
    fitter.params_ = pd.Series({"r": PARAMS.r, "alpha": PARAMS.alpha, "a": PARAMS.a, "b": PARAMS.b})
    # First orders uniform over the window: average 1 + E[X(T)] over T in (0, window).
    t = np.linspace(0.0, PARAMS.history_days, 4001)
    expected = 1.0 + np.trapezoid(fitter.expected_number_of_purchases_up_to_time(t), t) / PARAMS.history_days
    per_customer = clean.groupby("customer_id").size()
    se = per_customer.std() / math.sqrt(len(per_customer))
    assert 6.0 < expected < 7.5                           # the documented default: ~6-7 orders
    assert abs(per_customer.mean() - expected) < 4 * se, (per_customer.mean(), expected, se)
    # One-order customers: sharper than the mean (binomial, no heavy tail); it moves by ~0.1 if
    # customers could drop out right after their first order, which BG/NBD does not allow.
    p_single = np.trapezoid(fitter.probability_of_n_purchases_up_to_time(t, 0), t) / PARAMS.history_days
    single = (per_customer == 1).mean()
    assert abs(single - p_single) < 4 * math.sqrt(p_single * (1 - p_single) / len(per_customer)), (single, p_single)


def test_cancellations_full_and_partial(clean):
    cancelled = clean["status"] == "cancelled"
    partial = (clean["status"] == "completed") & (clean["cancelled_amount"] > 0)
    by_customer = clean.assign(c=cancelled, p=partial, n=1).groupby("customer_id")[["c", "p", "n"]].sum()
    share, se = _clustered_ratio_se(by_customer["c"], by_customer["n"])
    assert 0.05 <= share <= 0.08
    assert abs(share - PARAMS.mean_cancel_propensity) < 4 * se
    expected_partial = (1 - PARAMS.mean_cancel_propensity) * PARAMS.partial_cancel_prob
    partial_share, partial_se = _clustered_ratio_se(by_customer["p"], by_customer["n"])
    assert abs(partial_share - expected_partial) < 4 * partial_se + 1e-4
    assert (clean.loc[cancelled, "cancelled_amount"] == clean.loc[cancelled, "amount"]).all()
    assert (clean.loc[partial, "cancelled_amount"] < clean.loc[partial, "amount"]).all()
    assert (clean.loc[~cancelled & ~partial, "cancelled_amount"] == 0).all()
    assert (clean["amount"] >= 1).all()


def test_mean_order_value_matches_gamma_gamma(clean):
    by_customer = clean.assign(n=1).groupby("customer_id")[["amount", "n"]].sum()
    mean, se = _clustered_ratio_se(by_customer["amount"], by_customer["n"])
    assert 5000 <= PARAMS.mean_order_value <= 10000
    assert abs(mean - PARAMS.mean_order_value) < 4 * se, (mean, se)


def test_channels_and_categories(clean):
    first = clean.sort_values("ts", kind="stable").groupby("customer_id").head(1)
    shares = first["channel"].value_counts(normalize=True)
    for name, share in PARAMS.channels:
        assert abs(shares.get(name, 0.0) - share) < 4 * math.sqrt(share * (1 - share) / len(first)), name
    acquisition = first.set_index("customer_id")["channel"]
    repeat = clean.drop(first.index)
    same = (repeat["channel"] == repeat["customer_id"].map(acquisition)).mean()
    # Kept with prob. stickiness, else redrawn and equal by chance with prob. sum(share^2).
    expected = PARAMS.channel_stickiness + (1 - PARAMS.channel_stickiness) * sum(s * s for _, s in PARAMS.channels)
    assert abs(same - expected) < 0.015
    assert set(clean["category"]) == {name for name, _ in PARAMS.categories}


def test_dates_lie_in_the_window_and_first_orders_spread_uniformly(clean):
    days = (clean["ts"].dt.normalize() - pd.Timestamp(START)).dt.days
    assert days.min() >= 0 and days.max() <= PARAMS.history_days - 1     # nothing after end_date
    first_day = days.groupby(clean["customer_id"]).min()
    assert first_day.min() < 10 and first_day.max() > PARAMS.history_days - 11
    per_year = np.histogram(first_day, bins=5, range=(0, PARAMS.history_days))[0] / len(first_day)
    assert np.all(np.abs(per_year - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(first_day))), per_year


def test_time_of_day_follows_the_hour_weights(clean):
    weights = np.asarray(PARAMS.hour_weights)
    night = (clean["ts"].dt.hour < 6).mean()
    expected = weights[:6].sum() / weights.sum()
    assert abs(night - expected) < 4 * math.sqrt(expected * (1 - expected) / len(clean))
    assert clean["ts"].dt.hour.nunique() == 24


# ---- defects --------------------------------------------------------------------------------

def test_every_injected_defect_is_in_the_written_file(spark, written):
    summary, out = written
    truth = json.loads((out / "true_params.json").read_text(encoding="utf-8"))
    assert truth["injected_defects"] == summary["injected_defects"]
    assert truth["bg_nbd"]["time_unit"] == "days"
    counts = summary["injected_defects"]
    assert set(counts) == set(DEFECT_KINDS)
    assert all(n >= 30 for n in counts.values()), counts   # 5% of ~7k rows over 7 kinds

    raw_df = spark.read.option("header", True).csv(summary["orders_path"])   # every column as text
    assert tuple(raw_df.columns) == EXPORT_COLUMNS
    # Spark decides what parses (as ingest will); one job, then counting in pandas.
    ts = F.try_to_timestamp(F.col("order_datetime"), F.lit(TIMESTAMP_FORMAT))
    amount = F.col("amount").try_cast("long")
    flags = {
        "missing_customer_id": F.col("customer_id").isNull() | (F.trim(F.col("customer_id")) == ""),
        "unparsable_timestamp": ts.isNull(),
        "future_timestamp": F.coalesce(F.to_date(ts) > F.lit(END), F.lit(False)),
        "negative_amount": F.coalesce(amount < 0, F.lit(False)),
        "non_numeric_amount": amount.isNull(),
    }
    rows = raw_df.select("*", *[cond.alias(name) for name, cond in flags.items()]).toPandas()
    found = {name: int(rows[name].sum()) for name in flags}
    distinct = rows.drop_duplicates(list(EXPORT_COLUMNS))
    found["exact_duplicate_row"] = len(rows) - len(distinct)
    found["conflicting_duplicate_order_id"] = len(distinct) - distinct["order_id"].nunique()
    assert found == counts
    assert len(rows) == summary["n_rows"] == summary["n_clean_orders"] + sum(counts.values())
    # Defects do not overlap: each flagged row has exactly one flag.
    n_flags = rows[list(flags)].sum(axis=1)
    assert n_flags.max() == 1 and n_flags.sum() == sum(counts[k] for k in flags)


def test_the_original_precedes_its_duplicates(labelled):
    dup = labelled["injected_defect"].isin(["conflicting_duplicate_order_id", "exact_duplicate_row"])
    first_position = labelled.reset_index().groupby("order_id")["index"].min()
    originals = labelled.loc[first_position[labelled.loc[dup, "order_id"]].to_numpy()]
    assert dup.sum() > 0
    assert originals["injected_defect"].isna().all()
    conflicting = labelled[labelled["injected_defect"] == "conflicting_duplicate_order_id"]
    original = originals.set_index("order_id").loc[conflicting["order_id"]]
    differs = ((original["amount"].to_numpy() != conflicting["amount"].to_numpy())
               | (original["status"].to_numpy() != conflicting["status"].to_numpy()))
    assert differs.all()


def test_injected_defect_rows_look_like_their_kind(labelled):
    kind = labelled["injected_defect"]
    future = labelled.loc[kind == "future_timestamp", "order_datetime"]
    assert (pd.to_datetime(future, format="%Y/%m/%d %H:%M:%S").dt.date > END).all()
    negative = labelled[kind == "negative_amount"]
    assert (negative["amount"].astype(int) < 0).all() and (negative["status"] == "completed").all()
    bad = labelled.loc[kind == "non_numeric_amount", "amount"]
    assert pd.to_numeric(bad, errors="coerce").isna().all()


def test_parquet_and_csv_exports_hold_the_same_rows(spark, written, tmp_path):
    csv, _ = written
    pq = generate(spark, out_dir=str(tmp_path), fmt="parquet", **WRITTEN)
    assert csv["injected_defects"] == pq["injected_defects"]
    pq_df = spark.read.parquet(pq["orders_path"])
    assert dict(pq_df.dtypes)["amount"] == "string" and dict(pq_df.dtypes)["cancelled_amount"] == "bigint"
    csv_df = spark.read.option("header", True).csv(csv["orders_path"])

    def as_text(df):
        # CSV writes null and "" customer ids both as blanks; compare them as one.
        return sorted(tuple("" if v is None else str(v) for v in row) for row in df.select(*EXPORT_COLUMNS).collect())

    assert as_text(pq_df) == as_text(csv_df)
    assert len(as_text(pq_df)) == pq["n_rows"]


# ---- arguments and config -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"r": 0.0}, {"b": -1.0}, {"channel_stickiness": 1.5},
                                    {"channels": (("web", 0.5), ("app", 0.4))}, {"hour_weights": (1.0,) * 23}])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(GeneratorError):
        GeneratorParams(**kwargs)


@pytest.mark.parametrize("kwargs", [{"n_customers": 0}, {"seed": -1}, {"dirty_share": 0.9},
                                    {"end_date": "2026-09-30"}])
def test_bad_arguments_are_rejected(spark, kwargs):
    args = {"n_customers": 10, "seed": 1, "end_date": END, **kwargs}
    with pytest.raises(GeneratorError):
        generate_orders(spark, **args)


def test_example_conf_maps_every_export_column():
    from core.config import load_config

    source = load_config(CONF).source
    mapped = {k: v for k, v in source.columns.model_dump().items() if v is not None}
    assert sorted(mapped.values()) == sorted(EXPORT_COLUMNS)
    assert source.timestamp_format == TIMESTAMP_FORMAT
    assert source.source_timezone == "Asia/Tokyo"
    assert source.cancellation.style == "status" and source.cancellation.cancelled_values == ("cancelled",)
    assert source.allowed_currencies == ("JPY",)


# ---- cancellation patterns (numpy only: one block, no Spark) --------------------------------

@pytest.fixture(scope="module")
def patterns():
    from datagen.generate import simulate_block

    return {name: simulate_block(0, 4000, 21, GeneratorParams(cancellations=name), dirty_share=0.0)
            for name in ("independent", "retry", "stray", "mixed")}


def test_added_cancellations_leave_the_completed_bg_nbd_orders_unchanged(patterns):
    completed = {name: rows.loc[~rows["is_cancelled"], ["cust", "day", "sec", "amount"]].reset_index(drop=True)
                 for name, rows in patterns.items() if name != "independent"}
    pd.testing.assert_frame_equal(completed["retry"], completed["stray"])
    pd.testing.assert_frame_equal(completed["retry"], completed["mixed"])
    # Same process as the default, whose orders are all BG/NBD transactions (cancelled ones too).
    assert len(completed["retry"]) == len(patterns["independent"])


@pytest.mark.parametrize("name", ["retry", "stray", "mixed"])
def test_about_the_mean_propensity_of_orders_is_cancelled(patterns, name):
    rows = patterns[name]
    share = rows["is_cancelled"].mean()
    per_customer = rows.groupby("cust")["is_cancelled"].agg(["sum", "size"])
    _, se = _clustered_ratio_se(per_customer["sum"], per_customer["size"])
    assert abs(share - PARAMS.mean_cancel_propensity) < 4 * se + 0.005, share


def _next_completed(rows):
    """For each cancelled order: days to the same customer's next completed order of the same amount."""
    cancelled = rows[rows["is_cancelled"]]
    completed = rows[~rows["is_cancelled"]]
    pairs = cancelled.merge(completed, on=["cust", "amount"], suffixes=("", "_completed"))
    gap = pairs["day_completed"] - pairs["day"]
    return pairs.assign(gap=gap)[gap.between(1, 2)].drop_duplicates("order_no")


def test_a_retry_precedes_a_completed_order_by_one_or_two_days_and_strays_come_after_dropout(patterns):
    retry, stray, mixed = patterns["retry"], patterns["stray"], patterns["mixed"]
    assert len(_next_completed(retry)) == int(retry["is_cancelled"].sum())
    # Strays are spread up to the window's end: many come after the customer's last completed order.
    last_completed = stray[~stray["is_cancelled"]].groupby("cust")["day"].max()
    strays = stray[stray["is_cancelled"]]
    after_last = (strays["day"].to_numpy() > last_completed.reindex(strays["cust"]).to_numpy()).mean()
    assert after_last > 0.2, after_last
    last_retry_completed = retry[~retry["is_cancelled"]].groupby("cust")["day"].max()
    retries = retry[retry["is_cancelled"]]
    assert (retries["day"].to_numpy() < last_retry_completed.reindex(retries["cust"]).to_numpy()).all()
    retry_share = len(_next_completed(mixed)) / mixed["is_cancelled"].sum()
    assert 0.4 < retry_share < 0.65, retry_share     # half retries (+ strays that happen to look like one: rare)


def test_an_unknown_cancellation_pattern_is_rejected():
    with pytest.raises(GeneratorError, match="cancellations"):
        GeneratorParams(cancellations="sometimes")


def test_channel_effects_scale_the_purchase_rate_and_order_value_of_their_channel_only():
    from datagen.generate import simulate_block

    plain = simulate_block(0, 10_000, 5, GeneratorParams(), dirty_share=0.0)
    # multipliers of 1 are no effect: the same rows as the default
    neutral = simulate_block(0, 10_000, 5, GeneratorParams(channel_effects=(("app", 1.0, 1.0),)), dirty_share=0.0)
    pd.testing.assert_frame_equal(neutral, plain)
    params = GeneratorParams(channel_effects=(("app", 3.0, 2.0),))
    rows = simulate_block(0, 10_000, 5, params, dirty_share=0.0)
    app = [name for name, _ in params.channels].index("app")

    def per_channel(frame: pd.DataFrame) -> pd.DataFrame:
        first = frame.groupby("cust").first()          # the first order's channel is the acquisition channel
        orders = frame.groupby("cust").size()
        amount = frame.groupby("cust")["amount"].mean()
        return pd.DataFrame({"is_app": first["channel"] == app, "orders": orders, "amount": amount}) \
            .groupby("is_app").mean()

    before, after = per_channel(plain), per_channel(rows)
    # app customers: ~3x the purchase rate (fewer than 3x the orders: dropout caps them), 2x the order value
    assert 1.5 < after.loc[True, "orders"] / before.loc[True, "orders"] < 3.0
    assert 1.85 < after.loc[True, "amount"] / before.loc[True, "amount"] < 2.15
    # the other channels as before (other draws, the same distribution)
    assert abs(after.loc[False, "orders"] / before.loc[False, "orders"] - 1) < 0.05
    assert abs(after.loc[False, "amount"] / before.loc[False, "amount"] - 1) < 0.03
    truth = params.to_truth()["channel_effects"]["app"]
    assert truth["bg_nbd_alpha"] == 20.0 and truth["gamma_gamma_v"] == 7000.0
    assert "channel_effects" not in GeneratorParams().to_truth()
    with pytest.raises(GeneratorError):
        GeneratorParams(channel_effects=(("tv", 2.0, 1.0),))
