"""The issue's stability test: segments hold inside a generation, newcomers are placed with the
frozen cut points, re-runs change nothing, and the next generation closes the loop."""
from __future__ import annotations

import datetime as dt
import json

from core.config import SegmentsConf
from tests.unit.test_segments import current_segments, write_features, write_orders, write_scores

D1 = dt.date(2026, 3, 31)
D2 = dt.date(2026, 4, 1)
D3 = dt.date(2026, 9, 30)          # six months after D1: the generation boundary
LONG_AGO = dt.date(2025, 1, 1)
TABLES = ("segments_current", "segments_history", "segment_generations")


def versions(storage) -> dict[str, int]:
    return {name: storage.version(name) for name in TABLES}


def test_segments_stable_within_a_generation_and_loop_closed_at_the_next(storage):
    from pipelines.segments import run_segments

    conf = SegmentsConf(quantile_relative_error=0.0)   # top 0.9 / high 0.7 / middle 0.4 / low
    established = [f"c{i:02d}" for i in range(30)]
    value = {c: 100.0 * (i + 1) for i, c in enumerate(established)}          # 100 ... 3000
    newcomers_d1 = ["a1", "a2", "a3"]
    dormant = ["z1", "z2"]

    # night 1: the first generation is cut
    write_features(storage, D1, [(c, LONG_AGO, 3) for c in established + dormant]
                   + [(c, D1 - dt.timedelta(days=5), 1) for c in newcomers_d1])
    write_scores(storage, D1, [(c, 0.9, value[c]) for c in established] + [(c, 0.1, 9000.0) for c in dormant]
                 + [(c, 1.0, 50.0) for c in newcomers_d1])
    first = run_segments(storage, D1, conf)
    assert first.new_generation and first.generation_id == 1
    # exact 0.9 / 0.7 / 0.4 quantiles of the 30 banded values: new and dormant customers are not in
    # the base (with them the 0.9-quantile of the 35 values would be 2900)
    assert first.cut_points == {"top": 2700.0, "high": 2100.0, "middle": 1200.0, "low": None}
    definition = json.loads(storage.read("segment_generations").first()["definition"])
    assert [b["cut_point"] for b in definition["bands"]] == [2700.0, 2100.0, 1200.0, None]
    assert definition["precedence"] == ["new", "dormant", "value bands"]
    gen1 = current_segments(storage)
    assert {c for c, s in gen1.items() if s == "top"} == {"c27", "c28", "c29"}
    assert {gen1[c] for c in newcomers_d1} == {"new"} and {gen1[c] for c in dormant} == {"dormant"}

    # night 2: values move (reversed) for everyone; four newcomers appear
    night2 = {"n_top": (LONG_AGO, 2, 0.9, 5000.0, "top"),       # above the frozen top cut point
              "n_new": (D2, 1, 1.0, 10.0, "new"),
              "n_dormant": (LONG_AGO, 2, 0.05, 5000.0, "dormant"),
              "n_low": (LONG_AGO, 2, 0.9, 150.0, "low")}
    write_features(storage, D2, [(c, LONG_AGO, 3) for c in established + dormant]
                   + [(c, D1 - dt.timedelta(days=5), 1) for c in newcomers_d1]
                   + [(c, first_day, n) for c, (first_day, n, *_) in night2.items()])
    write_scores(storage, D2, [(c, 0.9, 3100.0 - value[c]) for c in established]
                 + [(c, 0.9, 100.0) for c in dormant + newcomers_d1]
                 + [(c, p, v) for c, (_, _, p, v, _) in night2.items()])
    second = run_segments(storage, D2, conf)
    assert not second.new_generation and second.generation_id == 1
    assert second.customers_placed == 4
    gen1_after = current_segments(storage)
    assert {c: gen1_after[c] for c in gen1} == gen1                       # existing customers keep theirs
    assert {c: gen1_after[c] for c in night2} == {c: spec[-1] for c, spec in night2.items()}
    assert second.segment_counts == {"top": 4, "high": 6, "middle": 9, "low": 13, "new": 4, "dormant": 3}

    # the same night again: nothing changes, no table gets a new version
    before = versions(storage)
    again = run_segments(storage, D2, conf)
    assert again.customers_placed == 0 and versions(storage) == before
    assert current_segments(storage) == gen1_after

    # a night that died between its two appends left a newcomer in history only; the next night
    # (a later date) takes that row as recorded instead of placing the customer twice
    crashed, night4 = D2 + dt.timedelta(days=1), D2 + dt.timedelta(days=2)
    orphan = [("x_orphan", "high", 1, crashed, None, 2500.0, 0.8, crashed, "placement")]
    storage.append("segments_history", storage.spark.createDataFrame(orphan, storage.read("segments_history").schema))
    write_features(storage, night4, [(c, LONG_AGO, 3) for c in gen1_after] + [("x_orphan", LONG_AGO, 2)])
    write_scores(storage, night4, [(c, 0.9, 100.0) for c in gen1_after] + [("x_orphan", 0.9, 1.0)])
    fourth = run_segments(storage, night4, conf)
    assert fourth.customers_placed == 1 and fourth.placed_by_segment == {"high": 1}
    row = storage.read("segments_current").where("customer_id = 'x_orphan'").first()
    assert (row["segment"], row["assigned_as_of"], row["value_at_assignment"]) == ("high", crashed, 2500.0)
    assert storage.read("segments_history").where("customer_id = 'x_orphan'").count() == 1
    gen1_after = current_segments(storage)

    # orders of the first generation, for the review (after each customer's assignment day only)
    write_orders(storage, [("o1", "c29", dt.date(2026, 5, 1), 1000.0), ("o2", "c28", D1, 777.0),
                           ("o3", "n_top", dt.date(2026, 6, 1), 500.0), ("o4", "c00", dt.date(2026, 7, 1), 30.0)])

    # the boundary: a new generation is cut; c00 is gone from the scores, two customers are new
    everyone = list(gen1_after)
    stayed = [c for c in everyone if c != "c00"]
    write_features(storage, D3, [(c, LONG_AGO, 3) for c in stayed] + [("m1", D3, 1), ("m2", D3, 1)])
    write_scores(storage, D3, [(c, 0.9, 10.0 * i) for i, c in enumerate(sorted(stayed))]
                 + [("m1", 1.0, 20.0), ("m2", 1.0, 20.0)])
    third = run_segments(storage, D3, conf)
    assert third.new_generation and third.generation_id == 2 and third.previous_generation == 1
    assert third.customers == len(stayed) + 2

    migration = storage.read("segment_migration").where("to_generation = 2").collect()
    assert sum(r["customers"] for r in migration) == len(everyone) + 2 == third.migrated_customers
    cells = {(r["from_segment"], r["to_segment"]): r["customers"] for r in migration}
    assert cells[("(none)", "new")] == 2 and cells[(gen1_after["c00"], "(gone)")] == 1
    by_from: dict[str, int] = {}
    for (from_segment, _), n in cells.items():
        by_from[from_segment] = by_from.get(from_segment, 0) + n
    assert {k: v for k, v in by_from.items() if k != "(none)"} == fourth.segment_counts

    history = storage.read("segments_history").collect()
    assert {(r["generation_id"], r["valid_to"]) for r in history} == {(1, D3), (2, None)}
    assert sum(r["generation_id"] == 1 for r in history) == len(everyone)
    assert {r["generation_id"] for r in storage.read("segments_current").collect()} == {2}
    generations = {r["generation_id"]: r for r in storage.read("segment_generations").collect()}
    assert (generations[1]["valid_to"], generations[2]["valid_from"], generations[2]["valid_to"]) == (D3, D3, None)

    review = {r["segment"]: r for r in storage.read("generation_review").collect()}
    assert sum(r["customers"] for r in review.values()) == len(everyone)
    top = review["top"]
    assert (top["customers"], top["buyers"], top["actual_net_value"]) == (4, 2, 1500.0)   # o2 is on D1: excluded
    assert top["predicted_net_value"] == 2800.0 + 2900.0 + 3000.0 + 5000.0
    assert review["low"]["actual_net_value"] == 30.0

    # re-running the boundary date (even asking for a new generation) cuts nothing twice
    before = versions(storage)
    rerun = run_segments(storage, D3, conf, new_generation=True)
    assert rerun.generation_id == 2 and not rerun.new_generation and "already cut" in rerun.note
    assert versions(storage) == before
