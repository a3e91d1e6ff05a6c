"""`cvseg run`: the whole nightly pipeline on a small generated export.

* a clean run, then the same date again: nothing runs, no table gets a new version, the export is untouched;
* a run killed after a middle step (injected failure) and re-run: every table and the export equal the
  clean run's;
* a failing step exits non-zero with a one-line reason and is recorded as failed;
* the driver SIGKILLed in the middle of the Delta commits of `orders` and of `customer_scores`, with a
  second `cvseg run` started at the same moment as the first: the second stops at once naming the
  first, each re-run takes over the dead run's lock, and the last one ends equal to the clean run.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import dump_config, load_config
from core.storage import Storage
from tests.conftest import BACKENDS, SPARK_EXTRA_SET
from core.tables import PIPELINE_RUNS, TABLES
from pipelines.nightly import STEPS, ChampionInfo, is_up_to_date, refit_reason, run_nightly, table_versions

pytestmark = pytest.mark.slow   # minutes: started first (tests/conftest.py)

D = dt.date(2026, 9, 30)
CONF = Path(__file__).resolve().parents[2] / "conf" / "examples" / "synthetic.yaml"
CSV = "customer_segments_2026-09-30.csv"
MANIFEST = "customer_segments_2026-09-30.manifest.json"


# --------------------------------------------------------------------------------------------
# Decisions (no Spark)
# --------------------------------------------------------------------------------------------
def test_refit_reason_cadence_and_age():
    now = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)
    fresh = ChampionInfo("3", dt.date(2026, 9, 28), now - dt.timedelta(days=2))
    assert refit_reason(None, D, 7, None, now) == "no champion registered"
    assert refit_reason(fresh, D, 7, None, now) is None
    assert refit_reason(fresh, dt.date(2026, 10, 5), 7, None, now).startswith("cadence: champion v3")
    assert refit_reason(fresh, dt.date(2026, 10, 4), 7, None, now) is None     # 6 days: not yet
    old = ChampionInfo("3", dt.date(2026, 9, 28), now - dt.timedelta(days=40))
    assert "registered 40 days ago" in refit_reason(old, D, 7, 30, now)
    assert refit_reason(old, D, 7, None, now) is None
    assert "no as-of" in refit_reason(ChampionInfo("1", None, now), D, 7, None, now)


def test_step_is_stale_when_an_earlier_step_ran_after_it():
    t = [dt.datetime(2026, 10, 1, 3, m) for m in range(len(STEPS))]
    done = dict(zip(STEPS, t))
    assert all(is_up_to_date(s, done) for s in STEPS)
    rerun_features = {**done, "features": dt.datetime(2026, 10, 1, 4, 0)}
    assert is_up_to_date("ingest", rerun_features)
    assert [s for s in STEPS if not is_up_to_date(s, rerun_features)] == ["score", "segments", "trends", "export",
                                                                         "maintain"]
    assert not is_up_to_date("segments", {"ingest": t[0]})


# --------------------------------------------------------------------------------------------
# Whole pipeline
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_path(spark, tmp_path_factory):
    from datagen.generate import GeneratorParams, generate

    out = tmp_path_factory.mktemp("nightly-export")
    # 16 months of history: what is under test (resuming, atomic commits, the lock) does not depend on
    # the length of history, and every order month is a partition written by each run
    summary = generate(spark, n_customers=2500, seed=11, end_date=D, out_dir=str(out), fmt="parquet",
                       params=GeneratorParams(history_days=480))
    return summary["orders_path"]


def _setup(spark, root: Path, export_path: str, backend: str):
    config = load_config(CONF, [f"storage.warehouse={root / 'warehouse'}", f"source.path={export_path}",
                                "source.format=parquet", f"export.dest={root / 'exports'}", "spark.master=null",
                                "models.purchase_models=[bgnbd]", f"storage.backend={backend}",
                                # the resumability under test does not depend on the models compared:
                                # one basis, no hybrid (test_purchase_basis / test_hybrid cover those)
                                "models.purchase_basis=gross", "models.hybrid.enabled=false",
                                f"validation.future_cutoff={D}",   # the export was made on D
                                "trends.years=2"])
    return config, Storage(spark, config.storage.warehouse, backend=config.storage.backend)


def _comparable(df):
    """Drop what legitimately differs between two runs (run ids, wall-clock times); maps as sorted
    entries so the content can be hashed."""
    cols = []
    for field in df.schema.fields:
        if "run_id" in field.name or isinstance(field.dataType, T.TimestampType):
            continue
        if isinstance(field.dataType, T.MapType):
            cols.append(F.array_sort(F.map_entries(F.col(field.name))).alias(field.name))
        else:
            cols.append(F.col(field.name))
    return df.select(*cols)


def fingerprints(storage) -> dict[str, tuple[int, int]]:
    """Per table: (rows, order-independent content hash); one Spark job for all tables."""
    from functools import reduce

    parts = []
    for name in sorted(TABLES):
        if name in (PIPELINE_RUNS.name, "maintenance_runs") or not storage.exists(name):   # run logs: timings
            continue
        df = _comparable(storage.read(name))
        parts.append(df.agg(F.lit(name).alias("table"), F.count(F.lit(1)).alias("n"),
                            F.sum(F.pmod(F.xxhash64(*df.columns), F.lit(2147483647))).alias("h")))
    rows = reduce(lambda a, b: a.unionByName(b), parts).collect()   # one row per table
    return {r["table"]: (int(r["n"]), int(r["h"] or 0)) for r in rows}


def _manifest(root: Path) -> dict:
    manifest = json.loads((root / "exports" / MANIFEST).read_text())
    manifest.pop("exported_at")
    return manifest


@pytest.fixture(scope="module", params=BACKENDS)
def clean_run(request, spark, export_path, tmp_path_factory):
    """The whole nightly run on each storage backend (the other tests compare with it)."""
    root = tmp_path_factory.mktemp("clean")
    config, storage = _setup(spark, root, export_path, request.param)
    result = run_nightly(spark, storage, config, D)
    return root, config, storage, result


def test_clean_run_then_same_date_again_changes_nothing(spark, clean_run):
    root, config, storage, result = clean_run
    # a first night has nothing to maintain: the first maintenance comes maintenance.every_days later
    assert result.executed == [s for s in STEPS if s != "maintain"]
    assert "the first maintenance comes 7 day(s) after the first night" in result.outcome("maintain").message
    score = result.outcome("score")
    assert score.details["refit"] and score.details["refit_reason"] == "no champion registered"
    assert set(result.outcome("features").output_versions) == {"customer_features", "features_runs"}
    assert "customer_scores" in score.output_versions and "segments_current" in result.outcome("segments").output_versions
    assert "ltv_by_channel" in result.outcome("trends").output_versions      # a snapshot of the scores at D
    manifest = json.loads((root / "exports" / MANIFEST).read_text())
    csv_bytes = (root / "exports" / CSV).read_bytes()
    assert manifest["rows"] == storage.read("customer_scores").where(F.col("as_of_date") == F.lit(D)).count()
    assert manifest["rows"] == csv_bytes.count(b"\n") - 1 and manifest["customers_without_segment"] == 0
    assert sorted(p.name for p in (root / "exports").iterdir()) == [CSV, MANIFEST]

    versions = {**table_versions(storage), PIPELINE_RUNS.name: storage.version(PIPELINE_RUNS.name)}
    mtime = (root / "exports" / CSV).stat().st_mtime_ns
    lines = []
    again = run_nightly(spark, storage, config, D, progress=lines.append)
    assert [o.status for o in again.outcomes] == ["skipped"] * len(STEPS)
    # nothing ran, so nothing was read to size the night's expressions (the resume test sees the line)
    assert not any("expressions interpreted" in line for line in lines)
    assert {**table_versions(storage), PIPELINE_RUNS.name: storage.version(PIPELINE_RUNS.name)} == versions
    assert (root / "exports" / CSV).read_bytes() == csv_bytes
    assert (root / "exports" / CSV).stat().st_mtime_ns == mtime
    ok_rows = storage.read(PIPELINE_RUNS.name).where(F.col("status") == "ok").count()
    assert ok_rows == len(STEPS) - 1


def test_run_killed_after_score_resumes_to_the_clean_result(spark, clean_run, export_path, tmp_path, monkeypatch,
                                                            capsys):
    from jobs.cli import main

    clean_root, _, clean_storage, _ = clean_run
    if clean_storage.backend == "delta-spark":
        pytest.skip("on delta-spark the driver is killed in the middle of commits instead (test below)")
    config, storage = _setup(spark, tmp_path, export_path, clean_storage.backend)
    conf_file = dump_config(config, tmp_path / "conf.yaml")
    argv = ["run", "--as-of", D.isoformat(), "--conf", str(conf_file)]

    monkeypatch.setenv("CVSEG_FAIL_AFTER_STEP", "score")
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "injected failure after step score" in err_lines[0]
    done = {r["step"] for r in storage.read(PIPELINE_RUNS.name).where(F.col("status") == "ok").collect()}
    assert done == {"ingest", "features", "score"}
    assert not storage.exists("segments_current")
    assert not (tmp_path / "exports" / CSV).exists()

    monkeypatch.delenv("CVSEG_FAIL_AFTER_STEP")
    assert main(argv) == 0
    out = capsys.readouterr().out
    for step in ("ingest", "features", "score"):
        assert f"{step:<8} skipped" in out
    for step in ("segments", "trends", "export"):
        assert f"{step:<8} done in" in out
    # a warehouse this small runs its later nights without generated code, and says so before the first step
    customers = storage.read("features_runs").first()["customers"]
    said = f"expressions interpreted: {customers:,} customers < spark.interpreted_below_customers"
    assert out.index(said) < out.index(f"{'segments':<8} ...")

    clean_prints = fingerprints(clean_storage)
    assert {"orders", "customer_features", "customer_scores", "segments_current", "segments_history",
            "segment_generations"} <= set(clean_prints)
    assert sum(name.startswith("trend_") for name in clean_prints) >= 4
    assert fingerprints(storage) == clean_prints
    assert (tmp_path / "exports" / CSV).read_bytes() == (clean_root / "exports" / CSV).read_bytes()
    assert _manifest(tmp_path) == _manifest(clean_root)


def test_failing_step_exits_non_zero_with_one_line_and_is_recorded(spark, clean_run, capsys):
    from jobs.cli import main

    root, config, storage, _ = clean_run
    conf_file = dump_config(config, root / "conf.yaml")
    before = (root / "exports" / CSV).read_bytes()
    with pytest.raises(SystemExit) as exited:
        main(["run", "--as-of", D.isoformat(), "--conf", str(conf_file), "--steps", "export", "--force",
              "--dest", "gs://elsewhere/x"])
    assert exited.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: step export failed for 2026-09-30") and "s3://" in err[0]
    failed = storage.read(PIPELINE_RUNS.name).where(F.col("status") == "failed").collect()
    assert [r["step"] for r in failed] == ["export"] and "gs://elsewhere" in failed[0]["message"]
    assert (root / "exports" / CSV).read_bytes() == before
    with pytest.raises(ValueError, match="unknown step"):
        run_nightly(spark, storage, config, D, steps=["exports"])


# --------------------------------------------------------------------------------------------
# The driver killed during Delta commits; two runs started at the same moment
# --------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def _start_run(conf_file: Path, cwd: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """`cvseg run` as its own process group (the Python driver and its JVM), output to files."""
    log = cwd / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("CVSEG_FAIL_AFTER_STEP", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", "--as-of", D.isoformat(), "--conf",
                                 str(conf_file), "--set", SPARK_EXTRA_SET], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _data_files(table_dir: Path) -> set[str]:
    if not table_dir.exists():
        return set()
    return {str(p.relative_to(table_dir)) for p in table_dir.rglob("*.parquet") if "_delta_log" not in p.parts}


def _committed_files(spark, table_dir: Path) -> set[str]:
    """The data files the table's latest Delta version references (relative paths)."""
    from urllib.parse import unquote, urlparse

    if not any((table_dir / "_delta_log").glob("*.json")):
        return set()
    files = spark.read.format("delta").load(str(table_dir)).inputFiles()
    return {str(Path(unquote(urlparse(f).path)).relative_to(table_dir.resolve())) for f in files}


