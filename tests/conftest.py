"""Shared fixtures: one local Spark session for the whole run, UTC, a temp warehouse per test."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

os.environ["TZ"] = "UTC"
if hasattr(time, "tzset"):
    time.tzset()
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def pytest_collection_modifyitems(config, items):
    """The longest modules first: ``cloud`` (8-14 min each in the suite), then ``slow`` (minutes
    each), then the rest. `./dev test` runs two workers that take whole modules in collection order
    (``--dist loadscope --no-loadscope-reorder``): a long module handed out last would keep one
    worker busy for minutes after the other ran out of work."""
    items.sort(key=lambda item: (item.get_closest_marker("cloud") is None,   # stable: modules stay together
                                 item.get_closest_marker("slow") is None))


#: The suite's session evaluates expressions without generating Java code. On test-sized data Spark
#: spends more CPU compiling generated classes (Janino, then the JIT) than running them: two
#: 400-customer nights compiled 1,308 classes (19.9 s in Janino) and took 134.7 s with code
#: generation, 101.7 s without. Results are the same either way (Spark tests both paths); the
#: tests whose own `cvseg` processes are about storage, faults or the cluster (S3, the standalone
#: cluster, the killed driver) use it too; the demo and example tests run the engine's own
#: settings, every step and every command a user types: a first load with generated code, later
#: nights as the engine itself runs small warehouses (``spark.interpreted_below_customers``).
from core.spark import INTERPRETED  # noqa: E402  (the settings the engine uses on small warehouses)
#: The same for a `cvseg` command run by a test (``--set`` reads the value as YAML, which JSON is).
INTERPRETED_SET = "spark.extra=" + json.dumps(INTERPRETED)


@pytest.fixture(scope="session")
def spark():
    from core.config import SparkConf
    from core.spark import build_spark

    session = build_spark(SparkConf(
        master="local[2]", app_name="cvseg-tests", shuffle_partitions=2, driver_memory="2g",
        extra={"spark.default.parallelism": "2", "spark.sql.adaptive.coalescePartitions.enabled": "true",
               "spark.rdd.compress": "false", **INTERPRETED}))
    yield session
    session.stop()


@pytest.fixture()
def warehouse(tmp_path):
    path = tmp_path / "warehouse"
    path.mkdir()
    return path


#: The suite's storage backend: delta-spark, what Databricks and EMR run (./dev fetches Delta's jars
#: into the local session); CVSEG_TEST_BACKEND=deltalake runs it on delta-rs (e.g. offline).
SUITE_BACKEND = os.environ.get("CVSEG_TEST_BACKEND", "delta-spark")
BACKENDS = ("delta-spark", "deltalake")


@pytest.fixture()
def storage(spark, warehouse):
    from core.storage import Storage

    return Storage(spark, str(warehouse), backend=SUITE_BACKEND)


@pytest.fixture(params=BACKENDS)
def any_storage(request, spark, warehouse):
    """A Storage on each backend in turn: for the tests of the storage contract itself."""
    from core.storage import Storage

    return Storage(spark, str(warehouse), backend=request.param)


@pytest.fixture()
def rng():
    import numpy as np

    return np.random.default_rng(20261123)


@pytest.fixture(scope="session")
def moto_endpoint():
    """An S3 API (moto's server) on 127.0.0.1 and a free port, for the S3 tests (one per worker)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
