"""S3 requests of a night: how many round trips `cvseg run` makes on an S3 warehouse, per step and kind.

    python bench/s3_requests.py [--customers 400] [--seed 11] [--json OUT]

The same setting as the S3 end-to-end test (tests/integration/test_warehouse_s3.py, without its
faults): a generated export split in two files, moto's S3 server on 127.0.0.1 behind the test's
proxy (which here only counts), and two nights of `cvseg run` in their own process (one JVM with the
s3a jars, like a cluster driver): night 1 a first load of the first file, night 2 a regular night
with the second file. Every request is attributed to the step running when it arrived (the step
lines `cvseg run` prints) and counted by kind: LIST (a GET with `list-type`), HEAD, GET, PUT, DELETE,
and by what it touched: a table's Delta log (`_delta_log/`, the driver's own round trips, one at a
time: snapshot listings, commits, checkpoints), table data files, MLflow's artifacts, the source
export, the export and the run lock.

The counts depend on the code and the data, not on the machine: they are what a night costs in
round trips on a real bucket, where each takes milliseconds (moto answers in a few, measured too).
A benchmark, not a test: it prints figures and checks nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import use_engine_imports  # noqa: E402

use_engine_imports()

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "examples" / "synthetic.yaml"
BUCKET = "cvseg-s3-requests"
STEP_START = re.compile(r"^\[run (\S+)\] \d+/\d+ (\w+)\s+\.\.\.$")
STEP_END = re.compile(r"^\[run (\S+)\] \d+/\d+ (\w+)\s+(done in|skipped|failed)")
KINDS = ("LIST", "HEAD", "GET", "PUT", "DELETE")


def classify(method: str, raw_path: str) -> tuple[str, str]:
    """(kind, target) of a request: kind LIST / HEAD / GET / PUT / DELETE; target delta_log, data,
    mlflow, source, export, lock or other."""
    path, _, query = raw_path.partition("?")
    params = urllib.parse.parse_qs(query)
    kind = "LIST" if method == "GET" and "list-type" in params else method
    where = urllib.parse.unquote(params.get("prefix", [""])[0] if kind == "LIST" else path)
    if "_delta_log" in where:
        target = "delta_log"
    elif "mlflow-artifacts" in where:
        target = "mlflow"
    elif "_cvseg_run_lock" in where:
        target = "lock"
    elif "/source/" in where or where.startswith("source/"):
        target = "source"
    elif "/exports/" in where or where.startswith("exports/"):
        target = "export"
    elif "/warehouse/" in where or where.startswith("warehouse/"):
        target = "data"
    else:
        target = "other"
    return kind, target


class Recorder:
    """The proxy's on_request callback: every request with its arrival time."""

    def __init__(self):
        self.rows: list[tuple[float, str, str, int, float]] = []
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.rows.append((time.time() - seconds, method, path, status, seconds))

    def between(self, start: float, end: float) -> list[tuple[float, str, str, int, float]]:
        with self._lock:
            return [r for r in self.rows if start <= r[0] < end]


