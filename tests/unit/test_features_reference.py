"""Every customer_features column against an independent pandas computation (plain loops per
customer) on a seeded random sample plus hand-made edge cases. The reference never calls the
Spark code; it only shares the written definitions (pipelines/features.py docstring)."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import types as T

from core.tables import CUSTOMER_FEATURES, ORDERS
from pipelines.features import build_customer_features

AS_OF = dt.date(2024, 5, 31)     # month end: the 3-month bound clamps to 2024-02-29
START = dt.date(2022, 6, 1)
CHANNELS = ["web", "app", "LINE", "catalog", None]
CATEGORIES = ["food", "beauty", "health", "kids", None]
SOURCES = ["ec", "ec", "store", None]      # None: an order written before sources had names


# --------------------------------------------------------------------------------------------
# Sample: random customers plus named edge cases
# --------------------------------------------------------------------------------------------
def _order(customer_id, day, hour, gross, cancelled="no", channel="web", category="food", source="ec"):
    cancelled_amount = {"no": 0.0, "full": gross, "part": float(round(gross * 0.3))}[cancelled]
    return {"customer_id": customer_id, "source_name": source, "order_date": day,
            "order_ts": dt.datetime.combine(day, dt.time(hour)), "gross_amount": float(gross),
            "is_cancelled": cancelled == "full", "cancelled_amount": cancelled_amount,
            "net_amount": float(gross) - cancelled_amount, "channel": channel, "category": category}


def _edge_cases() -> list[dict]:
    d = dt.date
    return [
        _order("e_single", d(2024, 3, 1), 10, 1000),
        _order("e_all_cancelled", d(2024, 1, 10), 10, 500, "full"),
        _order("e_all_cancelled", d(2024, 2, 10), 10, 700, "full"),
        _order("e_cancel_first", d(2023, 4, 1), 9, 400, "full", channel=None),   # null first channel
        _order("e_cancel_first", d(2023, 4, 5), 9, 600, channel="app"),
        _order("e_cancel_first", d(2023, 4, 5), 18, 400, "part", channel="app"),  # same day
        _order("e_cancel_first", d(2024, 7, 5), 9, 9999, channel="app"),          # after as-of
        _order("e_same_day_only", d(2024, 5, 31), 9, 300),                        # on the as-of day
        _order("e_same_day_only", d(2024, 5, 31), 11, 200),
        _order("e_after_only", d(2024, 6, 1), 9, 100),                            # not in the table
        _order("e_zero_gross", d(2023, 8, 1), 9, 0),                              # gross 0: no amount rate
        _order("e_zero_gross", d(2023, 9, 1), 9, 0, "full"),
        _order("e_cat_gross_tie", d(2023, 1, 1), 9, 100, category="kids"),        # 1 order each:
        _order("e_cat_gross_tie", d(2023, 2, 1), 9, 300, category="beauty"),      # larger gross wins
        _order("e_cat_name_tie", d(2023, 1, 1), 9, 100, category="kids"),         # same count and gross:
        _order("e_cat_name_tie", d(2023, 2, 1), 9, 100, category="beauty"),       # smaller name wins
        _order("e_cat_name_tie", d(2023, 3, 1), 9, 100, category=None),
        _order("e_no_category", d(2023, 3, 1), 9, 100, category=None),
        _order("e_ts_tie", d(2023, 6, 1), 12, 100, channel="store"),              # same instant: the
        _order("e_ts_tie", d(2023, 6, 1), 12, 100, channel="LINE"),               # smaller order_id wins
        _order("e_trailing", d(2024, 2, 29), 9, 10),                              # = add_months(D, -3): out
        _order("e_trailing", d(2024, 3, 1), 9, 20),                               # first day in 3m
        _order("e_trailing", d(2023, 11, 30), 9, 40),                             # = add_months(D, -6): out
        _order("e_trailing", d(2023, 5, 31), 9, 80),                              # = add_months(D, -12): out
        _order("e_trailing", d(2023, 6, 1), 9, 160),
        _order("e_store_first", d(2023, 8, 31), 9, 100, source="store"),         # six months end 2024-02-29:
        _order("e_store_first", d(2024, 2, 28), 9, 200, "part", source="ec"),   # in (net 140)
        _order("e_store_first", d(2024, 2, 29), 9, 400, source="ec"),            # = add_months(first, 6): out
        _order("e_unnamed", d(2023, 3, 1), 9, 100, source=None),                 # "default"
        _order("e_unnamed", d(2023, 4, 1), 9, 100, source="store"),
    ]


def make_sample(rng: np.random.Generator, n_customers: int = 300) -> pd.DataFrame:
    span = (dt.date(2024, 12, 31) - START).days
    rows = []
    for i in range(n_customers):
        customer_id = f"C{i:04d}"
        n = int(rng.geometric(0.3))
        # some customers buy from a small pool of days, so same-day orders are common
        pool = rng.integers(0, span, size=3) if rng.random() < 0.3 else None
        for _ in range(n):
            offset = int(rng.choice(pool)) if pool is not None else int(rng.integers(0, span))
            cancelled = rng.choice(["no", "full", "part"], p=[0.75, 0.15, 0.10])
            rows.append(_order(customer_id, START + dt.timedelta(days=offset), int(rng.choice([9, 12, 12, 18])),
                               int(rng.choice([0, 500, 1000, 1500, 3000])), cancelled,
                               CHANNELS[rng.integers(len(CHANNELS))], CATEGORIES[rng.integers(len(CATEGORIES))],
                               SOURCES[rng.integers(len(SOURCES))]))
    rows += _edge_cases()
    orders = pd.DataFrame(rows)
    # order ids in a random order, so "ties by order_id" is not the insertion order
    orders["order_id"] = [f"O{k:05d}" for k in rng.permutation(len(orders))]
    return orders


def _python_value(value):
    # pandas 3 stores missing strings as NaN; Spark needs None (it would keep the text "NaN")
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.to_pydatetime() if isinstance(value, pd.Timestamp) else value


def to_spark_orders(spark, orders: pd.DataFrame):
    """The ORDERS-shaped DataFrame the features read (full ORDERS schema, as the table has)."""
    full = orders.assign(currency="JPY", extra=None, source_file="sample.csv",
                         source_row=np.arange(1, len(orders) + 1), ingest_run_id="test",
                         order_month=[d.strftime("%Y-%m") for d in orders["order_date"]])
    schema = ORDERS.stored_schema          # with source_name, a column added after the first release
    records = [tuple(_python_value(v) for v in row)
               for row in full[schema.fieldNames()].astype(object).itertuples(index=False, name=None)]
    return spark.createDataFrame(records, schema)


# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------
def _quantile_scores(values: list[float], reverse: bool = False) -> list[int]:
    """Exact quintile scores: cut points are numpy's inverted-CDF quantiles (an element of the
    data); score = 1 + number of cut points strictly below the value."""
    cuts = np.quantile(np.asarray(values, dtype=float), [0.2, 0.4, 0.6, 0.8], method="inverted_cdf")
    scores = [1 + sum(1 for c in cuts if v > c) for v in values]
    return [6 - s for s in scores] if reverse else scores


def _source(name) -> str:
    return "default" if name is None or (isinstance(name, float) and math.isnan(name)) else name


def reference_features(orders: pd.DataFrame, as_of: dt.date, time_unit: str = "days") -> pd.DataFrame:
    unit = {"days": 1.0, "weeks": 7.0}[time_unit]
    seen = orders[orders["order_date"] <= as_of]
    bounds = {m: (pd.Timestamp(as_of) - pd.DateOffset(months=m)).date() for m in (3, 6, 12)}
    out = []
    for customer_id, g in seen.groupby("customer_id"):
        g = g.sort_values(["order_ts", "order_id"])
        days = sorted(set(g["order_date"]))
        gross_by_day = {day: g.loc[g["order_date"] == day, "gross_amount"].sum() for day in days}
        gaps = [(b - a).days for a, b in zip(days, days[1:])]
        completed = g[~g["is_cancelled"]]
        gross = g["gross_amount"].sum()
        categories = {}
        for category, cg in g[g["category"].notna()].groupby("category"):
            categories[category] = (len(cg), cg["gross_amount"].sum())
        top = min(categories, key=lambda c: (-categories[c][0], -categories[c][1], c)) if categories else None
        row = {
            "as_of_date": as_of, "customer_id": customer_id, "time_unit": time_unit,
            "first_order_date": days[0], "last_order_date": days[-1],
            "n_orders": len(g), "n_cancelled": int(g["is_cancelled"].sum()), "n_purchase_days": len(days),
            "frequency": float(len(days) - 1),
            "recency": (days[-1] - days[0]).days / unit, "T": (as_of - days[0]).days / unit,
            "monetary_value": float(np.mean([gross_by_day[d] for d in days[1:]])) if len(days) > 1 else 0.0,
            "gross_amount": gross, "cancelled_amount": g["cancelled_amount"].sum(),
            "net_amount": g["net_amount"].sum(),
            "avg_order_value": completed["gross_amount"].mean() if len(completed) else None,
            "cancel_rate_count": g["is_cancelled"].sum() / len(g),
            "cancel_rate_amount": g["cancelled_amount"].sum() / gross if gross != 0 else None,
            "gap_mean_days": float(np.mean(gaps)) if gaps else None,
            "gap_std_days": float(np.std(gaps, ddof=1)) if len(gaps) >= 2 else None,
            "acquisition_channel": g.iloc[0]["channel"], "top_category": top,
            "first_category": g.iloc[0]["category"],
            "first_source": _source(g.iloc[0]["source_name"]),
            "source_set": "+".join(sorted({_source(s) for s in g["source_name"]})),
            "net_first_6m": g.loc[g["order_date"] < (pd.Timestamp(days[0]) + pd.DateOffset(months=6)).date(),
                                  "net_amount"].sum(),
            "is_repeat": len(days) >= 2,
            "days_to_second_purchase": (days[1] - days[0]).days if len(days) >= 2 else None,
        }
        # net basis: the same statistics on completed orders with their net amounts
        net_days = sorted(set(completed["order_date"]))
        net_by_day = {day: completed.loc[completed["order_date"] == day, "net_amount"].sum() for day in net_days}
        row.update({
            "net_first_order_date": net_days[0] if net_days else None,
            "net_frequency": float(len(net_days) - 1) if net_days else None,
            "net_recency": (net_days[-1] - net_days[0]).days / unit if net_days else None,
            "net_T": (as_of - net_days[0]).days / unit if net_days else None,
            "net_monetary_value": (float(np.mean([net_by_day[d] for d in net_days[1:]])) if len(net_days) > 1
                                   else 0.0) if net_days else None,
        })
        for m, bound in bounds.items():
            window = g[g["order_date"] > bound]
            row[f"orders_{m}m"] = len(window)
            row[f"net_{m}m"] = window["net_amount"].sum()
        out.append(row)
    ref = pd.DataFrame(out).sort_values("customer_id").reset_index(drop=True)
    ref["rfm_r"] = _quantile_scores([(as_of - d).days for d in ref["last_order_date"]], reverse=True)
    ref["rfm_f"] = _quantile_scores(list(ref["n_orders"]))
    ref["rfm_m"] = _quantile_scores(list(ref["net_amount"]))
    ref["rfm_score"] = [f"{r}{f}{m}" for r, f, m in zip(ref["rfm_r"], ref["rfm_f"], ref["rfm_m"])]
    return ref[CUSTOMER_FEATURES.columns]


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------
def _plain(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)     # integer columns with nulls come back from toPandas as floats
    if isinstance(value, pd.Timestamp):
        return value.date()
    return value


def assert_matches_reference(actual: pd.DataFrame, expected: pd.DataFrame, schema: T.StructType) -> None:
    actual = actual.sort_values("customer_id").reset_index(drop=True)
    assert list(actual["customer_id"]) == list(expected["customer_id"])
    for field in schema.fields:
        got, want = actual[field.name].tolist(), expected[field.name].tolist()
        if isinstance(field.dataType, T.DoubleType):
            np.testing.assert_allclose(np.array([np.nan if v is None else v for v in got], dtype=float),
                                       np.array([np.nan if v is None else v for v in want], dtype=float),
                                       rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=field.name)
        else:
            mismatches = [(cid, g, w) for cid, g, w in zip(expected["customer_id"], got, want)
                          if _plain(g) != _plain(w)]
            assert not mismatches, f"{field.name}: (customer, spark, reference) {mismatches[:5]}"


@pytest.fixture(scope="module")
def sample():
    return make_sample(np.random.default_rng(20261123))


@pytest.fixture(scope="module")
def sample_orders_df(spark, sample):
    return to_spark_orders(spark, sample)


def test_every_feature_matches_the_pandas_reference(sample, sample_orders_df):
    features_df = build_customer_features(sample_orders_df, AS_OF, time_unit="days")
    assert [(f.name, f.dataType) for f in features_df.schema.fields] == \
           [(f.name, f.dataType) for f in CUSTOMER_FEATURES.schema.fields]
    expected = reference_features(sample, AS_OF)
    # the sample really contains what the edge cases are about
    assert {"e_single", "e_all_cancelled", "e_same_day_only", "e_zero_gross"} <= set(expected["customer_id"])
    assert "e_after_only" not in set(expected["customer_id"])
    assert expected["n_purchase_days"].lt(expected["n_orders"]).sum() > 10      # same-day orders
    assert expected["acquisition_channel"].isna().sum() > 10
    assert expected["rfm_score"].nunique() > 20
    assert_matches_reference(features_df.toPandas(), expected, CUSTOMER_FEATURES.schema)

    by_id = expected.set_index("customer_id")
    # spot checks of the edge cases, so a shared misreading of a definition would show here too
    assert by_id.loc["e_trailing", ["orders_3m", "orders_6m", "orders_12m"]].tolist() == [1, 2, 4]
    assert by_id.loc["e_cat_gross_tie", "top_category"] == "beauty"
    assert by_id.loc["e_cat_name_tie", "top_category"] == "beauty"
    assert by_id.loc["e_ts_tie", "acquisition_channel"] == min(
        sample[sample.customer_id == "e_ts_tie"].itertuples(), key=lambda r: r.order_id).channel
    assert pd.isna(by_id.loc["e_zero_gross", "cancel_rate_amount"])
    assert pd.isna(by_id.loc["e_all_cancelled", "net_frequency"])
    assert (expected["net_frequency"] < expected["frequency"]).sum() > 10     # cancelled purchase days
    assert by_id.loc["e_store_first", ["first_source", "source_set", "net_first_6m"]].tolist() == \
        ["store", "ec+store", 240.0]
    assert by_id.loc["e_unnamed", ["first_source", "source_set"]].tolist() == ["default", "default+store"]
    assert expected["source_set"].nunique() >= 4                                # ec, store, default, mixes


def test_weeks_divide_the_day_counts_by_seven(sample, sample_orders_df):
    features = build_customer_features(sample_orders_df, AS_OF, time_unit="weeks").toPandas()
    expected = reference_features(sample, AS_OF, time_unit="weeks")
    assert_matches_reference(features, expected, CUSTOMER_FEATURES.schema)
    assert set(features["time_unit"]) == {"weeks"}
