"""The table catalogue (core/tables.py) is the one place that says which verb writes each table: the
nightly step outputs, the report's "run this first" hints and the docs read it from there."""
from __future__ import annotations

from core.tables import TABLES, producing_command, tables_produced_by
from jobs.cli import VERBS
from pipelines.nightly import STEPS, step_tables


def test_every_table_names_the_verb_that_writes_it():
    assert {spec.produced_by for spec in TABLES.values()} <= set(VERBS)
    assert sum(len(tables_produced_by(verb)) for verb in VERBS) == len(TABLES)   # exactly one writer each


def test_nightly_steps_record_the_tables_their_verb_writes():
    assert set(STEPS) <= set(VERBS)
    assert step_tables("segments") == ["segments_current", "segments_history", "segment_generations",
                                       "generation_review", "segment_migration"]
    assert set(step_tables("trends")) == {n for n in TABLES if n.startswith("trend_")} | {"ltv_by_channel"}
    assert step_tables("export") == []
    assert "pipeline_runs" not in step_tables("maintain") and len(step_tables("maintain")) == len(TABLES) - 1


def test_producing_commands():
    assert producing_command("customer_scores", "2026-03-31") == "cvseg score --as-of 2026-03-31"
    assert producing_command("identity_map") == "cvseg ingest"
    assert producing_command("calibration_holdout").startswith("cvseg calibrate --cutoff")
