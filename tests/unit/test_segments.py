"""Segments: band and lifecycle assignment vs hand-computed, review, migration (quantile cut points:
tests/integration/test_segment_stability.py)."""
from __future__ import annotations

import datetime as dt

import pytest

from core.config import SegmentBand, SegmentsConf, load_config
from core.tables import CUSTOMER_FEATURES, CUSTOMER_SCORES, ORDERS

D = dt.date(2026, 3, 31)


# --------------------------------------------------------------------------------------------
# Small table writers (shared with tests/integration/test_segment_stability.py)
# --------------------------------------------------------------------------------------------
def _default(dtype_name: str, as_of: dt.date):
    return {"string": "x", "bigint": 0, "int": 0, "double": 0.0, "boolean": False, "date": as_of}[dtype_name]


def write_features(storage, as_of: dt.date, rows: list[tuple[str, dt.date, int]]) -> None:
    """customer_features rows (customer_id, first_order_date, n_purchase_days); other columns filler."""
    given = {"customer_id": 0, "first_order_date": 1, "n_purchase_days": 2}
    data = []
    for row in rows:
        values = []
        for field in CUSTOMER_FEATURES.schema.fields:
            if field.name in given:
                values.append(row[given[field.name]])
            elif field.name == "as_of_date":
                values.append(as_of)
            else:
                values.append(_default(field.dataType.simpleString(), as_of))
        data.append(tuple(values))
    df = storage.spark.createDataFrame(data, CUSTOMER_FEATURES.schema)
    storage.replace_partitions(CUSTOMER_FEATURES.name, df, partitions={"as_of_date": [as_of]})


def write_scores(storage, as_of: dt.date, rows: list[tuple[str, float, float]], horizon_months: int = 6) -> None:
    """customer_scores rows (customer_id, p_alive, predicted_net_value)."""
    given = [(as_of, cid, float(p), 1.0, 1.0, float(v), 0.0, float(v), "btyd", "test", horizon_months, "gross")
             for cid, p, v in rows]
    # the later, nullable columns (value intervals, ...) stay null
    data = [row + (None,) * (len(CUSTOMER_SCORES.schema) - len(row)) for row in given]
    df = storage.spark.createDataFrame(data, CUSTOMER_SCORES.schema)
    storage.replace_partitions(CUSTOMER_SCORES.name, df, partitions={"as_of_date": [as_of]})


def write_orders(storage, rows: list[tuple[str, str, dt.date, float]], run_id: str = "run-1") -> None:
    """orders rows (order_id, customer_id, order_date, net_amount), none cancelled."""
    data = [(oid, cid, dt.datetime.combine(day, dt.time(12)), day, float(net), False, 0.0, float(net),
             "web", "food", "JPY", None, "test.csv", i + 1, run_id, day.strftime("%Y-%m"))
            for i, (oid, cid, day, net) in enumerate(rows)]
    storage.merge(ORDERS.name, storage.spark.createDataFrame(data, ORDERS.schema))


def segments_conf(**kw) -> SegmentsConf:
    return SegmentsConf(**kw)


def current_segments(storage) -> dict[str, str]:
    return {r["customer_id"]: r["segment"] for r in storage.read("segments_current").collect()}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("segments.bands=[{name: a, lower: 0.5}, {name: b, lower: 0.7}, {name: c, lower: null}]", "strictly decrease"),
    ("segments.bands=[{name: a, lower: 0.5}, {name: b, lower: 0.1}]", "lower: null"),
    ("segments.bands=[{name: a, lower: 1.5}, {name: b, lower: null}]", "quantile in \\(0, 1\\)"),
    ("segments.bands=[{name: new, lower: 0.5}, {name: b, lower: null}]", "reserved"),
    ("segments.bands=[{name: a, lower: 0.5}, {name: a, lower: null}]", "unique"),
    ("segments.dormant_p_alive=2", "segments.dormant_p_alive"),
])
def test_bad_segment_config_names_the_key(override, message):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_value_bands_accept_amounts():
    config = load_config(None, ["segments.band_method=value",
                                "segments.bands=[{name: vip, lower: 50000}, {name: rest, lower: null}]"])
    assert config.segments.bands[0] == SegmentBand(name="vip", lower=50000.0)


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------
def test_value_bands_and_lifecycle_precedence_hand_computed(storage):
    from pipelines.segments import run_segments

    long_ago = D - dt.timedelta(days=400)
    # (customer, first order, purchase days, p_alive, value, expected segment)
    cases = [
        ("c_top_edge", long_ago, 5, 0.9, 10000.0, "top"),        # value == threshold: inclusive
        ("c_mid_below", long_ago, 5, 0.9, 9999.99, "mid"),
        ("c_mid_edge", long_ago, 3, 0.9, 3000.0, "mid"),
        ("c_low", long_ago, 3, 0.9, 2999.0, "low"),
        ("c_zero", long_ago, 2, 0.5, 0.0, "low"),
        ("c_new", D - dt.timedelta(days=10), 1, 1.0, 50000.0, "new"),      # new wins over its value
        ("c_new_and_dormant", D - dt.timedelta(days=89), 1, 0.05, 0.0, "new"),  # new wins over dormant
        ("c_new_window_edge", D - dt.timedelta(days=90), 1, 1.0, 5000.0, "mid"),  # 90 days ago: not new
        ("c_recent_repeat", D - dt.timedelta(days=10), 2, 1.0, 20000.0, "top"),  # two purchase days: not new
        ("c_dormant", long_ago, 8, 0.19, 80000.0, "dormant"),    # dormant wins over the top value
        ("c_alive_edge", long_ago, 8, 0.2, 80000.0, "top"),      # p_alive == threshold: not dormant
        ("c_no_features", long_ago, 0, 0.9, 4000.0, "mid"),      # scored, no features row: not new
    ]
    write_features(storage, D, [(c, first, n) for c, first, n, *_ in cases if c != "c_no_features"])
    write_scores(storage, D, [(c, p, v) for c, _, _, p, v, _ in cases])
    conf = segments_conf(band_method="value", bands=(SegmentBand(name="top", lower=10000),
                                                     SegmentBand(name="mid", lower=3000),
                                                     SegmentBand(name="low", lower=None)),
                         new_customer_days=90, dormant_p_alive=0.2)
    summary = run_segments(storage, D, conf)
    assert summary.new_generation and summary.generation_id == 1
    assert current_segments(storage) == {c: seg for c, *_, seg in cases}
    assert summary.segment_counts == {"top": 3, "mid": 4, "low": 2, "new": 2, "dormant": 1}
    row = storage.read("segments_current").where("customer_id = 'c_dormant'").first()
    assert (row["value_at_assignment"], row["p_alive_at_assignment"], row["assigned_as_of"]) == (80000.0, 0.19, D)


