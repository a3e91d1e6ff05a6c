"""Incremental features (features.incremental): updating the features of P to D equals computing
D from every order, on a seeded sample with late orders, orders stored ahead of P and orders after
D; and anything but plain appends to `orders` falls back to the full computation."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
from pyspark.sql import functions as F

from core.config import FeaturesConf
from core.tables import CUSTOMER_FEATURES
from pipelines import features
from pipelines.features import build_customer_features, run_features
from tests.unit.test_features_reference import make_sample, to_spark_orders

P = dt.date(2024, 5, 31)
D = dt.date(2024, 8, 31)
CONF = FeaturesConf(full_every_days=400)   # the sample spreads orders thinly: update over 3 months


def assert_same_features(got_df, want_df) -> None:
    got = {r["customer_id"]: r.asDict() for r in got_df.collect()}
    want = {r["customer_id"]: r.asDict() for r in want_df.collect()}
    assert got.keys() == want.keys()
    for customer_id, row in want.items():
        for column in CUSTOMER_FEATURES.columns:
            a, b = got[customer_id][column], row[column]
            if isinstance(b, float) and a is not None:
                assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9), (customer_id, column, a, b)
            else:
                assert a == b, (customer_id, column, a, b)


def test_update_equals_full_computation_and_falls_back_when_orders_are_rewritten(spark, storage, monkeypatch):
    # a third of this small sample buys within the three months: allow the update anyway
    monkeypatch.setattr(features, "INCREMENTAL_MAX_TOUCHED_SHARE", 0.9)
    rng = np.random.default_rng(11)
    orders = make_sample(rng, n_customers=400)
    between = (orders["order_date"] > P) & (orders["order_date"] <= D)
    late = (orders["order_date"] <= P) & (rng.random(len(orders)) < 0.05)       # arrive after P ran
    ahead = between & (rng.random(len(orders)) < 0.5)                           # stored before P ran
    first = (((orders["order_date"] <= P) & ~late) | ahead
             | ((orders["order_date"] > D) & (rng.random(len(orders)) < 0.5)))
    storage.append("orders", to_spark_orders(spark, orders[first]))
    at_p = run_features(storage, P, CONF)
    assert at_p.mode == "full" and at_p.full_reason == "no earlier features"

    # the night's file: the rest (late orders for P's customers, new customers, orders after D)
    storage.append("orders", to_spark_orders(spark, orders[~first]))
    at_d = run_features(storage, D, CONF)
    assert at_d.mode == "incremental" and at_d.updated_from == P, at_d
    assert 0 < at_d.recomputed_customers < at_d.customers
    stored = storage.read("customer_features").where(F.col("as_of_date") == F.lit(D))
    reference = build_customer_features(storage.read("orders"), D)
    assert_same_features(stored, reference)
    # the run's counts are those of the written partition
    want = reference.agg(F.count(F.lit(1)), F.sum("n_orders"), F.count_if("is_repeat")).first()
    assert (at_d.customers, at_d.orders, at_d.repeat_customers) == tuple(want)
    runs = {r["as_of_date"]: r for r in storage.read("features_runs").collect()}
    assert (runs[D]["mode"], runs[D]["base_as_of_date"], runs[D]["full_as_of_date"]) == ("incremental", P, P)

    # a corrected order (merge rewrites its month): no update, every customer computed again
    changed = orders[orders["order_date"] <= P].head(1).assign(gross_amount=12345.0, net_amount=12345.0,
                                                              cancelled_amount=0.0, is_cancelled=False)
    storage.merge("orders", to_spark_orders(spark, changed))
    later = D + dt.timedelta(days=1)
    rewritten = run_features(storage, later, CONF)
    assert rewritten.mode == "full" and "rewritten" in rewritten.full_reason

    # the safety net: the last full computation too old
    stale = run_features(storage, later + dt.timedelta(days=1), FeaturesConf(full_every_days=1))
    assert stale.mode == "full" and "full_every_days=1" in stale.full_reason
    stored = storage.read("customer_features").where(F.col("as_of_date") == F.lit(later + dt.timedelta(days=1)))
    assert_same_features(stored, build_customer_features(storage.read("orders"), later + dt.timedelta(days=1)))

    # a partition written before the source columns existed (null there) is not updated from
    last = later + dt.timedelta(days=1)
    old_df = (storage.read("customer_features").where(F.col("as_of_date") == F.lit(last))
              .withColumn("first_source", F.lit(None).cast("string")))
    storage.replace_partitions("customer_features", old_df, partitions={"as_of_date": [last]})
    upgraded = run_features(storage, last + dt.timedelta(days=1), CONF)
    assert upgraded.mode == "full" and "source columns" in upgraded.full_reason, upgraded
