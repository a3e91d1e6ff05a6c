"""The nightly run on a Spark standalone cluster (a master and two workers, each its own JVM, from
``infra/local-cluster``) against the same night in local mode:

* the night (a first load, every step) on the cluster with an executor JVM SIGKILLed while
  ingest's tasks run and again while features' run: the run finishes (Spark relaunches the
  executor and retries the tasks) or stops with a clear message and the re-run finishes; either
  way every warehouse table equals local mode's (rows and a content checksum per table), with the
  same Delta versions (no half-written or doubled commit) and no duplicate order;
* the Python workers on the executors run the project's interpreter and this checkout's code;
* the cluster's JVMs listen on 127.0.0.1 only; ``infra/local-cluster stop`` ends them.

One cluster for the module (2 workers x 1 core x 1g), one cluster driver process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.integration.cluster_night import D, run_night

pytestmark = [pytest.mark.cloud, pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "local-cluster"
KILLED_STEPS = ("ingest", "features")


def _env() -> dict[str, str]:
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, "TZ": "UTC",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local-cluster")
    started = subprocess.run([sys.executable, str(SCRIPT), "start", "--dir", str(folder), "--workers", "2",
                              "--cores", "1", "--memory", "1g"], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert started.returncode == 0, started.stderr + started.stdout
    state = json.loads(started.stdout.splitlines()[-1])
    yield state
    subprocess.run([sys.executable, str(SCRIPT), "stop", "--dir", str(folder)], env=_env(), timeout=120)


@pytest.fixture(scope="module")
def export_orders(spark, tmp_path_factory):
    from datagen.generate import GeneratorParams, generate

    out = tmp_path_factory.mktemp("cluster-export")
    # 16 months of history: fewer order-month partitions and trend weeks, as many tasks per stage
    summary = generate(spark, n_customers=600, seed=5, end_date=D, out_dir=str(out / "export"), fmt="parquet",
                       params=GeneratorParams(history_days=480))
    return summary["orders_path"]


@pytest.fixture(scope="module")
def local_night(spark, export_orders, tmp_path_factory):
    """The reference: the night in the suite's local[2] session."""
    return run_night(spark, tmp_path_factory.mktemp("local-night"), export_orders,
                     source=Path(export_orders).parent / "source")


@pytest.fixture(scope="module")
def cluster_run(cluster, export_orders, local_night, tmp_path_factory):
    """The night on the cluster, in its own driver process, executors killed during ingest and features."""
    root = tmp_path_factory.mktemp("cluster-night")
    run = subprocess.run([sys.executable, "-m", "tests.integration.cluster_night", "--master", cluster["master_url"],
                          "--root", str(root), "--orders", export_orders,
                          "--source", str(Path(export_orders).parent / "source"),
                          "--kill-during", ",".join(KILLED_STEPS)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads((root / "result.json").read_text())


def test_cluster_jvms_listen_on_loopback_only(cluster):
    for name, pid in cluster["pids"].items():
        listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert listening, f"{name} listens nowhere"
        assert {addr.ip for addr in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, (name, listening)


def test_night_on_the_cluster_with_executors_killed_equals_local_mode(local_night, cluster_run):
    kills = {k["step"]: k for k in cluster_run["kills"]}
    assert set(kills) == set(KILLED_STEPS)
    for step, kill in kills.items():
        # the kill landed inside the step, on an executor running its tasks
        assert "killed_pid" in kill, f"no executor was killed during {step}: {kill}"
        assert kill["step_started"] <= kill["killed_at"] <= kill["step_finished"]
        assert kill["running_tasks_on_killed"] >= 1 and kill["executors_before"] == 2
        assert not psutil.pid_exists(kill["killed_pid"])
        # Spark saw tasks fail with the executor (and retried them)
        failures = cluster_run["failed_tasks_by_step"].get(f"{D.isoformat()}: {step}", {})
        assert failures.get("ExecutorLostFailure", 0) >= 1, (step, cluster_run["failed_tasks_by_step"])
    local, remote = local_night, cluster_run["night"]
    assert {"orders", "orders_quarantine", "customer_features", "customer_scores", "segments_current"} <= set(
        local["fingerprints"])
    assert sum(name.startswith("trend_") for name in local["fingerprints"]) >= 4
    assert remote["fingerprints"] == {k: list(v) for k, v in local["fingerprints"].items()}
    assert remote["versions"] == local["versions"]   # one commit per write: nothing half-written or doubled
    assert remote["duplicate_order_ids"] == 0 and local["duplicate_order_ids"] == 0
    if remote["stopped"]:                            # a clear stop is allowed when the re-run finishes
        assert "re-run `cvseg run --as-of" in remote["stopped"]


def test_executor_python_workers_run_the_projects_interpreter_and_code(cluster_run):
    probe = cluster_run["probe"]
    assert len(probe) == 4
    assert {row["python"] for row in probe} == {sys.executable}
    assert all(row["jvm_is_executor"] for row in probe)
    assert len({row["jvm_pid"] for row in probe}) == 2          # both executors ran Python
    # this checkout's code, shipped by the driver (not whatever engine the environment has installed)
    assert all("cvseg_engine.zip" in row["engine_file"] for row in probe)


def test_stop_ends_every_cluster_jvm(cluster, cluster_run):
    stopped = subprocess.run([sys.executable, str(SCRIPT), "stop", "--dir", cluster["dir"]], env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in cluster["pids"].values())
    status = subprocess.run([sys.executable, str(SCRIPT), "status", "--dir", cluster["dir"]], env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1
