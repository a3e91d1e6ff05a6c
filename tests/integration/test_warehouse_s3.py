"""The warehouse on S3: `cvseg run` with the source, every table, MLflow's artifacts and the export
on a moto server (127.0.0.1), reached through a fault-injecting proxy (tests/s3_fault_proxy.py).

One subprocess (one JVM with the s3a jars, ~20 s of its start) runs, through `cvseg`'s own entry
point, in order:

1. night 1 with 2% of S3 requests answered 503 SlowDown / 500 InternalError: s3a, boto3 and
   MLflow retry with backoff and the night finishes;
2. a second export file arrives; night 2's ingest and features (same 2%);
3. S3 down (100% errors): night 2 stops with a message naming the S3 error;
4. S3 back: night 2 again resumes (ingest and features are not run again), scores with the
   champion registered on night 1 (loaded from S3) and finishes;
5. `cvseg maintain --tables orders,customer_scores` (same 2%) with VACUUM retention 0: compacts,
   vacuums the replaced files from the bucket and checkpoints the two tables that grow every night
   (the comparison below reads the tables after it; every other table is maintained by the same
   code, tested locally in tests/unit/test_maintenance.py).

The same two nights run in this process on a local warehouse (the shared session) while the
subprocess runs; every table and both exports must be equal. The secret key the subprocess gets must appear in none of its
output, the MLflow store, the artifacts or the run log.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from functools import reduce
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from core.config import load_config
from core.storage import Storage
from core.tables import PIPELINE_RUNS, TABLES
from pipelines.nightly import run_nightly
from tests.conftest import SPARK_EXTRA_SET
from tests.integration.test_nightly_run import _comparable
from tests.s3_fault_proxy import FaultProxy

pytestmark = [pytest.mark.cloud, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "examples" / "synthetic.yaml"
D1, D2 = dt.date(2026, 9, 30), dt.date(2026, 10, 1)
BUCKET = "cvseg-s3-test"
KEY_ID = "AKIACVSEGTEST"
SECRET = "cvseg-secret-" + uuid.uuid4().hex        # must never be printed, logged or stored
# one purchase model on one basis, no hybrid: what is under test is the storage, not the model comparison
COMMON = ["models.purchase_models=[bgnbd]", "models.purchase_basis=gross", "models.hybrid.enabled=false",
          f"validation.future_cutoff={D1}", "storage.backend=delta-spark", "trends.years=2"]
# small retry limits so that "S3 down" ends in seconds; 2% errors still pass (3 SDK attempts, then s3a's)
RETRIES = ["storage.s3.max_attempts=3", "storage.s3.retry_limit=3", "storage.s3.throttle_retry_limit=3",
           "storage.s3.retry_interval_ms=100"]

DRIVER = r"""
import json, sys, urllib.request
import boto3
from jobs.cli import main

proxy, second_file, bucket, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

def rate(share):
    urllib.request.urlopen(urllib.request.Request(f"{proxy}/__fault__/rate/{share}", method="PUT")).close()

def run(label, *extra, command="run"):
    print(f"@@ {label}", flush=True)
    try:
        code = main([command, *extra, *args])
    except SystemExit as exc:
        code = exc.code
    print(f"@@ {label} exit {code}", flush=True)

rate(0.02)
run("night1", "--as-of", "2026-09-30")
boto3.client("s3", endpoint_url=proxy).upload_file(second_file, bucket, "source/orders/" + second_file.rsplit("/", 1)[1])
run("night2-ingest-features", "--as-of", "2026-10-01", "--steps", "ingest,features")
rate(1.0)
run("night2-s3-down", "--as-of", "2026-10-01")
rate(0.0)
run("night2-resumed", "--as-of", "2026-10-01")
rate(0.02)
run("maintain", "--as-of", "2026-10-01", "--tables", "orders,customer_scores", "--set", "storage.retention_hours=0",
    command="maintain")
