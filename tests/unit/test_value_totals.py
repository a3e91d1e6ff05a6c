"""Group totals' intervals in Spark (pipelines/value_totals.py) on tiny inline rows, against the numpy
functions of models/intervals.py (tested on simulations in tests/unit/models/test_group_intervals.py)."""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from models import intervals as iv

SCHEMA = T.StructType([
    T.StructField("group", T.StringType()), T.StructField("predicted_net_value", T.DoubleType()),
    T.StructField("p_zero_value", T.DoubleType()), T.StructField("predicted_net_value_sd", T.DoubleType()),
    T.StructField("predicted_net_value_param_sd", T.DoubleType()),
    T.StructField("predicted_net_value_param_loadings", T.ArrayType(T.DoubleType())),
])
ROWS = [
    # a: three customers; the loadings of the first two partly cancel, as customers react oppositely
    ("a", 1000.0, 0.2, 900.0, 60.0, [50.0, -20.0]),
    ("a", 400.0, 0.6, 700.0, 35.0, [-30.0, 10.0]),
    ("a", 2000.0, 0.1, 1500.0, 90.0, [80.0, 40.0]),
    # b: a customer with a value and no interval (e.g. the hybrid's value): no interval for the group
    ("b", 500.0, 0.3, 800.0, 40.0, [30.0, 5.0]),
    ("b", 300.0, None, None, None, None),
    # c: a customer placed by rule (value 0, no interval) adds nothing; the other's interval stands
    ("c", 0.0, None, None, None, None),
    ("c", 800.0, 0.25, 1000.0, 50.0, [40.0, 20.0]),
]


def _sums(spark):
    from pipelines.value_totals import total_interval_sums, with_total_interval

    df = spark.createDataFrame(ROWS, SCHEMA)
    sums_df = df.groupBy("group").agg(*total_interval_sums(F.col("predicted_net_value"), 2))
    return {r["group"]: r for r in with_total_interval(sums_df).collect()}


def _expected(rows):
    value, p0, sd, param_sd = (np.array([r[k] for r in rows], dtype=float) for k in (1, 2, 3, 4))
    loadings = np.array([r[5] for r in rows], dtype=float)
    interaction = np.sqrt(np.maximum(param_sd ** 2 - (loadings ** 2).sum(axis=1), 0))
    var = iv.group_total_variance((sd ** 2 - param_sd ** 2).sum(), loadings.sum(axis=0), interaction.sum())
    return iv.total_quantiles(value.sum(), var, np.prod(p0))[0]


def test_group_sums_give_the_numpy_interval(spark):
    out = _sums(spark)
    np.testing.assert_allclose([out["a"]["value_p10"], out["a"]["value_p90"]], _expected(ROWS[:3]), rtol=1e-9)
    assert out["a"]["value"] == pytest.approx(3400.0)
    # the parameter part adds before squaring: sum of loadings (100, 30), not of their lengths
    assert out["a"]["predicted_net_value_param_loadings"] == pytest.approx([100.0, 30.0])
    assert out["b"]["value_p10"] is None and out["b"]["customers_without_interval"] == 1
    assert out["b"]["value"] == pytest.approx(800.0)
    np.testing.assert_allclose([out["c"]["value_p10"], out["c"]["value_p90"]], _expected(ROWS[6:]), rtol=1e-9)
    assert out["c"]["customers_without_interval"] == 0


def test_rows_of_group_sums_roll_up_to_the_same_interval(spark):
    from pipelines.value_totals import rollup_interval_sums, total_interval_sums, with_total_interval

    df = spark.createDataFrame([r for r in ROWS if r[0] in ("a", "c")], SCHEMA)
    # per customer first (each its own group), then rolled up: the same as grouping the customers at once
    singles = df.withColumn("one", F.monotonically_increasing_id()).groupBy("one").agg(
        *total_interval_sums(F.col("predicted_net_value"), 2))
    rolled = with_total_interval(singles.agg(*rollup_interval_sums("value", 2))).first()
    at_once = with_total_interval(df.agg(*total_interval_sums(F.col("predicted_net_value"), 2))).first()
    assert rolled["value_p10"] == pytest.approx(at_once["value_p10"], rel=1e-12)
    assert rolled["value_p90"] == pytest.approx(at_once["value_p90"], rel=1e-12)


def test_loadings_of_two_fits_are_not_added(spark):
    from pipelines.value_totals import loadings_width

    df = spark.createDataFrame(ROWS, SCHEMA)
    assert loadings_width(df) == 2
    mixed = df.union(spark.createDataFrame([("a", 1.0, 0.5, 1.0, 0.1, [0.1, 0.0, 0.0])], SCHEMA))
    with pytest.raises(ValueError, match="mix parameter loadings of 2 and 3"):
        loadings_width(mixed)
