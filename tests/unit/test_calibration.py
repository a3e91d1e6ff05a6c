"""Calibration/holdout: features as of C joined with actual orders in (C, C+H], computed by hand."""
from __future__ import annotations

import datetime as dt

import pytest

from core.config import FeaturesConf
from pipelines.calibration import CalibrationError, run_calibration
from tests.unit.test_storage import _orders_df


def test_holdout_counts_only_the_window_and_excludes_new_customers(spark, storage):
    storage.append("orders", _orders_df(spark, [
        ("o1", "c1", "2024-01-05", 10.0), ("o2", "c1", "2024-03-01", 20.0),   # c1: before cutoff
        ("o3", "c1", "2024-04-10", 30.0), ("o4", "c1", "2024-04-10", 5.0),    # same day: 1 purchase day
        ("o5", "c1", "2024-10-01", 99.0),                                      # after the horizon end
        ("o6", "c2", "2024-02-01", 7.0),                                       # c2: no holdout orders
        ("o7", "c3", "2024-05-01", 8.0),                                       # c3: first seen after cutoff
    ]))
    stats = run_calibration(storage, dt.date(2024, 3, 31), FeaturesConf(), 6)
    rows = {r.customer_id: r for r in storage.read("calibration_holdout").collect()}
    assert set(rows) == {"c1", "c2"}
    assert (rows["c1"].holdout_orders, rows["c1"].holdout_purchase_days, rows["c1"].holdout_net) == (2, 1, 35.0)
    assert (rows["c2"].holdout_orders, rows["c2"].holdout_net) == (0, 0.0)
    assert rows["c1"].n_orders == 2 and rows["c1"].frequency == 1.0
    assert rows["c1"].horizon_end == dt.date(2024, 9, 30)
    assert stats.customers == 2 and stats.holdout_buyers == 1
    with pytest.raises(CalibrationError, match="runs past the last order day"):
        run_calibration(storage, dt.date(2024, 9, 1), FeaturesConf(), 6)
