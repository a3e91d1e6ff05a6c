"""The one SparkSession factory. Every stage receives ``spark`` as an argument."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from pyspark.sql import SparkSession

from core.config import S3Conf, SparkConf
from core.errors import UserError
from core.s3 import hadoop_settings, is_s3


# Compile Spark's large generated methods too (see build_spark); clusters should set the same
# option (infra/ does) since their JVMs are not started from here.
JIT_OPTIONS = "-XX:-DontCompileHugeMethods"
#: The settings that hold JVM command-line options: ``spark.extra``'s are added after the engine's
#: (session_settings).
JAVA_OPTION_KEYS = ("spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions")

# Spark keeps 100 compiled classes of generated code per JVM; a night plans ~650 distinct ones, so
# the same code was compiled again and again on the driver (serial time). 5,000 holds a night's;
# measured in docs/SCALING.md section 5. Static: clusters set it too (infra/).
CODEGEN_CACHE = {"spark.sql.codegen.cache.maxEntries": "5000"}

#: Spark evaluates expressions without generated code (session settings, changeable at run time).
INTERPRETED = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}


@contextmanager
def expressions_sized_for(spark: SparkSession, customers: int | None, interpreted_below: int,
                          user_settings: Mapping[str, str]) -> Iterator[bool]:
    """Run the block with Spark's expressions interpreted (True) when the warehouse holds fewer
    than ``interpreted_below`` customers, else as configured (False). On small data compiling the
    generated classes (driver time, several hundred a night) costs more than the compiled code
    saves; on customer-sized scans it is the other way round (docs/SCALING.md, section 5).
    ``customers`` None (no earlier features: a first load, of any size) and settings the user gave
    in ``spark.extra`` keep the configured behaviour. The previous values are restored after."""
    if customers is None or customers >= interpreted_below or any(key in user_settings for key in INTERPRETED):
        yield False
        return
    with sql_settings(spark, INTERPRETED):
        yield True


log = logging.getLogger(__name__)

#: Spark's JVM log configuration for local sessions: errors only (a URI: the path may hold spaces).
LOG4J2 = Path(__file__).resolve().with_name("log4j2.properties").as_uri()


class JavaMissingError(UserError, RuntimeError):
    """Spark needs a Java runtime (17 or 21) and none was found."""


JAVA_HELP = (
    "Java was not found. Spark needs a Java 17 (or 21) runtime:\n"
    "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless\n"
    "  macOS:         brew install openjdk@17\n"
    "then make sure `java -version` works or set JAVA_HOME."
)


def ensure_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "bin", "java")):
        return
    if shutil.which("java") is None:
        raise JavaMissingError(JAVA_HELP)


def has_delta_classes(spark: SparkSession) -> bool:
    """True when the session's JVM can load Delta Lake (Databricks, EMR with Delta, online laptops)."""
    try:
        jvm = spark.sparkContext._jvm  # noqa: SLF001 - the only way to probe the classpath
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable", True,
                                    jvm.Thread.currentThread().getContextClassLoader())
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


#: Delta rebuilds a table's snapshot (its log replayed into file actions) in 50 partitions by default,
#: sized for clusters; in one JVM with a few cores that is 50 tiny tasks per table read or commit, and
#: a log of a few thousand actions needs a handful. Measured on the trends test (small tables, many
#: commits): 0.56x the wall time with 2 instead of 50. Local sessions use one per core.
SNAPSHOT_PARTITIONS = "spark.databricks.delta.snapshotPartitions"


