"""The one module that reads and writes tables.

Every table is a Delta table under ``storage.warehouse/<name>``. Two interchangeable backends
write the same Delta format:

* ``delta-spark`` - native, when the session has Delta's JVM classes (Databricks, EMR, a laptop
  that could download the jars).
* ``deltalake`` - no Delta jars needed (this is the embedded default): Spark writes parquet files
  in parallel into a staging folder inside the table, the files are moved into their partition
  folders, and the driver commits them in one Delta transaction with ``deltalake`` (delta-rs).
  Only file paths, sizes and row counts go to the driver, never rows.

A write that fails before its commit leaves the table at its previous version: readers only see
files named by the Delta log, and the log is written last, atomically.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.spark import has_delta_classes
from core.tables import TableSpec, conform, table_spec

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"


class StorageError(RuntimeError):
    """A table cannot be read or written; the message says which and why."""


# --------------------------------------------------------------------------------------------
# Schema helpers
# --------------------------------------------------------------------------------------------
def spark_to_arrow_type(dtype: T.DataType) -> pa.DataType:
    """Arrow type of a Spark type, as Spark writes it to parquet (timestamps: UTC microseconds)."""
    simple = {
        T.StringType: pa.string(), T.LongType: pa.int64(), T.IntegerType: pa.int32(),
        T.ShortType: pa.int16(), T.ByteType: pa.int8(), T.DoubleType: pa.float64(),
        T.FloatType: pa.float32(), T.BooleanType: pa.bool_(), T.DateType: pa.date32(),
        T.TimestampType: pa.timestamp("us", tz="UTC"), T.BinaryType: pa.binary(),
        T.TimestampNTZType: pa.timestamp("us"),
    }
    for spark_type, arrow_type in simple.items():
        if isinstance(dtype, spark_type):
            return arrow_type
    if isinstance(dtype, T.DecimalType):
        return pa.decimal128(dtype.precision, dtype.scale)
    if isinstance(dtype, T.ArrayType):
        return pa.list_(spark_to_arrow_type(dtype.elementType))
    if isinstance(dtype, T.MapType):
        return pa.map_(spark_to_arrow_type(dtype.keyType), spark_to_arrow_type(dtype.valueType))
    if isinstance(dtype, T.StructType):
        return pa.struct([pa.field(f.name, spark_to_arrow_type(f.dataType), f.nullable) for f in dtype.fields])
    raise StorageError(f"no Delta mapping for Spark type {dtype.simpleString()}")


def spark_to_arrow_schema(schema: T.StructType) -> pa.Schema:
    return pa.schema([pa.field(f.name, spark_to_arrow_type(f.dataType), f.nullable) for f in schema.fields])


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
class StorageBackend(Protocol):
    """What a backend does with one Delta table at ``path``: the contract both backends keep and
    the storage tests check on each. ``spec`` is the table's declaration; DataFrames arrive
    conformed to it."""

    name: str

    def exists(self, path: str) -> bool: ...

    def read(self, path: str, spec: TableSpec, version: int | None,
             partitions: dict[str, list[str]] | None = None) -> DataFrame: ...

    def version(self, path: str) -> int: ...

    def files_appended_since(self, path: str, version: int) -> list[str] | None:
        """Data files added after ``version`` if every later commit was a plain append, else None."""

    def history(self, path: str) -> list[dict[str, Any]]: ...

    def write(self, df: DataFrame, path: str, spec: TableSpec, mode: str,
              partitions: dict[str, list[str]] | None) -> None:
        """mode: append | overwrite (whole table) | replace_partitions (those in df and ``partitions``)."""

    def merge(self, df: DataFrame, path: str, spec: TableSpec, keys: tuple[str, ...],
              previous_partitions: dict[str, list[str]]) -> None:
        """Upsert by ``keys`` into an existing table (see :meth:`Storage.merge`)."""


def _file_uris(table, filters: list | None) -> list[str]:
    """The table's file URIs pruned by partition filters: ``file_pruning_predicate`` where this
    deltalake has it (``partition_filters`` is deprecated there), ``partition_filters`` before."""
    if filters is None:
        return table.file_uris()
    if "file_pruning_predicate" in inspect.signature(table.file_uris).parameters:
        return table.file_uris(file_pruning_predicate=filters)
    return table.file_uris(partition_filters=filters)


def _merge_partitions(df: DataFrame, spec: TableSpec,
                      previous_partitions: dict[str, list[str]]) -> tuple[str, list[str]] | None:
    """(partition column, values) a merge into a partitioned table may touch: the partitions of the
    new rows (a small distinct collect) plus ``previous_partitions``; None when there are no rows."""
    (column,) = spec.partition_by
    touched = {r[0] for r in df.select(column).distinct().collect()}   # a few partition values
    if not touched:
        return None
    if None in touched:   # every partition column here is non-null: a caller's bug
        raise StorageError(f"cannot merge into {spec.name!r}: rows with a null {column} (the partition column)")
    return column, sorted({str(v) for v in touched} | set(previous_partitions.get(column, [])))


@dataclass
class _StagedFile:
    relative_path: str
    size: int
    partition_values: dict[str, str | None]
    num_records: int


class _DeltaRsBackend:
    """Spark writes parquet in parallel; the driver commits the files with delta-rs."""

    name = "deltalake"

    def __init__(self, spark: SparkSession):
        self.spark = spark

    # -- reading --------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(path)

    def read(self, path: str, spec: TableSpec, version: int | None,
             partitions: dict[str, list[str]] | None = None) -> DataFrame:
        from deltalake import DeltaTable

        table = DeltaTable(path, version=version) if version is not None else DeltaTable(path)
        # pruned from the log: Spark never lists or opens the other partitions' files
        filters = [(column, "in", values) for column, values in (partitions or {}).items()]
        uris = _file_uris(table, filters or None)
        if not uris:
            return self.spark.createDataFrame([], spec.schema)
        df = (self.spark.read.schema(spec.schema).option("basePath", path)
              .option("mergeSchema", "false").parquet(*uris))
        return df.select(*spec.columns)

    def version(self, path: str) -> int:
        from deltalake import DeltaTable

        return DeltaTable(path).version()

    def files_appended_since(self, path: str, version: int) -> list[str] | None:
        from deltalake import DeltaTable

        table = DeltaTable(path)
        if table.version() < version:
            return None
        later = [h for h in table.history() if h["version"] > version]
        # only this engine's plain appends (replace_partitions also commits as a WRITE/Append)
        if any(h.get("engine_operation") != "append" for h in later):
            return None
        before = set(DeltaTable(path, version=version).file_uris())
        return [uri for uri in table.file_uris() if uri not in before]

    def history(self, path: str) -> list[dict[str, Any]]:
        from deltalake import DeltaTable

        return DeltaTable(path).history()

    # -- writing --------------------------------------------------------------------------
    def _stage(self, df: DataFrame, path: str, spec: TableSpec) -> list[_StagedFile]:
        """Write df as parquet into a fresh staging folder, move the files into place."""
        if "://" in path and not path.startswith("file://"):
            raise StorageError(
                f"the deltalake backend writes local paths only, not {path}; on a cluster set "
                "storage.backend: delta-spark (Databricks and EMR have Delta's jars)")
        table_root = Path(path.removeprefix("file://"))
        staging = table_root / STAGING_DIR / uuid.uuid4().hex
        writer = df.write.mode("errorifexists")
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        writer.parquet(str(staging))
        staged: list[_StagedFile] = []
        try:
            for file in sorted(staging.rglob("*.parquet")):
                relative = file.relative_to(staging)
                target = table_root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
                values: dict[str, str | None] = {}
                for part in relative.parts[:-1]:
                    key, _, value = part.partition("=")
                    value = unquote(value)
                    values[key] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
                staged.append(_StagedFile(
                    relative_path=relative.as_posix(), size=target.stat().st_size,
                    partition_values=values, num_records=pq.read_metadata(target).num_rows))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                (table_root / STAGING_DIR).rmdir()
            except OSError:
                pass
        return staged

    def _add_actions(self, staged: list[_StagedFile]) -> list:
        from deltalake.transaction import AddAction

        now = int(time.time() * 1000)
        return [AddAction(path=f.relative_path, size=f.size, partition_values=f.partition_values,
                          modification_time=now, data_change=True,
                          stats=json.dumps({"numRecords": f.num_records}))
                for f in staged if f.num_records > 0 or not f.partition_values]

    def _commit(self, path: str, spec: TableSpec, actions: list, mode: str,
                partition_filters: list | None, operation: str) -> None:
        from deltalake import CommitProperties, DeltaTable, Schema
        from deltalake.transaction import create_table_with_add_actions

        schema = Schema.from_arrow(spark_to_arrow_schema(spec.schema))
        props = CommitProperties(custom_metadata={"engine_operation": operation})
        if not self.exists(path):
            Path(path).mkdir(parents=True, exist_ok=True)
            create_table_with_add_actions(path, schema, [a for a in actions if hasattr(a, "stats")],
                                          mode="error", partition_by=list(spec.partition_by) or None,
                                          name=spec.name, description=spec.description,
                                          commit_properties=props)
            return
        DeltaTable(path).create_write_transaction(
            actions, mode=mode, schema=schema, partition_by=list(spec.partition_by) or None,
            partition_filters=partition_filters, commit_properties=props)

    def write(self, df: DataFrame, path: str, spec: TableSpec, mode: str,
              partitions: dict[str, list[str]] | None) -> None:
        """mode: append | overwrite (whole table) | replace_partitions."""
        staged = self._stage(df, path, spec)
        adds = self._add_actions(staged)
        if mode == "append":
            self._commit(path, spec, adds, "append", None, "append")
            return
        if mode == "overwrite":
            self._commit(path, spec, adds, "overwrite", None, "overwrite")
            return
        # replace_partitions: the partitions written plus any named explicitly (may be emptied)
        (column,) = spec.partition_by  # every partitioned table here has one partition column
        values = {f.partition_values.get(column) for f in staged if f.partition_values}
        values |= set((partitions or {}).get(column, []))
        values.discard(None)
        if not values:
            log.info("%s: nothing to replace", spec.name)
            if not self.exists(path):
                self._commit(path, spec, [], "append", None, "create")
            return
        if not self.exists(path):
            self._commit(path, spec, adds, "append", None, "replace_partitions")
            return
        from deltalake import DeltaTable
        from deltalake.transaction import RemoveAction

        now = int(time.time() * 1000)
        removes = []
        current = pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pylist()
        for action in current:
            if str(action.get(f"partition.{column}")) in values:
                removes.append(RemoveAction(path=action["path"], data_change=True,
                                            deletion_timestamp=now, size=action["size_bytes"],
                                            partition_values={column: str(action[f"partition.{column}"])}))
        self._commit(path, spec, adds + removes, "append", None, "replace_partitions")

    def merge(self, df: DataFrame, path: str, spec: TableSpec, keys: tuple[str, ...],
              previous_partitions: dict[str, list[str]]) -> None:
        """delta-rs' commit API has no MERGE here: the partitions the new rows touch (plus where
        moved keys were before) are read, the new rows replace their keys, and those partitions
        are replaced in one commit; an unpartitioned table is rewritten."""
        previous = None
        if spec.partition_by:
            partitions = _merge_partitions(df, spec, previous_partitions)
            if partitions is None:
                return
            column, wanted = partitions
            previous = {column: list(previous_partitions.get(column, []))}
            existing = self.read(path, spec, None, {column: wanted})
        else:
            existing = self.read(path, spec, None)
        kept = existing.join(df.select(*keys), on=list(keys), how="left_anti")
        merged = kept.unionByName(df)
        mode = "replace_partitions" if spec.partition_by else "overwrite"
        # naming the previous partitions replaces them even when the last row moved out
        self.write(merged.select(*spec.columns), path, spec, mode, previous)


class _DeltaSparkBackend:
    """Native Delta Lake through delta-spark (the session has Delta's classes)."""

    name = "delta-spark"

    def __init__(self, spark: SparkSession):
        self.spark = spark

    def exists(self, path: str) -> bool:
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(self.spark, path)

    def read(self, path: str, spec: TableSpec, version: int | None,
             partitions: dict[str, list[str]] | None = None) -> DataFrame:
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        df = reader.load(path).select(*spec.columns)
        for column, values in (partitions or {}).items():
            df = df.where(F.col(column).isin(values))   # Delta prunes the files from its log
        return df

    def _delta_log(self, path: str):
        """Delta's own log object (JVM): its version and commits are read on the driver, without
        the Spark job that ``DeltaTable.history`` runs (~2 s per call on a local session; the
        nightly runner asks every step's tables for their versions before and after)."""
        jvm = self.spark._jvm  # noqa: SLF001 - py4j is the only way to Delta's log
        return jvm, jvm.org.apache.spark.sql.delta.DeltaLog.forTable(self.spark._jsparkSession, path)  # noqa: SLF001

    def _latest_version(self, jvm, log) -> int:
        return int(log.update(False, jvm.scala.Option.empty(), jvm.scala.Option.empty()).version())

    def version(self, path: str) -> int:
        try:
            return self._latest_version(*self._delta_log(path))
        except Exception:  # noqa: BLE001 - an internal API: another Delta release may differ
            from delta.tables import DeltaTable

            return int(DeltaTable.forPath(self.spark, path).history(1).collect()[0]["version"])

    def files_appended_since(self, path: str, version: int) -> list[str] | None:
        try:
            return self._files_appended_from_log(path, version)
        except Exception:  # noqa: BLE001 - an internal API: fall back to the public one (Spark jobs)
            log.debug("reading %s's commits from DeltaLog failed; using its history", path, exc_info=True)
            return self._files_appended_from_history(path, version)

    def _files_appended_from_log(self, path: str, version: int) -> list[str] | None:
        """The commits after ``version`` read from the log on the driver: only plain appends (WRITE
        in Append mode, nothing but AddFile actions) qualify."""
        jvm, delta_log = self._delta_log(path)
        if self._latest_version(jvm, delta_log) < version:
            return None
        files: list[str] = []
        changes = delta_log.getChanges(version + 1, False)
        while changes.hasNext():
            actions = changes.next()._2().iterator()
            while actions.hasNext():
                action = actions.next()
                kind = action.getClass().getSimpleName()
                if kind == "AddFile":
                    files.append(jvm.org.apache.spark.sql.delta.util.DeltaFileOperations.absolutePath(
                        path, action.path()).toString())
                elif kind == "CommitInfo":
                    mode = action.operationParameters().get("mode")
                    if action.operation() != "WRITE" or (mode.get() if mode.isDefined() else "") != "Append":
                        return None
                else:
                    return None     # a remove, a schema or protocol change: something was rewritten
        return files

    def _files_appended_from_history(self, path: str, version: int) -> list[str] | None:
        history = self.history(path)
        if int(history[0]["version"]) < version:
            return None
        later = [h for h in history if int(h["version"]) > version]
        if len(later) >= 100 or any(h["operation"] != "WRITE" or (h.get("operationParameters") or {}).get("mode") != "Append"
                                    for h in later):
            return None   # history(100) may not reach back far enough, or something was rewritten
        # a DataFrameReader keeps its options: one reader per version
        before = set(self.spark.read.format("delta").option("versionAsOf", version).load(path).inputFiles())
        return [uri for uri in self.spark.read.format("delta").load(path).inputFiles() if uri not in before]

    def history(self, path: str) -> list[dict[str, Any]]:
        from delta.tables import DeltaTable

        rows = DeltaTable.forPath(self.spark, path).history(100).collect()  # log entries, small
        return [r.asDict(recursive=True) for r in rows]

    def write(self, df: DataFrame, path: str, spec: TableSpec, mode: str,
              partitions: dict[str, list[str]] | None) -> None:
        writer = df.write.format("delta")
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        if mode == "append":
            writer.mode("append").save(path)
        elif mode == "overwrite":
            writer.mode("overwrite").option("overwriteSchema", "false").save(path)
        elif partitions and any(partitions.values()):
            (column,) = spec.partition_by
            quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in partitions[column])
            writer.mode("overwrite").option("replaceWhere", f"{column} IN ({quoted})").save(path)
        else:
            writer.mode("overwrite").option("partitionOverwriteMode", "dynamic").save(path)

    def merge(self, df: DataFrame, path: str, spec: TableSpec, keys: tuple[str, ...],
              previous_partitions: dict[str, list[str]]) -> None:
        """Delta's MERGE, limited (like the deltalake backend) to the partitions the new rows touch
        plus ``previous_partitions``: Delta then reads only those partitions' files for the join,
        not the whole table (a night's orders touch a month or two of ten years)."""
        from delta.tables import DeltaTable

        condition = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        if spec.partition_by:
            partitions = _merge_partitions(df, spec, previous_partitions)
            if partitions is None:
                return
            column, values = partitions
            quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
            condition = f"t.`{column}` IN ({quoted}) AND {condition}"
        (DeltaTable.forPath(self.spark, path).alias("t").merge(df.alias("s"), condition)
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())