def _kill_when_data_files_appear(proc: subprocess.Popen, table_dir: Path, timeout: float = 900) -> set[str]:
    """SIGKILL the run's process group as soon as a new data file of the table is on disk: the write's
    tasks are running and its Delta commit has not happened yet."""
    before = _data_files(table_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _data_files(table_dir) - before
        if new:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return new
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before writing {table_dir.name}"
        time.sleep(0.003)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no data file of {table_dir.name} appeared within {timeout} s")


@pytest.fixture()
def run_processes():
    """Started `cvseg run` processes, killed (with their JVMs) if the test stops early."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_driver_killed_during_delta_commits_and_a_concurrent_run(spark, clean_run, export_path, tmp_path,
                                                                 run_processes):
    clean_root, _, clean_storage, _ = clean_run
    if clean_storage.backend != "delta-spark":
        pytest.skip("the driver's JVM commits Delta tables on delta-spark only")
    config, storage = _setup(spark, tmp_path, export_path, "delta-spark")
    conf_file = dump_config(config, tmp_path / "conf.yaml")
    warehouse = Path(config.storage.warehouse)

    # Two schedulers fire at the same moment: one run proceeds, the other stops at once naming it.
    first, first_log = _start_run(conf_file, tmp_path, "first")
    second, second_log = _start_run(conf_file, tmp_path, "second")
    run_processes += [first, second]
    exits = {}
    while len(exits) < 1:
        exits.update({name: p.poll() for name, p in (("first", first), ("second", second)) if p.poll() is not None})
        time.sleep(0.05)
    (loser_name, loser_code), = exits.items()
    winner, loser_log = (second, first_log) if loser_name == "first" else (first, second_log)
    loser_out = loser_log.read_text()
    assert loser_code == 3, loser_out
    assert (f"error: another cvseg command is writing this warehouse: `cvseg run --as-of {D}` (pid {winner.pid} "
            in loser_out), loser_out
    assert "[run " not in loser_out            # it ran no step

    # The winner's driver is killed while the tasks of the orders write run: no commit names them.
    written = _kill_when_data_files_appear(winner, warehouse / "orders")
    assert written and not written & _committed_files(spark, warehouse / "orders")

    # A re-run takes over the dead run's lock, ingests again and is killed inside customer_scores' commit.
    third, third_log = _start_run(conf_file, tmp_path, "third")
    run_processes.append(third)
    written = _kill_when_data_files_appear(third, warehouse / "customer_scores")
    assert written and not written & _committed_files(spark, warehouse / "customer_scores")
    third_out = third_log.read_text()
    assert f"taking over the warehouse lock of `cvseg run --as-of {D}` (pid {winner.pid}" in third_out, third_out
    done = {r["step"] for r in storage.read(PIPELINE_RUNS.name).where(F.col("status") == "ok").collect()}
    assert done == {"ingest", "features"}

    # The last run resumes after features and ends with every table equal to the clean run's.
    last, last_log = _start_run(conf_file, tmp_path, "last")
    run_processes.append(last)
    assert last.wait(timeout=600) == 0, last_log.read_text()
    out = last_log.read_text()
    assert f"{'ingest':<8} skipped" in out and f"{'score':<8} done in" in out
    assert fingerprints(storage) == fingerprints(clean_storage)
    assert storage.read("orders").count() == storage.read("orders").select("order_id").distinct().count()
    assert (tmp_path / "exports" / CSV).read_bytes() == (clean_root / "exports" / CSV).read_bytes()
    assert _manifest(tmp_path) == _manifest(clean_root)
    assert not (warehouse / "_cvseg_run_lock.json").exists()