def build_spark(conf: SparkConf, warehouse: str | None = None, s3: bool = False,
                s3_conf: S3Conf | None = None) -> SparkSession:
    """Build (local) or reuse (cluster) the session.

    Local sessions run in UTC with microsecond parquet timestamps, the settings the Delta tables
    written through delta-rs rely on. On a cluster (``master`` null) the active session is reused
    as configured by the platform; only the time settings (and, when ``s3``, the s3a settings of
    ``s3_conf``: never the s3:// scheme, which is EMRFS on EMR) are applied.

    ``s3`` (or a warehouse on S3): the s3a jars and ``storage.s3``'s settings (endpoint, path
    style, region, retries; s3:// read by S3AFileSystem too).
    """
    s3 = s3 or is_s3(warehouse)
    if conf.master is None:
        active = SparkSession.getActiveSession()
        if active is not None:
            _apply_runtime_settings(active, conf)
            if s3:
                hadoop_conf = active.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
                for key, value in hadoop_settings(s3_conf or S3Conf(), map_s3_scheme=False).items():
                    hadoop_conf.set(key.removeprefix("spark.hadoop."), value)
            return active
    ensure_java()
    if conf.master and is_loopback_master(conf.master):
        # A local JVM (and a driver talking to a cluster on this machine) binds to loopback, not to
        # the first external interface it finds (and does not warn that the hostname resolves to
        # 127.0.0.1). Read when the JVM starts.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Python workers must run the interpreter that runs the driver (venvs, CI).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    cores = os.cpu_count() or 2
    builder = SparkSession.builder.appName(conf.app_name)
    if conf.master:
        builder = builder.master(conf.master)
    settings = session_settings(conf, warehouse, s3, s3_conf, cores)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    if spark.sparkContext.master.startswith("local") and SNAPSHOT_PARTITIONS not in conf.extra:
        # (the master as started: a null spark.master is local[*] from Python, YARN under spark-submit)
        spark.conf.set(SNAPSHOT_PARTITIONS, str(max(2, cores)))
    if conf.master and not conf.master.startswith("local[") and "spark.submit.pyFiles" not in conf.extra:
        ship_engine_code(spark)
    return spark


def session_settings(conf: SparkConf, warehouse: str | None, s3: bool, s3_conf: S3Conf | None,
                     cores: int) -> dict[str, str]:
    """The settings a new session starts with (``build_spark``): the engine's defaults for a machine
    of ``cores`` cores, the warehouse's SQL folder, the cached jars, the s3a settings when ``s3``,
    loopback addresses for a cluster on this machine, then ``spark.extra`` over all of them (JVM
    options appended to the engine's)."""
    settings = {
        "spark.driver.memory": conf.driver_memory,
        "spark.sql.shuffle.partitions": str(conf.shuffle_partitions or max(4, 2 * cores)),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        # HotSpot leaves methods above 8 KB of bytecode to the interpreter, and Spark's generated
        # code for a wide projection (ingest's rules, features' aggregate) passes that size:
        # measured on ingest's classify step, 15.5 -> 5.7 us per row with huge methods compiled.
        "spark.driver.extraJavaOptions": f"-Duser.timezone=UTC {JIT_OPTIONS} -Dlog4j2.configurationFile={LOG4J2}",
        "spark.executor.extraJavaOptions": f"-Duser.timezone=UTC {JIT_OPTIONS}",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Exports written by pandas 2 hold TIMESTAMP(NANOS) columns, which Spark 4.0 cannot read as
        # timestamps; read as long nanoseconds, ingest converts them (pipelines.ingest).
        "spark.sql.legacy.parquet.nanosAsLong": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        # Spark packs input files into splits of up to total/parallelism bytes: on a 2-core
        # machine a 20-file export became 3 splits, so one core sat idle for the last third
        # of every scan. Four splits per core keep both cores busy to the end.
        "spark.sql.files.minPartitionNum": str(4 * cores),
        # The deltalake backend reads a table by its file list; above 32 paths Spark lists them
        # with a Spark job of one task per file (a 600-file orders table: ~6 s per read). Local
        # files are listed on the driver in milliseconds.
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "1000000",
        **CODEGEN_CACHE,
    }
    if warehouse and "://" not in warehouse:
        settings["spark.sql.warehouse.dir"] = os.path.abspath(os.path.join(warehouse, "_spark_sql"))
    elif warehouse and is_s3(warehouse):
        # catalog schemas (storage.catalog) next to the tables, not in ./spark-warehouse of the cwd
        settings["spark.sql.warehouse.dir"] = "s3a://" + warehouse.split("://", 1)[1].rstrip("/") + "/_spark_sql"
    settings.update(local_jar_settings(conf.extra, s3=s3))
    if s3:
        settings.update(hadoop_settings(s3_conf or S3Conf(), map_s3_scheme=True))
    if conf.master and is_loopback_master(conf.master) and not conf.master.startswith("local["):
        # executors in other JVMs connect back to the driver: on loopback, like the cluster
        settings.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"})
    for key, value in conf.extra.items():
        # JVM options the user adds (-Xss, a GC, ...) go after the engine's, not in their place: the
        # UTC clock and the log configuration stay, and the user's flag wins where both set one
        # (the JVM takes the last of a repeated -XX option).
        settings[key] = f"{settings[key]} {value}" if key in JAVA_OPTION_KEYS and key in settings else value
    return settings


