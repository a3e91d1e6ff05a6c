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

import functools
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

from core.config import S3Conf
from core.errors import UserError
from core.s3 import is_s3
from core.spark import has_delta_classes, sql_settings
from core.tables import TableSpec, conform, table_spec

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"


class StorageError(UserError, RuntimeError):
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

    def columns(self, path: str) -> list[str]:
        """The column names of the table's latest version."""

    def add_columns(self, path: str, fields: list[T.StructField]) -> None:
        """Add nullable columns to the table's schema (a metadata-only commit; older rows read null)."""

    def properties(self, path: str) -> dict[str, str]:
        """The table's properties (its metadata's configuration)."""

    def set_properties(self, path: str, properties: dict[str, str]) -> None:
        """Set table properties (a metadata-only commit)."""

    def write(self, df: DataFrame, path: str, spec: TableSpec, mode: str,
              partitions: dict[str, list[str]] | None, below: dict[str, int] | None = None) -> None:
        """mode: append | overwrite (whole table) | replace_partitions (those in df and ``partitions``,
        and with ``below`` every partition whose number is below that one's)."""

    def merge(self, df: DataFrame, path: str, spec: TableSpec, keys: tuple[str, ...],
              previous_partitions: dict[str, list[str]]) -> None:
        """Upsert by ``keys`` into an existing table (see :meth:`Storage.merge`)."""

    # -- maintenance (pipelines/maintenance.py) -------------------------------------------------
    def file_stats(self, path: str) -> tuple[int, int]:
        """(data files, their bytes) that the latest version references: what a full read opens."""

    def compact(self, path: str, spec: TableSpec) -> dict[str, int]:
        """Rewrite small files into larger ones, same rows (a dataChange=false commit when
        something was rewritten); returns {"files_removed": n, "files_added": m}."""

    def vacuum(self, path: str, retention_hours: int, dry_run: bool) -> list[str]:
        """Delete (``dry_run``: only list) files no version newer than ``retention_hours`` needs:
        removed from the table more than that long ago. Returns those files."""

    def checkpoint(self, path: str) -> bool:
        """Write a checkpoint of the latest version and drop log files past the table's log
        retention; False when this backend cannot do so explicitly (it checkpoints by itself)."""

    def delete_partitions(self, path: str, spec: TableSpec, column: str, values: list[str]) -> int:
        """Remove every file of the partitions ``column`` in ``values`` in one commit (no data file
        is read or rewritten); returns the number of files removed."""


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
            return self.spark.createDataFrame([], spec.stored_schema)
        df = (self.spark.read.schema(spec.stored_schema).option("basePath", path)
              .option("mergeSchema", "false").parquet(*uris))
        return df.select(*spec.stored_columns)

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

    def columns(self, path: str) -> list[str]:
        from deltalake import DeltaTable

        return [field.name for field in DeltaTable(path).schema().fields]

    def add_columns(self, path: str, fields: list[T.StructField]) -> None:
        from deltalake import DeltaTable, Schema

        added = Schema.from_arrow(spark_to_arrow_schema(T.StructType(fields)))
        DeltaTable(path).alter.add_columns(list(added.fields))

    def properties(self, path: str) -> dict[str, str]:
        from deltalake import DeltaTable

        return dict(DeltaTable(path).metadata().configuration or {})

    def set_properties(self, path: str, properties: dict[str, str]) -> None:
        from deltalake import CommitProperties, DeltaTable

        DeltaTable(path).alter.set_table_properties(
            properties, commit_properties=CommitProperties(custom_metadata={"engine_operation": "set_properties"}))

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

        schema = Schema.from_arrow(spark_to_arrow_schema(spec.stored_schema))
        props = CommitProperties(custom_metadata={"engine_operation": operation})
        if not self.exists(path):
            Path(path).mkdir(parents=True, exist_ok=True)
            create_table_with_add_actions(path, schema, [a for a in actions if hasattr(a, "stats")],
                                          mode="error", partition_by=list(spec.partition_by) or None,
                                          name=spec.name, description=spec.description,
                                          configuration=spec.table_properties or None, commit_properties=props)
            return
        DeltaTable(path).create_write_transaction(
            actions, mode=mode, schema=schema, partition_by=list(spec.partition_by) or None,
            partition_filters=partition_filters, commit_properties=props)

    def write(self, df: DataFrame, path: str, spec: TableSpec, mode: str,
              partitions: dict[str, list[str]] | None, below: dict[str, int] | None = None) -> None:
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
        floor = (below or {}).get(column)   # Storage.replace_partitions names partitions with it
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
            value = action.get(f"partition.{column}")
            if str(value) in values or (floor is not None and value is not None and int(value) < floor):
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
        self.write(merged.select(*spec.stored_columns), path, spec, mode, previous)

    # -- maintenance ----------------------------------------------------------------------
    def file_stats(self, path: str) -> tuple[int, int]:
        import pyarrow.compute as pc
        from deltalake import DeltaTable

        actions = pa.table(DeltaTable(path).get_add_actions(flatten=True))
        size = int(pc.sum(actions["size_bytes"]).as_py() or 0) if actions.num_rows else 0
        return actions.num_rows, size

    def compact(self, path: str, spec: TableSpec) -> dict[str, int]:
        from deltalake import CommitProperties, DeltaTable

        metrics = DeltaTable(path).optimize.compact(
            commit_properties=CommitProperties(custom_metadata={"engine_operation": "compact"}))
        return {"files_removed": int(metrics.get("numFilesRemoved", 0)),
                "files_added": int(metrics.get("numFilesAdded", 0))}

    def vacuum(self, path: str, retention_hours: int, dry_run: bool) -> list[str]:
        """delta-rs' default ("lite") vacuum: files whose remove action is older than the
        retention. Its "full" mode is not used: it also deletes files removed within the
        retention (time travel) and files a running write has not committed yet."""
        from deltalake import CommitProperties, DeltaTable

        return list(DeltaTable(path).vacuum(
            retention_hours=int(retention_hours), dry_run=dry_run, enforce_retention_duration=False,
            commit_properties=CommitProperties(custom_metadata={"engine_operation": "vacuum"})))

    def checkpoint(self, path: str) -> bool:
        from deltalake import DeltaTable

        table = DeltaTable(path)
        table.create_checkpoint()
        table.cleanup_metadata()   # log files older than delta.logRetentionDuration (30 days)
        return True

    def delete_partitions(self, path: str, spec: TableSpec, column: str, values: list[str]) -> int:
        """One commit of remove actions, as ``write``'s replace_partitions path without adds."""
        from deltalake import DeltaTable
        from deltalake.transaction import RemoveAction

        wanted = {str(v) for v in values}
        now = int(time.time() * 1000)
        removes = [RemoveAction(path=a["path"], data_change=True, deletion_timestamp=now, size=a["size_bytes"],
                                partition_values={column: str(a[f"partition.{column}"])})
                   for a in pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pylist()
                   if str(a.get(f"partition.{column}")) in wanted]
        if removes:
            self._commit(path, spec, removes, "append", None, "delete_partitions")
        return len(removes)


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
        df = reader.load(path)
        # a version older than a column the engine added later (see Storage._evolve) reads it as null
        df = df.select(*[F.col(f.name) if f.name in df.columns else F.lit(None).cast(f.dataType).alias(f.name)
                         for f in spec.stored_schema.fields])
        for column, values in (partitions or {}).items():
            df = df.where(F.col(column).isin(values))   # Delta prunes the files from its log
        return df

    def _delta_log(self, path: str):
        """Delta's own log object (JVM): its version and commits are read on the driver, without
        the Spark job that ``DeltaTable.history`` runs (~2 s per call on a local session; the
        nightly runner asks every step's tables for their versions before and after)."""
        jvm = self.spark._jvm  # noqa: SLF001 - py4j is the only way to Delta's log
        return jvm, jvm.org.apache.spark.sql.delta.DeltaLog.forTable(self.spark._jsparkSession, path)  # noqa: SLF001

    def _snapshot(self, jvm, log):
        """The log's latest snapshot (read on the driver)."""
        return log.update(False, jvm.scala.Option.empty(), jvm.scala.Option.empty())

    def _latest_version(self, jvm, log) -> int:
        return int(self._snapshot(jvm, log).version())

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

    def columns(self, path: str) -> list[str]:
        return list(self.spark.read.format("delta").load(path).columns)   # from the log: no Spark job

    def add_columns(self, path: str, fields: list[T.StructField]) -> None:
        quoted = path.replace("`", "``")
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in fields)
        self.spark.sql(f"ALTER TABLE delta.`{quoted}` ADD COLUMNS ({columns})")

    def properties(self, path: str) -> dict[str, str]:
        try:
            jvm, delta_log = self._delta_log(path)
            configuration = self._snapshot(jvm, delta_log).metadata().configuration()     # no Spark job
            return dict(jvm.scala.jdk.javaapi.CollectionConverters.asJava(configuration))
        except Exception:  # noqa: BLE001 - an internal API: another Delta release may differ
            from delta.tables import DeltaTable

            row = DeltaTable.forPath(self.spark, path).detail().select("properties").first()
            return dict(row["properties"] or {})

    def set_properties(self, path: str, properties: dict[str, str]) -> None:
        quoted = path.replace("`", "``")
        pairs = ", ".join(f"'{k}' = '{v}'" for k, v in properties.items())
        self.spark.sql(f"ALTER TABLE delta.`{quoted}` SET TBLPROPERTIES ({pairs})")

    def write(self, df: DataFrame, path: str, spec: TableSpec, mode: str,
              partitions: dict[str, list[str]] | None, below: dict[str, int] | None = None) -> None:
        # table properties as options apply when the write creates the table; Delta ignores them on
        # an existing one (maintenance sets them on tables created before: Storage.ensure_properties)
        writer = df.write.format("delta").options(**spec.table_properties)
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        if mode == "append":
            writer.mode("append").save(path)
        elif mode == "overwrite":
            writer.mode("overwrite").option("overwriteSchema", "false").save(path)
        elif partitions and any(partitions.values()):
            (column,) = spec.partition_by
            quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in partitions[column])
            condition = f"{column} IN ({quoted})"
            if (below or {}).get(column) is not None:
                condition += f" OR {column} < {int(below[column])}"
            writer.mode("overwrite").option("replaceWhere", condition).save(path)
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

    # -- maintenance ----------------------------------------------------------------------
    def file_stats(self, path: str) -> tuple[int, int]:
        """From the log's latest snapshot on the driver (~0.01 s; DESCRIBE DETAIL runs a Spark job, ~2-4 s)."""
        try:
            snapshot = self._snapshot(*self._delta_log(path))
            return int(snapshot.numOfFiles()), int(snapshot.sizeInBytes())
        except Exception:  # noqa: BLE001 - an internal API: another Delta release may differ
            from delta.tables import DeltaTable

            row = DeltaTable.forPath(self.spark, path).detail().select("numFiles", "sizeInBytes").first()
            return int(row["numFiles"] or 0), int(row["sizeInBytes"] or 0)

    def compact(self, path: str, spec: TableSpec) -> dict[str, int]:
        from delta.tables import DeltaTable

        metrics = DeltaTable.forPath(self.spark, path).optimize().executeCompaction().first()["metrics"]
        return {"files_removed": int(metrics["numFilesRemoved"]), "files_added": int(metrics["numFilesAdded"])}

    def vacuum(self, path: str, retention_hours: int, dry_run: bool) -> list[str]:
        """A dry run lists the files with ``VACUUM ... DRY RUN``; a real one deletes them with
        DeltaTable.vacuum (which returns nothing) and returns what left the table's folder.

        Delta refuses a retention below the table's deletedFileRetentionDuration (168 h) unless
        its safety check is off, and lists the folder with
        spark.sql.sources.parallelPartitionDiscovery.parallelism tasks (10,000 unless set: ~100 s
        per table on a 2-core machine); both are set for this call only, the listing to the
        session's default parallelism when nobody set it."""
        from delta.tables import DeltaTable

        settings = {}
        if retention_hours < 168:
            settings["spark.databricks.delta.retentionDurationCheck.enabled"] = "false"
        listing = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
        if self.spark.conf.get(listing, None) is None:
            settings[listing] = str(max(1, self.spark.sparkContext.defaultParallelism))
        with sql_settings(self.spark, settings):
            if dry_run:
                quoted = path.replace("`", "``")
                return [r["path"] for r in self.spark.sql(
                    f"VACUUM delta.`{quoted}` RETAIN {int(retention_hours)} HOURS DRY RUN").collect()]
            before = self._data_files(path)
            DeltaTable.forPath(self.spark, path).vacuum(float(retention_hours))
            return sorted(before - self._data_files(path))

    def checkpoint(self, path: str) -> bool:
        """delta-spark has no public checkpoint call: it writes one every delta.checkpointInterval
        (10) commits and then drops log files past delta.logRetentionDuration. Delta 4.0's JVM
        DeltaLog can do both now (checkpointAndCleanUpDeltaLog); where that internal API is not
        there (another Delta build, e.g. Databricks'), False: the automatic checkpoints remain."""
        try:
            jvm, delta_log = self._delta_log(path)
            delta_log.checkpointAndCleanUpDeltaLog(self._snapshot(jvm, delta_log), jvm.scala.Option.empty())
            return True
        except Exception as exc:  # noqa: BLE001 - py4j raises several types for a missing method
            log.info("no explicit Delta checkpoint for %s (%s); delta-spark checkpoints every "
                     "delta.checkpointInterval commits by itself", path, exc)
            return False

    def delete_partitions(self, path: str, spec: TableSpec, column: str, values: list[str]) -> int:
        """DELETE on the partition column only: Delta removes whole files from its log."""
        from delta.tables import DeltaTable

        dtype = spec.stored_schema[column].dataType
        table = DeltaTable.forPath(self.spark, path)
        table.delete(F.col(column).isin([F.lit(v).cast(dtype) for v in values]))
        last = table.history(1).first()
        if last["operation"] != "DELETE":
            return 0
        return int((last["operationMetrics"] or {}).get("numRemovedFiles", 0))

    def _data_files(self, path: str) -> set[str]:
        """Every file under the table's folder but the log and hidden ones (a driver-side listing)."""
        jvm = self.spark.sparkContext._jvm  # noqa: SLF001 - Hadoop's FileSystem has no Python API
        root = jvm.org.apache.hadoop.fs.Path(path)
        fs = root.getFileSystem(self.spark.sparkContext._jsc.hadoopConfiguration())  # noqa: SLF001
        prefix = fs.makeQualified(root).toString().rstrip("/") + "/"
        files, listing = set(), fs.listFiles(root, True)
        while listing.hasNext():
            name = listing.next().getPath().toString()
            relative = name[len(prefix):] if name.startswith(prefix) else name
            if not any(part.startswith(("_", ".")) for part in relative.split("/")):
                files.add(name)
        return files