def test_missing_inputs_say_what_to_run(storage):
    from pipelines.segments import SegmentsError, run_segments

    conf = segments_conf()
    with pytest.raises(SegmentsError, match="cvseg score --as-of 2026-03-31"):
        run_segments(storage, D, conf)
    write_scores(storage, D, [("a", 0.9, 1.0)])
    with pytest.raises(SegmentsError, match="cvseg features --as-of 2026-03-31"):
        run_segments(storage, D, conf)
    with pytest.raises(SegmentsError, match="no customer_scores for 2026-04-01"):
        run_segments(storage, D + dt.timedelta(days=1), conf)


# --------------------------------------------------------------------------------------------
# Closing the loop: review and migration transforms on tiny inputs
# --------------------------------------------------------------------------------------------
def test_generation_review_hand_computed(spark):
    from pipelines.segments import generation_review

    start, end = dt.date(2026, 1, 31), dt.date(2026, 7, 31)
    history_df = spark.createDataFrame(
        [("a", "top", 1000.0, start), ("b", "top", 500.0, start), ("c", "low", 10.0, dt.date(2026, 6, 30)),
         ("d", "low", 0.0, start)],
        "customer_id string, segment string, value_at_assignment double, assigned_as_of date")
    orders_df = spark.createDataFrame(
        [("a", start, 999.0),                      # on the assignment day: before the window
         ("a", dt.date(2026, 2, 1), 300.0), ("a", end, 200.0),   # first and last day of the window
         ("a", dt.date(2026, 8, 1), 999.0),        # after the generation
         ("b", dt.date(2026, 3, 3), 100.0),
         ("c", dt.date(2026, 6, 30), 999.0), ("c", dt.date(2026, 7, 1), 40.0),
         ("x", dt.date(2026, 3, 3), 999.0)],       # not in the generation
        "customer_id string, order_date date, net_amount double")
    rows = {r["segment"]: r.asDict() for r in
            generation_review(history_df, orders_df, 1, start, end, horizon_months=6).collect()}
    top, low = rows["top"], rows["low"]
    assert (top["customers"], top["buyers"], top["actual_orders"]) == (2, 2, 3)
    assert top["predicted_net_value"] == 1500.0 and top["actual_net_value"] == 600.0
    assert top["actual_to_predicted"] == pytest.approx(0.4)
    assert top["horizon_coverage"] == pytest.approx(1.0)
    assert (low["customers"], low["buyers"], low["actual_orders"], low["actual_net_value"]) == (2, 1, 1, 40.0)
    # c covers 31 of the 183 days of its horizon (2026-06-30 -> 2026-12-30), d the full horizon
    assert low["horizon_coverage"] == pytest.approx((31 / 183 + 1.0) / 2)
    assert low["actual_to_predicted"] == pytest.approx(4.0)
    assert (top["generation_id"], top["valid_from"], top["valid_to"]) == (1, start, end)


def test_migration_matrix_counts_newcomers_and_gone(spark):
    from pipelines.segments import migration_matrix

    from_df = spark.createDataFrame([("a", "top"), ("b", "top"), ("c", "low"), ("g", "low")],
                                    "customer_id string, segment string")
    to_df = spark.createDataFrame([("a", "top"), ("b", "low"), ("c", "low"), ("n", "new")],
                                  "customer_id string, segment string")
    got = {(r["from_segment"], r["to_segment"]): r["customers"]
           for r in migration_matrix(from_df, to_df, 1, 2).collect()}
    assert got == {("top", "top"): 1, ("top", "low"): 1, ("low", "low"): 1, ("low", "(gone)"): 1,
                   ("(none)", "new"): 1}