def is_loopback_master(master: str) -> bool:
    """``local[...]``, ``local-cluster[...]`` or a cluster master on this machine (127.0.0.1 / localhost)."""
    if master == "local" or master.startswith(("local[", "local-cluster[")):
        return True
    host = master.split("://", 1)[-1].split(":", 1)[0]
    return master.startswith("spark://") and host in ("127.0.0.1", "localhost")


#: The engine's packages: what a pandas UDF or ``mapInPandas`` function on an executor imports.
ENGINE_PACKAGES = ("core", "pipelines", "models", "jobs")


def engine_source_root() -> Path | None:
    """The checkout the engine runs from, or None when it is installed (a wheel in site-packages)."""
    root = Path(__file__).resolve().parents[1]
    return None if root.name in ("site-packages", "dist-packages") else root


def ship_engine_code(spark: SparkSession) -> Path | None:
    """Give the executors' Python workers this checkout's engine code (cluster masters only).

    On Databricks and EMR the engine is installed on every node (the wheel, or the packed venv of
    infra/emr), and nothing is shipped. A driver running from a source checkout against a cluster
    (``spark://``, ``local-cluster[...]``, YARN) zips the engine's packages once and adds the zip with
    ``addPyFile``: each task puts it first on the worker's ``sys.path``, so executors run exactly the
    driver's code, even on a node whose environment has another version of the engine installed.
    """
    import tempfile
    import zipfile

    root = engine_source_root()
    if root is None:
        return None
    archive = Path(tempfile.mkdtemp(prefix="cvseg-engine-")) / "cvseg_engine.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in ENGINE_PACKAGES:
            for path in sorted((root / package).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    zf.write(path, path.relative_to(root).as_posix())
    spark.sparkContext.addPyFile(str(archive))
    # addPyFile also puts the zip first on the driver's own sys.path: the driver keeps importing
    # from the checkout (modules that read files next to their source need a real folder)
    sys.path[:] = [p for p in sys.path if Path(p).name != archive.name]
    log.info("shipped the engine's code from %s to the executors (%s)", root, archive)
    return archive


def local_jar_settings(extra: dict[str, str], s3: bool = False) -> dict[str, str]:
    """``spark.jars`` and Delta's session settings for the pinned jars in the local cache
    (:mod:`core.jars`); nothing when the caller brings its own jars or the cache lacks them (the
    storage backend ``auto`` then picks deltalake, see :class:`core.storage.Storage`). The s3a
    jars only when ``s3``: the 560 MB AWS SDK bundle adds ~20 s to a local session's start."""
    from core import jars

    if any(key in extra for key in ("spark.jars", "spark.jars.packages")):
        found = None
    else:
        found = jars.present("delta")
    settings: dict[str, str] = {}
    if found:
        settings["spark.jars"] = ",".join(str(p) for p in found + ((jars.present("s3") or []) if s3 else []))
    if found or "delta" in extra.get("spark.jars.packages", "") + extra.get("spark.jars", ""):
        settings["spark.sql.extensions"] = "io.delta.sql.DeltaSparkSessionExtension"
        settings["spark.sql.catalog.spark_catalog"] = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    return settings


def _apply_runtime_settings(spark: SparkSession, conf: SparkConf) -> None:
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    if conf.shuffle_partitions:
        spark.conf.set("spark.sql.shuffle.partitions", str(conf.shuffle_partitions))
    for key, value in conf.extra.items():
        spark.conf.set(key, value)


@contextmanager
def sql_settings(spark: SparkSession, settings: Mapping[str, str]) -> Iterator[None]:
    """Session settings for the actions inside the block only (a plan is made when an action
    runs), then back to what they were: unset if they were unset."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
