"""What the backtest modules share: the prediction rows' schema, the metric and decile columns, the
stage's error."""
from __future__ import annotations


from pyspark.sql import types as T

from core.errors import UserError



DECILE_COLUMNS = ("decile", "n", "mean_predicted", "mean_actual", "sum_predicted", "sum_actual")
#: Coverage of the value intervals (models/intervals.py): null for a model without intervals.
INTERVAL_METRIC_COLUMNS = ("interval_coverage", "interval_closed_coverage")
PREDICTION_SCHEMA = T.StructType([
    T.StructField("model", T.StringType(), False),
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("predicted", T.DoubleType(), False),
    T.StructField("actual", T.DoubleType(), False),
    # the 80% interval and P(value = 0) predicted at the cutoff; null where the model has none
    T.StructField("p10", T.DoubleType(), True),
    T.StructField("p90", T.DoubleType(), True),
    T.StructField("p_zero", T.DoubleType(), True),
])

#: :data:`PREDICTION_SCHEMA` plus each customer's ascending average rank of ``actual`` among the origin's
#: customers minus the mean rank, the same for every model (:func:`pipelines.backtest.metrics.collect_actual_ranks`)
RANKED_PREDICTION_SCHEMA = T.StructType([*PREDICTION_SCHEMA.fields,
                                         T.StructField("actual_rank_centered", T.DoubleType(), False)])


class BacktestError(UserError, ValueError):
    """The backtest cannot run as asked; the message says what to change."""