def run_night(args: list[str], env: dict, cwd: Path) -> tuple[list[tuple[str, float, float]], float, float, str]:
    """`cvseg run` in its own process; (step, start, end) from its output lines, the run's start and
    end, and its output."""
    started = time.time()
    process = subprocess.Popen([sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main(sys.argv[1:]))",
                                *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    steps, open_steps, output = [], {}, []
    for line in process.stdout:
        now = time.time()
        output.append(line)
        line = line.rstrip("\n")
        if m := STEP_START.match(line):
            open_steps[m.group(2)] = now
        elif (m := STEP_END.match(line)) and m.group(2) in open_steps:
            steps.append((m.group(2), open_steps.pop(m.group(2)), now))
    code = process.wait()
    if code != 0:
        raise SystemExit(f"`cvseg run {' '.join(args[:3])}` failed ({code}):\n" + "".join(output[-40:]))
    return steps, started, time.time(), "".join(output)


def summarise(rows) -> dict:
    kinds, targets, log_kinds = collections.Counter(), collections.Counter(), collections.Counter()
    for _, method, path, _, _ in rows:
        kind, target = classify(method, path)
        kinds[kind] += 1
        targets[target] += 1
        if target == "delta_log":
            log_kinds[kind] += 1
    return {"requests": len(rows), "seconds_in_moto": round(sum(r[4] for r in rows), 2),
            **{k: kinds[k] for k in KINDS}, "delta_log": targets["delta_log"],
            "delta_log_by_kind": {k: log_kinds[k] for k in KINDS}, "by_target": dict(sorted(targets.items()))}


def print_night(label: str, per_step: list[tuple[str, float, dict]], whole: dict, seconds: float) -> None:
    def row(name: str, step_seconds: float, s: dict) -> str:
        return (f"{name:<16} {step_seconds:6.1f} {s['requests']:9,} " + " ".join(f"{s[k]:6,}" for k in KINDS)
                + f" {s['delta_log']:10,}")

    print(f"\n{label}: {seconds:.1f} s, {whole['requests']:,} requests ({whole['seconds_in_moto']:.1f} s inside moto)")
    print(f"{'step':<16} {'s':>6} {'requests':>9} " + " ".join(f"{k:>6}" for k in KINDS) + f" {'Delta log':>10}")
    for name, step_seconds, s in per_step:
        print(row(name, step_seconds, s))
    print(row("whole night", seconds, whole))
    print(f"  by target: {whole['by_target']}; Delta log by kind: {whole['delta_log_by_kind']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from core.config import load_config
    from core.spark import build_spark
    from tests.integration.test_warehouse_s3 import COMMON, D1, D2, split_export   # the test's nights
    from tests.s3_fault_proxy import FaultProxy

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    results = {"customers": args.customers, "seed": args.seed, "nights": []}
    with tempfile.TemporaryDirectory(prefix="cvseg-s3-requests-") as tmp:
        root = Path(tmp)
        config = load_config(None, [f"storage.warehouse={root}/gen-wh"])
        spark = build_spark(config.spark, f"{root}/gen-wh")
        first, second = split_export(spark, root / "export", args.customers, args.seed)
        spark.stop()

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        recorder = Recorder()
        proxy = FaultProxy(f"http://{host}:{port}", on_request=recorder).start()
        try:
            key_id, secret = "AKIABENCHREQUESTS", "bench-requests-secret"
            client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id=key_id,
                                  aws_secret_access_key=secret, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            client.upload_file(str(first), BUCKET, f"source/orders/{first.name}")
            sets = ["spark.master=local[2]", "spark.shuffle_partitions=2", f"storage.warehouse=s3a://{BUCKET}/warehouse",
                    f"source.path=s3a://{BUCKET}/source/orders", f"export.dest=s3://{BUCKET}/exports/",
                    f"storage.s3.endpoint_url={proxy.endpoint}", "storage.s3.path_style_access=true",
                    f"tracking.uri=sqlite:///{root / 'mlflow.db'}", *COMMON]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
            env.update(PYTHONPATH=str(ROOT), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TZ="UTC",
                       AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1")
            for label, day, upload in (("night 1 (first load)", D1, None), ("night 2 (regular)", D2, second)):
                if upload is not None:
                    client.upload_file(str(upload), BUCKET, f"source/orders/{upload.name}")
                run_args = ["run", "--as-of", day.isoformat(), "--conf", str(CONF)] + [
                    item for s in sets for item in ("--set", s)]
                steps, started, finished, _ = run_night(run_args, env, root)
                per_step = [(name, end - start, summarise(recorder.between(start, end))) for name, start, end in steps]
                in_steps = sum(s["requests"] for _, _, s in per_step)
                whole = summarise(recorder.between(started, finished))
                outside = whole["requests"] - in_steps
                print_night(label, per_step, whole, finished - started)
                print(f"  outside the steps (session start, run lock, run log): {outside:,}")
                results["nights"].append({"night": label, "as_of": day.isoformat(), "seconds": round(finished - started, 1),
                                          "whole": whole, "steps": [{"step": n, "seconds": round(s, 1), **f}
                                                                    for n, s, f in per_step]})
        finally:
            proxy.stop()
            moto.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
