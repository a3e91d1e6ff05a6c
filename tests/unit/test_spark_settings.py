"""core.spark.session_settings: what a new session starts with (no Spark); expressions_sized_for: a
small warehouse's night without generated code (the suite's session)."""
from __future__ import annotations

import os

import pytest

from core.config import S3Conf, SparkConf
from core.spark import CODEGEN_CACHE, INTERPRETED, expressions_sized_for, session_settings


def test_local_session_defaults_scale_with_cores_and_extra_wins(tmp_path):
    conf = SparkConf(master="local[2]", app_name="t", shuffle_partitions=None, driver_memory="3g",
                     extra={"spark.sql.adaptive.enabled": "false", "spark.custom.key": "x"})
    settings = session_settings(conf, str(tmp_path / "wh"), s3=False, s3_conf=None, cores=8)
    assert settings["spark.sql.shuffle.partitions"] == "16" and settings["spark.sql.files.minPartitionNum"] == "32"
    assert settings["spark.driver.memory"] == "3g" and settings["spark.sql.session.timeZone"] == "UTC"
    assert "-Duser.timezone=UTC" in settings["spark.driver.extraJavaOptions"]
    assert settings["spark.sql.warehouse.dir"] == os.path.abspath(tmp_path / "wh" / "_spark_sql")
    assert settings["spark.sql.adaptive.enabled"] == "false" and settings["spark.custom.key"] == "x"
    assert "spark.driver.host" not in settings                       # local[...]: one JVM
    assert CODEGEN_CACHE.items() <= settings.items()                  # a night's generated classes kept
    assert not any(key.startswith("spark.hadoop.fs.s3a.") for key in settings)


def test_jvm_options_in_extra_are_added_after_the_engines():
    """A client's -Xss keeps the UTC clock and the log configuration, and wins where both set a flag."""
    conf = SparkConf(master="local[2]", app_name="t", extra={"spark.driver.extraJavaOptions": "-Xss4m",
                                                            "spark.executor.extraJavaOptions": "-XX:+DontCompileHugeMethods"})
    settings = session_settings(conf, None, s3=False, s3_conf=None, cores=2)
    driver, executor = settings["spark.driver.extraJavaOptions"].split(), settings["spark.executor.extraJavaOptions"].split()
    assert driver[0] == "-Duser.timezone=UTC" and driver[-1] == "-Xss4m" and any("log4j2" in o for o in driver)
    assert executor == ["-Duser.timezone=UTC", "-XX:-DontCompileHugeMethods", "-XX:+DontCompileHugeMethods"]


def test_s3_warehouse_and_a_standalone_master_on_this_machine():
    conf = SparkConf(master="spark://127.0.0.1:7077", app_name="t", shuffle_partitions=4)
    settings = session_settings(conf, "s3a://bucket/wh/", s3=True,
                                s3_conf=S3Conf(endpoint_url="http://127.0.0.1:9000", path_style_access=True),
                                cores=2)
    assert settings["spark.sql.shuffle.partitions"] == "4"
    assert settings["spark.sql.warehouse.dir"] == "s3a://bucket/wh/_spark_sql"
    assert settings["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    # executors in other JVMs connect back to the driver on loopback
    assert settings["spark.driver.host"] == settings["spark.driver.bindAddress"] == "127.0.0.1"


def test_a_small_warehouse_runs_interpreted_and_the_session_gets_its_settings_back(spark):
    generated = {"spark.sql.codegen.wholeStage": "true", "spark.sql.codegen.factoryMode": "FALLBACK"}
    before = {key: spark.conf.get(key) for key in INTERPRETED}
    try:
        for key, value in generated.items():
            spark.conf.set(key, value)
        with expressions_sized_for(spark, 99_999, 100_000, {}) as interpreted:
            assert interpreted and {key: spark.conf.get(key) for key in INTERPRETED} == INTERPRETED
            assert spark.range(5).selectExpr("sum(id * 2) AS s").first()["s"] == 20   # runs interpreted
        assert {key: spark.conf.get(key) for key in INTERPRETED} == generated
        with pytest.raises(RuntimeError), expressions_sized_for(spark, 10, 100_000, {}):
            raise RuntimeError("a failed step")
        assert {key: spark.conf.get(key) for key in INTERPRETED} == generated   # restored on failure too
        # large enough, no earlier features (a first load, of any size), switched off, or the user's own choice
        for customers, below, extra in [(100_000, 100_000, {}), (None, 100_000, {}), (10, 0, {}),
                                        (10, 100_000, {"spark.sql.codegen.wholeStage": "true"})]:
            with expressions_sized_for(spark, customers, below, extra) as interpreted:
                assert not interpreted and {key: spark.conf.get(key) for key in INTERPRETED} == generated
    finally:
        for key, value in before.items():
            spark.conf.set(key, value)


def test_the_suites_jvm_got_the_engines_options_and_the_suites_own(spark):
    from core.spark import JIT_OPTIONS
    from tests.conftest import TEST_JVM_OPTIONS

    runtime = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()  # noqa: SLF001
    arguments = list(runtime.getInputArguments())
    assert {"-Duser.timezone=UTC", JIT_OPTIONS, TEST_JVM_OPTIONS} <= set(arguments)
