"""The warehouse run lock (core/run_lock.py): one writer at a time, on a local folder and on S3
(moto's server on 127.0.0.1), stale holders taken over, never another holder's lock deleted."""
from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

from core.config import S3Conf
from core.run_lock import LOCK_NAME, RunLock, RunLockHeld, needs_spark


def test_second_holder_is_refused_with_the_first_named_and_release_frees_it(tmp_path):
    first = RunLock(str(tmp_path), "run --as-of 2026-09-30")
    with first:
        with pytest.raises(RunLockHeld, match=r"`cvseg run --as-of 2026-09-30` \(pid %d on " % os.getpid()) as refused:
            RunLock(str(tmp_path), "ingest").acquire()
        assert "without touching any table" in str(refused.value)
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["command"] == "run --as-of 2026-09-30" and holder["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(str(tmp_path), "ingest"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "ingest"


def test_heartbeat_renews_and_release_never_deletes_a_lock_taken_over_by_another(tmp_path):
    lock = RunLock(str(tmp_path), "run", heartbeat_seconds=0.05)
    lock.acquire()
    first_beat = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat_at"]
    deadline = dt.datetime.now() + dt.timedelta(seconds=5)
    while json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat_at"] == first_beat:
        assert dt.datetime.now() < deadline, "the heartbeat was never renewed"
    # someone else holds it now (taken over): releasing must leave their lock in place
    (tmp_path / LOCK_NAME).write_text(json.dumps(_holder("other-run", host="elsewhere", pid=1)))
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "other-run"


def test_a_lock_whose_process_died_is_taken_over(tmp_path, capsys):
    code = f"from core.run_lock import RunLock; RunLock({str(tmp_path)!r}, 'run --as-of 2026-09-30').acquire()"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    dead = json.loads((tmp_path / LOCK_NAME).read_text())     # exited without releasing: a killed driver
    with RunLock(str(tmp_path), "run --as-of 2026-09-30") as lock:
        assert lock.held
    out = capsys.readouterr().out
    assert f"taking over the warehouse lock of `cvseg run --as-of 2026-09-30` (pid {dead['pid']}" in out
    assert "is no longer running" in out


def test_a_lock_on_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    (tmp_path / LOCK_NAME).write_text(json.dumps(_holder("alive", host="driver-7", heartbeat=now)))
    with pytest.raises(RunLockHeld, match="driver-7"):
        RunLock(str(tmp_path), "run", stale_after=dt.timedelta(minutes=30)).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps(_holder("lost", host="driver-7",
                                                         heartbeat=now - dt.timedelta(minutes=31))))
    with RunLock(str(tmp_path), "run", stale_after=dt.timedelta(minutes=30)) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == lock.holder.run_id


def _race(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        RunLock(folder, "run").acquire()      # never released: the winner keeps it until it exits
        results.put("won")
    except RunLockHeld:
        results.put("refused")
    barrier.wait()        # the winner stays alive until every process has tried (a dead holder is stale)


def test_processes_starting_at_the_same_moment_get_one_winner(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=30) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert outcomes == ["refused"] * 5 + ["won"]


def test_scheme_decides_the_store():
    assert not needs_spark("./warehouse") and not needs_spark("/dbfs/cvseg") and not needs_spark("/Volumes/m/c/w")
    assert not needs_spark("s3://b/p") and not needs_spark("s3a://b/p") and not needs_spark("file:///tmp/w")
    assert needs_spark("dbfs:/cvseg/warehouse") and needs_spark("abfss://c@acct.dfs.core.windows.net/w")


def test_on_s3_the_conditional_put_gives_one_winner_and_release_deletes(moto_endpoint, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket="crm-lock")
    warehouse = "s3a://crm-lock/cvseg/warehouse"
    barrier, outcomes, locks = threading.Barrier(4), [], []

    def contend() -> None:
        lock = RunLock(warehouse, "run", s3_conf=S3Conf(endpoint_url=moto_endpoint, path_style_access=True),
                       heartbeat_seconds=0.05)
        barrier.wait()
        try:
            lock.acquire()
            locks.append(lock)
            outcomes.append("won")
        except RunLockHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["refused"] * 3 + ["won"]
    body = json.loads(client.get_object(Bucket="crm-lock", Key=f"cvseg/warehouse/{LOCK_NAME}")["Body"].read())
    assert body["run_id"] == locks[0].holder.run_id
    locks[0].release()
    assert client.list_objects_v2(Bucket="crm-lock").get("KeyCount") == 0


def _holder(run_id: str, host: str, pid: int = 4242, heartbeat: dt.datetime | None = None) -> dict:
    beat = (heartbeat or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    return {"command": "run --as-of 2026-09-30", "run_id": run_id, "host": host, "pid": pid,
            "started_at": beat, "heartbeat_at": beat}