def _jar_dir() -> str:
    from core.jars import jar_dir

    return str(jar_dir())


# --------------------------------------------------------------------------------------------
# Public facade
# --------------------------------------------------------------------------------------------
#: A table as its declaration (``ORDERS``) or its name (``"orders"``): the facade takes either.
TableRef = TableSpec | str


def _by_name(method):
    """A :class:`Storage` method that takes its table (first argument) as a :class:`TableSpec` or a name."""
    @functools.wraps(method)
    def by_name(self, table: TableRef, *args, **kwargs):
        return method(self, table.name if isinstance(table, TableSpec) else table, *args, **kwargs)
    return by_name


class Storage:
    """Reads and writes the engine's tables under one warehouse path."""

    def __init__(self, spark: SparkSession, warehouse: str, backend: str = "auto", catalog: str | None = None,
                 s3: S3Conf | None = None):
        self.spark = spark
        self.warehouse = warehouse if "://" in warehouse else os.path.abspath(warehouse)
        self.catalog = catalog
        self.s3 = s3 or S3Conf()   # the export's boto3 client uses the same endpoint and retries
        self._registered: set[str] = set()
        self._schema_checked: set[str] = set()
        # Tables this object has seen exist. The engine never drops a table, so the answer stays
        # true and is not asked again: on S3 each backend check is a HEAD and a LIST, and a night
        # asked ~110 times for ~25 tables (bench/s3_requests.py). A missing table is asked again
        # every time (another process may create it).
        self._existing: set[str] = set()
        remote = "://" in self.warehouse and not self.warehouse.startswith("file:")
        if remote and backend == "deltalake":
            # the deltalake backend moves Spark's files into place and commits on local paths
            raise StorageError(f"storage.backend: deltalake writes local folders only, not {self.warehouse}; "
                               "set storage.backend: delta-spark (or auto) for a warehouse on "
                               + ("S3" if is_s3(self.warehouse) else "a remote file system"))
        if backend == "auto":
            backend = "delta-spark" if has_delta_classes(spark) else "deltalake"
            if backend == "deltalake" and remote:
                raise StorageError(f"the warehouse {self.warehouse} needs the delta-spark backend, and this Spark "
                                   f"session has no Delta Lake jars; fetch them with `python -m core.jars fetch` "
                                   f"(into {_jar_dir()}) or use a session with Delta (EMR, Databricks)")
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

    @_by_name
    def path(self, name: TableRef) -> str:
        table_spec(name)
        return f"{self.warehouse.rstrip('/')}/{name}"

    @_by_name
    def exists(self, name: TableRef) -> bool:
        if name in self._existing:
            return True
        if self._backend.exists(self.path(name)):
            self._existing.add(name)
            return True
        return False

    @_by_name
    def read(self, name: TableRef, version: int | None = None,
             partitions: dict[str, Iterable[Any]] | None = None) -> DataFrame:
        """The table (at ``version``); ``partitions`` ({partition column: values}) reads only those
        partitions, pruned from the Delta log before any file is listed."""
        spec = table_spec(name)
        path = self.path(name)
        if not self.exists(name):
            raise StorageError(f"table {name!r} does not exist yet at {path}; run the stage that "
                               "writes it first (see `cvseg --help`)")
        named = None
        if partitions is not None:
            unknown = set(partitions) - set(spec.partition_by)
            if unknown:
                raise StorageError(f"table {name!r} is not partitioned by {sorted(unknown)}")
            named = {k: [str(v) for v in vs] for k, vs in partitions.items()}
        return self._backend.read(path, spec, version, named)

    @_by_name
    def read_or_empty(self, name: TableRef) -> DataFrame:
        spec = table_spec(name)
        if not self.exists(name):
            return self.spark.createDataFrame([], spec.stored_schema)
        return self.read(name)

    @_by_name
    def version(self, name: TableRef) -> int:
        return self._backend.version(self.path(name))

    @_by_name
    def history(self, name: TableRef) -> list[dict[str, Any]]:
        return self._backend.history(self.path(name))

    @_by_name
    def appended_since(self, name: TableRef, version: int) -> DataFrame | None:
        """The rows added to the table after ``version`` when every commit since was a plain
        append (so nothing was rewritten or removed); None otherwise. Reads only the new files:
        what incremental stages use to find what changed in a large table."""
        spec = table_spec(name)
        path = self.path(name)
        files = self._backend.files_appended_since(path, version)
        if files is None:
            return None
        if not files:
            return self.spark.createDataFrame([], spec.stored_schema)
        return (self.spark.read.schema(spec.stored_schema).option("basePath", path)
                .option("mergeSchema", "false").parquet(*files).select(*spec.stored_columns))

    @_by_name
    def append(self, name: TableRef, df: DataFrame) -> None:
        spec = table_spec(name)
        self._evolve(name)
        self._backend.write(conform(df, spec), self.path(name), spec, "append", None)
        self._register(name)

    @_by_name
    def overwrite(self, name: TableRef, df: DataFrame) -> None:
        spec = table_spec(name)
        self._evolve(name)
        self._backend.write(conform(df, spec), self.path(name), spec, "overwrite", None)
        self._register(name)

    @_by_name
    def replace_partitions(self, name: TableRef, df: DataFrame,
                           partitions: dict[str, Iterable[Any]] | None = None,
                           below: dict[str, int] | None = None) -> None:
        """Replace the partitions present in ``df`` (and any named in ``partitions``, which may be
        emptied that way); every other partition is left as it was. ``below`` ({numeric partition
        column: n}, with ``partitions`` named) also empties every partition under n, in the same
        commit, without the caller reading which exist (a trend table's years that left its window)."""
        spec = table_spec(name)
        if not spec.partition_by:
            raise StorageError(f"table {name!r} is not partitioned; use overwrite or merge")
        named = {k: [str(v) for v in vs] for k, vs in (partitions or {}).items()}
        if below and not (set(below) <= set(named) and all(named[k] for k in below)):
            raise StorageError(f"replace_partitions({name!r}): `below` needs the partitions written named too")
        self._evolve(name)
        self._backend.write(conform(df, spec), self.path(name), spec, "replace_partitions", named, below)
        self._register(name)

    @_by_name
    def merge(self, name: TableRef, df: DataFrame, keys: tuple[str, ...] | None = None,
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
        if not self.exists(name):
            self._backend.write(new_df, path, spec, "replace_partitions" if spec.partition_by else "overwrite", None)
        else:
            self._evolve(name)
            previous = {k: [str(v) for v in vs] for k, vs in (previous_partitions or {}).items()}
            self._backend.merge(new_df, path, spec, keys, previous)
        self._register(name)

    def _evolve(self, name: str) -> None:
        """Before the first write of a process to a table: add the nullable columns its declaration
        in core/tables.py gained since the table was created (a warehouse written by an earlier
        release), so the write keeps the one declared schema. A missing required column is an
        error: its old rows would have no value for it."""
        if name in self._schema_checked:
            return
        path = self.path(name)
        if self.exists(name):
            stored = set(self._backend.columns(path))
            missing = [f for f in table_spec(name).stored_schema.fields if f.name not in stored]
            required = [f.name for f in missing if not f.nullable]
            if required:
                raise StorageError(f"table {name!r} at {path} has no column(s) {required}, which this release "
                                   "requires and cannot fill in for its existing rows; rebuild the table with the "
                                   "stage that writes it (see `cvseg --help`)")
            if missing:
                self._backend.add_columns(path, missing)
                log.info("table %s: added column(s) %s (declared in core/tables.py since it was created; "
                         "existing rows read null)", name, ", ".join(f.name for f in missing))
        self._schema_checked.add(name)

    @_by_name
    def catalog_name(self, name: TableRef) -> str | None:
        """The table's name in ``storage.catalog`` (``cat.schema.table``), or None without a catalog."""
        return f"{self.catalog}.{name}" if self.catalog else None

    def _register(self, name: str) -> None:
        """Register the table in ``storage.catalog`` as an external Delta table at its path (once per
        process); a name already registered at another location is an error, never silently reused."""
        if not self.catalog or name in self._registered or not self.exists(name):
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

    # -- maintenance (pipelines/maintenance.py; `cvseg maintain`) --------------------------------
    @_by_name
    def file_stats(self, name: TableRef) -> tuple[int, int]:
        """(data files, bytes) the table's latest version references: what a full read opens."""
        return self._backend.file_stats(self.path(name))

    @_by_name
    def disk_usage(self, name: TableRef) -> tuple[int, int]:
        """(files, bytes) under the table's folder, Delta log and files of older versions included:
        what the table costs in storage. Listed through Hadoop's file system (local, s3a, dbfs)."""
        jvm = self.spark.sparkContext._jvm  # noqa: SLF001 - Hadoop's FileSystem has no Python API
        hadoop_path = jvm.org.apache.hadoop.fs.Path(self.path(name))
        fs = hadoop_path.getFileSystem(self.spark.sparkContext._jsc.hadoopConfiguration())  # noqa: SLF001
        if not fs.exists(hadoop_path):
            return 0, 0
        summary = fs.getContentSummary(hadoop_path)
        return int(summary.getFileCount()), int(summary.getLength())

    @_by_name
    def partition_values(self, name: TableRef) -> list[str]:
        """The distinct values of the table's partition column in its latest version, as text."""
        spec = table_spec(name)
        if len(spec.partition_by) != 1:
            raise StorageError(f"table {name!r} is not partitioned by one column")
        (column,) = spec.partition_by
        return sorted(str(r[0]) for r in self.read(name).select(column).distinct().collect())

    @_by_name
    def ensure_properties(self, name: TableRef) -> dict[str, str]:
        """Give a table created by an earlier release the properties this one creates it with
        (:attr:`core.tables.TableSpec.table_properties`); returns those it set (a metadata-only
        commit, none when nothing differs). Maintenance calls it: new tables have them already."""
        wanted = table_spec(name).table_properties
        path = self.path(name)
        current = self._backend.properties(path)
        missing = {k: v for k, v in wanted.items() if current.get(k) != v}
        if missing:
            self._backend.set_properties(path, missing)
        return missing

    @_by_name
    def compact(self, name: TableRef) -> dict[str, int]:
        """Rewrite the table's small files into larger ones; the rows read the same."""
        spec = table_spec(name)
        return self._backend.compact(self.path(name), spec)

    @_by_name
    def vacuum(self, name: TableRef, retention_hours: int, dry_run: bool = False) -> list[str]:
        """Delete the files no version of the last ``retention_hours`` needs (``dry_run``: list
        them only); time travel to older versions stops working. Returns those files."""
        if retention_hours < 0:
            raise StorageError(f"vacuum of {name!r}: retention_hours must be 0 or more (got {retention_hours})")
        path = self.path(name)
        files = self._backend.vacuum(path, retention_hours, dry_run)
        if files and not dry_run:
            self._remove_empty_partition_folders(name)
        return files

    @_by_name
    def checkpoint(self, name: TableRef) -> bool:
        """Checkpoint the latest version and drop expired log files; False when the backend cannot
        do it explicitly (delta-spark outside Delta 4.0's JVM API: it checkpoints every 10 commits)."""
        return self._backend.checkpoint(self.path(name))

    @_by_name
    def delete_partitions(self, name: TableRef, partitions: dict[str, Iterable[Any]]) -> int:
        """Remove whole partitions ({partition column: values}) in one commit, reading no data;
        older versions still have them until VACUUM. Returns the number of files removed."""
        spec = table_spec(name)
        ((column, values),) = partitions.items()
        if column not in spec.partition_by:
            raise StorageError(f"table {name!r} is not partitioned by {column!r}")
        values = [str(v) for v in values]
        if not values:
            return 0
        return self._backend.delete_partitions(self.path(name), spec, column, values)

    def _remove_empty_partition_folders(self, name: str) -> None:
        """VACUUM deletes files, not the partition folders they were in (either backend): on a
        local warehouse the emptied ``column=value`` folders go too. Object stores have none."""
        root = self.path(name)
        if "://" in root and not root.startswith("file://"):
            return
        root_path = Path(root.removeprefix("file://"))
        for folder, subfolders, files in os.walk(root_path, topdown=False):
            relative = Path(folder).relative_to(root_path)
            if relative.parts and all("=" in part and not part.startswith(("_", ".")) for part in relative.parts):
                try:
                    os.rmdir(folder)   # only succeeds when empty
                except OSError:
                    pass
