# Databricks notebook source
# %% [markdown]
# # Which LTV model predicts CDNOW customers best?
#
# A data scientist's afternoon with the engine's Python API (`cvseg`), as a notebook: cells marked
# `# %%` (Databricks, VS Code, Jupyter with jupytext). It also runs as a plain script, which is how
# the test suite runs it (`tests/integration/test_examples.py`).
#
# 1. ingest lifetimes' CDNOW sample (2,357 customers, 1997-01 .. 1998-06) with the shipped mapping;
# 2. backtest every configured model one horizon (6 months) before 1998-06-30: BG/NBD family +
#    Gamma-Gamma on both purchase bases, the six-month cohort method, the naive baseline;
# 3. put a plain `lifetimes` fit beside them, measured the same way on the same customers;
# 4. score every customer with the champion the backtest registered.
#
# On a cluster: `engine = cvseg.Engine(spark, cvseg.load_config("<your conf>.yaml"))` instead of
# `Engine.local`, and leave out the `toPandas()` of step 3 (it brings the sample's orders to the driver).

# %%
import os
import tempfile
from pathlib import Path

import pandas as pd

import cvseg
from core.dates import add_months, to_date
from models import metrics

AS_OF = to_date("1998-06-30")
HORIZON_MONTHS = 6
workdir = Path(os.environ.get("CVSEG_EXAMPLE_DIR") or tempfile.mkdtemp(prefix="cvseg-example-"))
engine = cvseg.Engine.local(workdir / "warehouse", conf=cvseg.sample_conf("cdnow"),
                            overrides=["models.hybrid.enabled=false", "storage.backend=deltalake"])

# %% 1. Ingest and features
print(engine.ingest(cvseg.cdnow_sample_path(), run_date=AS_OF))
print(engine.features(AS_OF).summary_line())

# %% 2. Backtest every model (logged to MLflow, the best registered as champion)
backtest = engine.backtest(AS_OF)
# the champion metric first (conf: models.champion_metric; `auto` ranks by normalized_gini with quantile bands)
by = backtest.champion_metric
columns = list(dict.fromkeys([by, "normalized_gini", "spearman", "top20_capture", "mae", "total_error_pct",
                              "interval_coverage"]))
best_first = not metrics.METRIC_DIRECTION[by]          # ascending for errors, descending for rankings
table = pd.DataFrame(backtest.metrics).set_index("model")[columns]
print(table.sort_values(by, ascending=best_first).round(3).to_string())
print(backtest.summary_line())

# %% 3. A plain lifetimes fit on the same cutoff, measured on the same customers
from pyspark.sql import functions as F

from cvseg.baselines import plain_lifetimes_value   # lifetimes alone: summary, BG/NBD, Gamma-Gamma

cutoff = add_months(AS_OF, -HORIZON_MONTHS)
holdout = (engine.table("calibration_holdout", as_of=cutoff).select("customer_id", "holdout_net").toPandas()
           .set_index("customer_id")["holdout_net"])
orders = (engine.table("orders").where(~F.col("is_cancelled") & (F.col("order_date") <= F.lit(cutoff)))
          .select("customer_id", "order_date", "net_amount").toPandas())
plain = plain_lifetimes_value(orders, cutoff, HORIZON_MONTHS)
predicted = plain.reindex(holdout.index).fillna(0.0).to_numpy(float)
actual = holdout.to_numpy(float)
plain_row = {"mae": metrics.mae(predicted, actual), "spearman": metrics.spearman(predicted, actual),
             "normalized_gini": metrics.normalized_gini(predicted, actual),
             "top20_capture": metrics.top_share_capture(predicted, actual, 0.2),
             "total_error_pct": metrics.total_error_pct(predicted, actual), "interval_coverage": float("nan")}
comparison = pd.concat([table, pd.DataFrame([plain_row], index=["plain lifetimes"])])
print(comparison.sort_values(by, ascending=best_first).round(3).to_string())

# %% 4. Score everyone with the champion
print(engine.score(AS_OF).summary_line())
top = (engine.table("customer_scores", as_of=AS_OF).orderBy(F.desc("predicted_net_value"))
       .select("customer_id", "p_alive", "expected_purchases", "predicted_net_value").limit(5).toPandas())
print(top.to_string(index=False))
