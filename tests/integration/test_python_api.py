"""The Python API (`cvseg.Engine`): every stage method on one small generated export, in the order a data
scientist would call them, each returning its typed result; then one night through `engine.night` on the
same warehouse, and `engine.table` reading what the stages wrote."""
from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest

import cvseg
from core.errors import UserError
from core.results import StageResult

pytestmark = pytest.mark.slow

D = dt.date(2026, 9, 30)
CONF = Path(__file__).resolve().parents[2] / "conf" / "examples" / "synthetic.yaml"
CUSTOMERS = 400


@pytest.fixture(scope="module")
def engine(spark, tmp_path_factory):
    from datagen.generate import GeneratorParams, generate

    root = tmp_path_factory.mktemp("python-api")
    summary = generate(spark, n_customers=CUSTOMERS, seed=23, end_date=D, out_dir=str(root / "export"),
                       fmt="parquet", params=GeneratorParams(history_days=400), dirty_share=0.0)
    config = cvseg.load_config(CONF, [
        f"storage.warehouse={root / 'warehouse'}", f"source.path={summary['orders_path']}", "source.format=parquet",
        f"export.dest={root / 'exports'}", f"validation.future_cutoff={D}", "trends.years=2",
        # what is under test is the API's wiring, not the model comparison
        "models.purchase_models=[bgnbd]", "models.purchase_basis=gross", "models.hybrid.enabled=false"])
    return cvseg.Engine(spark, config), root


def _typed(result: StageResult) -> dict:
    assert isinstance(result, StageResult)
    line = result.summary_line()
    assert isinstance(line, str) and line
    out = result.asdict()
    json.dumps(out, default=str)       # what --json prints
    return out


def test_every_stage_method_returns_its_typed_result_and_night_runs_on_top(engine):
    engine, root = engine
    sources = engine.ingest(run_date=D)
    assert sources.total("input_rows") > 0 and sources.total("quarantined_rows") == 0

    features = engine.features(D)
    assert _typed(features)["customers"] == features.customers == CUSTOMERS
    assert engine.table("customer_features", as_of=D).count() == CUSTOMERS

    cutoff = dt.date(2026, 3, 31)
    calibration = engine.calibration(cutoff)
    assert calibration.cutoff_date == cutoff and calibration.horizon_end == D
    assert 0 < calibration.customers < CUSTOMERS      # only the customers acquired by the cutoff
    assert engine.table("calibration_holdout", as_of=cutoff).count() == calibration.customers

    backtest = engine.backtest(D)
    assert backtest.champion in _typed(backtest)["model_versions"] and backtest.champion_version is not None

    score = engine.score(D)                           # the champion the backtest registered
    assert score.customers == CUSTOMERS and score.model_version == backtest.champion_version
    assert score.predicted_net_value_total > 0

    segments = engine.segments(D)
    assert _typed(segments)["customers"] == CUSTOMERS and segments.new_generation
    trends = engine.trends(D)
    assert _typed(trends)["mode"] in ("rebuild", "incremental")
    export = engine.export(D, dest=root / "mine")
    with open(export.file, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    assert _typed(export)["rows"] == len(rows) - 1 == CUSTOMERS
    assert Path(export.file).parent == root / "mine"

    # a night on top of the hand-run stages: the next day, every step through the same objects
    night = engine.night(D + dt.timedelta(days=1))
    assert {"ingest", "features", "score", "segments", "trends", "export"} <= set(night.executed), night.outcomes
    assert engine.table("customer_scores", as_of=D + dt.timedelta(days=1)).count() == CUSTOMERS
    assert {r["as_of_date"] for r in engine.table("customer_scores").select("as_of_date").distinct().collect()} \
        == {D, D + dt.timedelta(days=1)}
    with pytest.raises(ValueError, match="no date column .* Tables with dates: .*customer_scores"):
        engine.table("segments_current", as_of=D)
    with pytest.raises(UserError, match="unknown table 'customer_score'; tables are: orders, "):
        engine.table("customer_score")