"""


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                        region_name="us-east-1")


@pytest.fixture(scope="module")
def export_files(spark, tmp_path_factory):
    return split_export(spark, tmp_path_factory.mktemp("s3-export"))


def split_export(spark, out: Path, customers: int = 400, seed: int = 11) -> tuple[Path, Path]:
    """A generated export split in two files (rows in order): night 1 sees the first, night 2 both
    (bench/s3_requests.py counts the requests of the same nights)."""
    from datagen.generate import GeneratorParams, generate

    # one year of history: every order month is a partition and every object an S3 round trip
    generate(spark, n_customers=customers, seed=seed, end_date=D1, out_dir=str(out / "generated"), fmt="csv",
             params=GeneratorParams(history_days=400), num_partitions=1)
    lines = [line for part in sorted((out / "generated" / "orders").glob("part-*.csv"))
             for line in part.read_text(encoding="utf-8").splitlines(keepends=True)]
    header, rows = lines[0], [line for line in lines[1:] if line != lines[0]]
    cut = 2 * len(rows) // 3
    first, second = out / "orders-1.csv", out / "orders-2.csv"
    first.write_text(header + "".join(rows[:cut]), encoding="utf-8")
    second.write_text(header + "".join(rows[cut:]), encoding="utf-8")
    return first, second


def _local_nights(spark, root: Path, export_files) -> tuple[Storage, Path]:
    first, second = export_files
    source = root / "source" / "orders"      # the same folder name as on S3: source paths compare by name
    source.mkdir(parents=True)
    shutil.copy(first, source / first.name)
    config = load_config(CONF, [f"storage.warehouse={root / 'warehouse'}", f"source.path={source}",
                                f"export.dest={root / 'exports'}", "spark.master=null", *COMMON])
    storage = Storage(spark, config.storage.warehouse, backend=config.storage.backend)
    run_nightly(spark, storage, config, D1)
    shutil.copy(second, source / second.name)
    run_nightly(spark, storage, config, D2)
    return storage, root / "exports"


@pytest.fixture(scope="module")
def s3_nights(spark, moto_endpoint, export_files, tmp_path_factory):
    """The subprocess (see the module's docstring), and meanwhile the same two nights on a local
    warehouse in this process; then the bucket copied to a local folder."""
    client = _client(moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    first, second = export_files
    client.upload_file(str(first), BUCKET, f"source/orders/{first.name}")
    proxy = FaultProxy(moto_endpoint, seed=14).start()
    root = tmp_path_factory.mktemp("s3-run")
    args = ["--conf", str(CONF)] + [item for pair in (("--set", s) for s in [
        "spark.master=local[2]", "spark.shuffle_partitions=2", f"storage.warehouse=s3a://{BUCKET}/warehouse",
        f"source.path=s3a://{BUCKET}/source/orders", f"export.dest=s3://{BUCKET}/exports/",
        f"storage.s3.endpoint_url={proxy.endpoint}", "storage.s3.path_style_access=true",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}", SPARK_EXTRA_SET, *COMMON, *RETRIES]) for item in pair]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ROOT), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TZ="UTC",
               AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    log_path = root / "run.log"     # stdout and stderr as they come (look at it while the test runs)
    try:
        with open(log_path, "w", encoding="utf-8") as log_file:
            process = subprocess.Popen([sys.executable, "-c", DRIVER, proxy.endpoint, str(second), BUCKET,
                                        json.dumps(args)], cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                # the local reference nights run here meanwhile: the subprocess spends much of its time
                # waiting on S3 round trips and retry back-offs
                local = _local_nights(spark, tmp_path_factory.mktemp("local-run"), export_files)
                process.wait(timeout=2400)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        proxy.stop()
    output = log_path.read_text(encoding="utf-8")
    copy = root / "bucket"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            target = copy / obj["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, obj["Key"], str(target))
    return output, proxy, copy, root / "mlflow.db", local


def _section(output: str, label: str) -> str:
    start = output.index(f"@@ {label}\n")
    return output[start:output.index(f"@@ {label} exit", start)]


def _fingerprints(storage: Storage) -> dict[str, tuple[int, int]]:
    """Per table: (rows, content hash), run logs left out; source file paths reduced to their names
    (s3a://bucket/source/orders/part-0 and /tmp/.../part-0 are the same file)."""
    parts = []
    for name in sorted(TABLES):
        if name in (PIPELINE_RUNS.name, "maintenance_runs") or not storage.exists(name):
            continue
        df = storage.read(name)
        for column in ("source_file", "source_path"):
            if column in df.columns:
                df = df.withColumn(column, F.regexp_replace(column, r"^.*/", ""))
        df = _comparable(df)
        parts.append(df.agg(F.lit(name).alias("table"), F.count(F.lit(1)).alias("n"),
                            F.sum(F.pmod(F.xxhash64(*df.columns), F.lit(2147483647))).alias("h")))
    rows = reduce(lambda a, b: a.unionByName(b), parts).collect()
    return {r["table"]: (int(r["n"]), int(r["h"] or 0)) for r in rows}


def test_nightly_run_on_s3_with_faults_equals_local_run(spark, s3_nights, export_files):
    output, proxy, copy, mlflow_db, (local_storage, local_exports) = s3_nights
    exits = {line.split()[1]: line.split()[-1] for line in output.splitlines() if line.startswith("@@ ") and " exit " in line}
    assert exits == {"night1": "0", "night2-ingest-features": "0", "night2-s3-down": "2", "night2-resumed": "0",
                     "maintain": "0"}, output[-4000:]
    # the faults happened: both kinds, and the nights still finished
    assert proxy.injected["SlowDown"] > 0 and proxy.injected["InternalError"] > 0, proxy.injected

    night1 = _section(output, "night1")
    assert "warehouse s3a://cvseg-s3-test/warehouse" in night1 and "-> champion v1" in night1
    assert f"s3://{BUCKET}/exports/customer_segments_2026-09-30.csv" in night1
    # new-file detection on S3 (size + Last-Modified in ingested_files): night 2 reads the new file only
    new_rows = len(export_files[1].read_text(encoding="utf-8").splitlines()) - 1
    night2 = _section(output, "night2-ingest-features")
    assert "ingest   done" in night2 and f" {new_rows:,} rows read" in night2, night2
    # S3 down: one line naming the S3 error, exit code 2, and what to do
    s3_errors = [line for line in output.splitlines() if line.startswith("error: S3 error ")]
    assert len(s3_errors) == 1 and "re-run" in s3_errors[0], output[-3000:]
    resumed = _section(output, "night2-resumed")
    assert "ingest   skipped" in resumed and "features skipped" in resumed, resumed
    assert "with champion v1" in resumed, resumed   # loaded back from the MLflow artifacts on S3

    # maintenance on S3: files replaced by the nights were vacuumed from the bucket; orders and
    # customer_scores (the tables that grow every night) checkpointed
    maintained = _section(output, "maintain")
    vacuumed = re.search(r"vacuumed ([\d,]+) file\(s\)", maintained)
    assert vacuumed and int(vacuumed.group(1).replace(",", "")) > 0, maintained
    table_lines = [line for line in maintained.splitlines() if line.startswith(("orders ", "customer_scores "))]
    assert len(table_lines) == 2 and all(line.split()[-2] == "yes" for line in table_lines), maintained

    # MLflow's artifacts are in the bucket, next to the warehouse
    assert list((copy / "warehouse" / "mlflow-artifacts").rglob("MLmodel")), "no model artifacts on S3"

    # every table and both exports equal the local run's (run in this process while the subprocess ran)
    s3_storage = Storage(spark, str(copy / "warehouse"), backend="delta-spark")
    assert _fingerprints(s3_storage) == _fingerprints(local_storage)
    for day in (D1, D2):
        name = f"customer_segments_{day}.csv"
        assert (copy / "exports" / name).read_bytes() == (local_exports / name).read_bytes()

    # the secret key: in no output, run log, MLflow store or artifact
    assert SECRET not in output
    assert SECRET.encode() not in mlflow_db.read_bytes()
    runs = s3_storage.read(PIPELINE_RUNS.name).collect()
    assert runs and not any(SECRET in str(row.asDict()) for row in runs)
    assert not any(SECRET.encode() in f.read_bytes() for f in copy.rglob("*") if f.is_file() and f.suffix != ".parquet")
