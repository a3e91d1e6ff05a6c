"""Shared fixtures: one local Spark session for the whole run, UTC, a temp warehouse per test."""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

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


#: per test module: seconds (setup + call + teardown) and tests, summed from every test's reports
#: (on the xdist controller, the workers' reports)
_MODULE_SECONDS: Counter = Counter()
_MODULE_TESTS: Counter = Counter()


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] += report.duration
    _MODULE_TESTS[module] += report.when == "setup"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With ``--durations`` (as `./dev test` runs, CI included): the modules by their summed
    seconds, shared fixtures included (``--durations`` lists single setups and calls). On two
    workers the wall time is about half the total; every figure includes the other worker's load."""
    if hasattr(config, "workerinput") or config.option.durations is None or len(_MODULE_SECONDS) < 2:
        return
    total = sum(_MODULE_SECONDS.values())
    terminalreporter.write_sep("=", f"seconds per test module (sum {total:,.0f} s, the 20 largest)")
    for module, seconds in _MODULE_SECONDS.most_common(20):
        share, tests = 100 * seconds / total, _MODULE_TESTS[module]
        terminalreporter.write_line(f"{seconds:8.1f}s {share:5.1f}%  {tests:3d} tests  {module}")


#: The suite's session evaluates expressions without generating Java code. On test-sized data Spark
#: spends more CPU compiling generated classes (Janino, then the JIT) than running them: two
#: 400-customer nights compiled 1,308 classes (19.9 s in Janino) and took 134.7 s with code
#: generation, 101.7 s without. Results are the same either way (Spark tests both paths); the
#: tests whose own `cvseg` processes are about storage, faults or the cluster (S3, the standalone
#: cluster, the killed driver) use it too; the demo and example tests run the engine's own
#: settings, every step and every command a user types: a first load with generated code, later
#: nights as the engine itself runs small warehouses (``spark.interpreted_below_customers``).
from core.spark import INTERPRETED, JAVA_OPTION_KEYS  # noqa: E402  (the settings the engine uses on small warehouses)

#: The suite's JVMs compile with C1 only. A test JVM lives minutes on kilobytes of data: HotSpot's
#: optimising compiler (C2) spent ~35 of a fresh test JVM's first 90 CPU seconds compiling code
#: that then ran a few times. Two test modules on two workers (trends, segment stability), twice
#: each, 2026-12-07: 253 / 213 s of wall and 470 / 396 CPU-s with C2, 189 / 190 s and 315 / 326
#: CPU-s with C1 only. Results do not depend on the compiler. Engine runs keep HotSpot's default:
#: on customer-sized data C2's code is what makes the scans fast.
TEST_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"
TEST_JVM = {key: TEST_JVM_OPTIONS for key in JAVA_OPTION_KEYS}
#: What the suite's sessions add to the engine's settings, and the same for a `cvseg` command run by
#: a test (``--set`` reads the value as YAML, which JSON is).
TEST_SPARK_EXTRA = {**INTERPRETED, **TEST_JVM}
SPARK_EXTRA_SET = "spark.extra=" + json.dumps(TEST_SPARK_EXTRA)


@pytest.fixture(scope="session")
def spark():
    from core.config import SparkConf
    from core.spark import build_spark

    session = build_spark(SparkConf(
        master="local[2]", app_name="cvseg-tests", shuffle_partitions=2, driver_memory="2g",
        extra={"spark.default.parallelism": "2", "spark.sql.adaptive.coalescePartitions.enabled": "true",
               "spark.rdd.compress": "false", **TEST_SPARK_EXTRA}))
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