def _jar_dir() -> str:
    from core.jars import jar_dir

    return str(jar_dir())


# --------------------------------------------------------------------------------------------
# Public facade
# --------------------------------------------------------------------------------------------
class Storage:
    """Reads and writes the engine's tables under one warehouse path."""

    def __init__(self, spark: SparkSession, warehouse: str, backend: str = "auto", catalog: str | None = None):
        self.spark = spark
        self.warehouse = warehouse if "://" in warehouse else os.path.abspath(warehouse)
        self.catalog = catalog
        self._registered: set[str] = set()
        if backend == "auto":
            backend = "delta-spark" if has_delta_classes(spark) else "deltalake"
            if backend == "deltalake":
                log.warning("storage backend: deltalake (delta-rs), because this Spark session has no Delta Lake "
                            "jars; `./dev` or `python -m core.jars fetch` puts them in %s", _jar_dir())
        elif backend == "delta-spark" and not has_delta_classes(spark):
            raise StorageError("storage.backend: delta-spark needs Delta Lake's jars in the Spark session; fetch "
                               f"them with `python -m core.jars fetch` (into {_jar_dir()}), or set "
                               "storage.backend: auto to use deltalake without them")
        if backend == "delta-spark":
            self._backend: StorageBackend = _DeltaSparkBackend(spark)
        elif backend == "deltalake":
            self._backend = _DeltaRsBackend(spark)
        else:
            raise StorageError(f"storage.backend: unknown backend {backend!r}")
        if catalog and self._backend.name != "delta-spark":
            raise StorageError(f"storage.catalog: registering tables in {catalog!r} needs the delta-spark backend "
                               "(a Spark catalog with Delta's classes); this session has the deltalake backend")

    @property
    def backend(self) -> str:
        return self._backend.name

    def path(self, name: str) -> str:
        table_spec(name)
        return f"{self.warehouse.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self._backend.exists(self.path(name))

    def read(self, name: str, version: int | None = None,
             partitions: dict[str, Iterable[Any]] | None = None) -> DataFrame:
        """The table (at ``version``); ``partitions`` ({partition column: values}) reads only those
        partitions, pruned from the Delta log before any file is listed."""
        spec = table_spec(name)
        path = self.path(name)
        if not self._backend.exists(path):
            raise StorageError(f"table {name!r} does not exist yet at {path}; run the stage that "
                               "writes it first (see `cvseg --help`)")
        named = None
        if partitions is not None:
            unknown = set(partitions) - set(spec.partition_by)
            if unknown:
                raise StorageError(f"table {name!r} is not partitioned by {sorted(unknown)}")
            named = {k: [str(v) for v in vs] for k, vs in partitions.items()}
        return self._backend.read(path, spec, version, named)

    def read_or_empty(self, name: str) -> DataFrame:
        spec = table_spec(name)
        if not self.exists(name):
            return self.spark.createDataFrame([], spec.schema)
        return self.read(name)

    def version(self, name: str) -> int:
        return self._backend.version(self.path(name))

    def history(self, name: str) -> list[dict[str, Any]]:
        return self._backend.history(self.path(name))

    def appended_since(self, name: str, version: int) -> DataFrame | None:
        """The rows added to the table after ``version`` when every commit since was a plain
        append (so nothing was rewritten or removed); None otherwise. Reads only the new files:
        what incremental stages use to find what changed in a large table."""
        spec = table_spec(name)
        path = self.path(name)
        files = self._backend.files_appended_since(path, version)
        if files is None:
            return None
        if not files:
            return self.spark.createDataFrame([], spec.schema)
        return (self.spark.read.schema(spec.schema).option("basePath", path)
                .option("mergeSchema", "false").parquet(*files).select(*spec.columns))

    def append(self, name: str, df: DataFrame) -> None:
        spec = table_spec(name)
        self._backend.write(conform(df, spec), self.path(name), spec, "append", None)
        self._register(name)

    def overwrite(self, name: str, df: DataFrame) -> None:
        spec = table_spec(name)
        self._backend.write(conform(df, spec), self.path(name), spec, "overwrite", None)
        self._register(name)

    def replace_partitions(self, name: str, df: DataFrame,
                           partitions: dict[str, Iterable[Any]] | None = None) -> None:
        """Replace the partitions present in ``df`` (and any named in ``partitions``, which may be
        emptied that way); every other partition is left as it was."""
        spec = table_spec(name)
        if not spec.partition_by:
            raise StorageError(f"table {name!r} is not partitioned; use overwrite or merge")
        named = {k: [str(v) for v in vs] for k, vs in (partitions or {}).items()}
        self._backend.write(conform(df, spec), self.path(name), spec, "replace_partitions", named)
        self._register(name)

    def merge(self, name: str, df: DataFrame, keys: tuple[str, ...] | None = None,
              previous_partitions: dict[str, Iterable[Any]] | None = None) -> None:
        """Upsert by key: rows of ``df`` replace rows with the same key; other rows stay.

        ``df`` must hold each key once. On a partitioned table the stored copy of a key is looked
        for in the partitions ``df`` writes to plus ``previous_partitions``: a caller whose rows
        may move between partitions (an order re-dated into another month) names the partitions
        their stored copies are in, so the old copy is removed rather than kept twice.
        """
        spec = table_spec(name)
        keys = tuple(keys or spec.keys)
        if not keys:
            raise StorageError(f"table {name!r} has no merge keys")
        new_df = conform(df, spec)
        path = self.path(name)
        if not self._backend.exists(path):
            self._backend.write(new_df, path, spec, "replace_partitions" if spec.partition_by else "overwrite", None)
        else:
            previous = {k: [str(v) for v in vs] for k, vs in (previous_partitions or {}).items()}
            self._backend.merge(new_df, path, spec, keys, previous)
        self._register(name)

    def catalog_name(self, name: str) -> str | None:
        """The table's name in ``storage.catalog`` (``cat.schema.table``), or None without a catalog."""
        return f"{self.catalog}.{name}" if self.catalog else None

    def _register(self, name: str) -> None:
        """Register the table in ``storage.catalog`` as an external Delta table at its path (once per
        process); a name already registered at another location is an error, never silently reused."""
        if not self.catalog or name in self._registered or not self._backend.exists(self.path(name)):
            return
        schema = ".".join(f"`{part}`" for part in self.catalog.split("."))
        table = f"{schema}.`{name}`"
        location = self.path(name)
        self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        self.spark.sql(f"CREATE TABLE IF NOT EXISTS {table} USING DELTA LOCATION '{location.replace(chr(39), chr(92) + chr(39))}'")
        registered = self.spark.sql(f"DESCRIBE DETAIL {table}").select("location").first()[0]

        def normal(uri: str) -> str:
            return uri.removeprefix("file://").removeprefix("file:").rstrip("/")

        if normal(registered) != normal(location):
            raise StorageError(f"storage.catalog: {self.catalog}.{name} is registered at {registered}, not at this "
                               f"warehouse's {location}; use another schema for this warehouse or drop that table")
        self._registered.add(name)
