"""Shared fixtures: one local Spark session for the whole run, UTC, a temp warehouse per test."""
from __future__ import annotations

import os
import sys
import time

import pytest

os.environ["TZ"] = "UTC"
if hasattr(time, "tzset"):
    time.tzset()
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    from core.config import SparkConf
    from core.spark import build_spark

    session = build_spark(SparkConf(
        master="local[2]", app_name="cvseg-tests", shuffle_partitions=2, driver_memory="2g",
        extra={"spark.default.parallelism": "2", "spark.sql.adaptive.coalescePartitions.enabled": "true",
               "spark.rdd.compress": "false", "spark.sql.codegen.wholeStage": "true"}))
    yield session
    session.stop()


@pytest.fixture()
def warehouse(tmp_path):
    path = tmp_path / "warehouse"
    path.mkdir()
    return path


@pytest.fixture()
def storage(spark, warehouse):
    from core.storage import Storage

    return Storage(spark, str(warehouse), backend="deltalake")


@pytest.fixture()
def rng():
    import numpy as np

    return np.random.default_rng(20261123)
