"""Stage results: the JSON keys the runners' dicts had, dates as ISO strings, optional keys left out."""
import dataclasses
import datetime as dt
import json

import pytest

from pipelines.features import FeaturesResult
from pipelines.segments import SegmentsResult

D = dt.date(2026, 3, 31)


def test_features_result_keys_and_dates():
    full = FeaturesResult(D, "days", "full", 10, 10, 25, 4, full_reason="no earlier features")
    assert full.asdict() == {"as_of_date": "2026-03-31", "time_unit": "days", "mode": "full", "customers": 10,
                             "recomputed_customers": 10, "orders": 25, "repeat_customers": 4,
                             "full_reason": "no earlier features"}
    update = FeaturesResult(D, "days", "incremental", 10, 2, 27, 5, updated_from=dt.date(2026, 3, 30))
    assert update.asdict()["updated_from"] == "2026-03-30" and "full_reason" not in update.asdict()
    assert update.summary_line() == "10 customers, 27 orders (updated from 2026-03-30, 2 recomputed)"
    json.dumps(update.asdict())          # JSON-ready as is
    with pytest.raises(dataclasses.FrozenInstanceError):
        update.customers = 11


def test_segments_result_keeps_the_cut_keys_only_for_a_cut():
    placed = SegmentsResult(D, 1, False, 2, {"top": 2}, {"top": 5}, 5)
    assert set(placed.asdict()) == {"as_of_date", "generation_id", "new_generation", "customers_placed",
                                    "placed_by_segment", "segment_counts", "customers"}
    first_cut = SegmentsResult(D, 1, True, 5, {"top": 5}, {"top": 5}, 5, cut_points={"top": None})
    assert first_cut.asdict()["previous_generation"] is None and first_cut.asdict()["cut_points"] == {"top": None}
    assert "migrated_customers" not in first_cut.asdict()
    assert first_cut.summary_line().startswith("cut generation 1: 5 placed")


def test_ltv_by_channel_result_says_why_nothing_was_written(spark):
    from pipelines.value_totals import LtvByChannelResult   # its module declares a pandas UDF: needs a session

    skipped = LtvByChannelResult(D, not_written="not written: no customer_scores for 2026-03-31")
    assert skipped.asdict() == {"ltv_by_channel": "not written: no customer_scores for 2026-03-31"}
    written = LtvByChannelResult(D, rows=3, customers=40, rows_with_interval=3)
    assert written.asdict() == {"ltv_by_channel_rows": 3, "ltv_by_channel_customers": 40,
                                "ltv_by_channel_rows_with_interval": 3}
