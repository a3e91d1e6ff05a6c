"""Export: the daily customer -> segment CSV, one row per customer, to a local folder or S3.

How an export goes (no customer row ever reaches the driver's memory):

1. :func:`export_rows` joins ``customer_scores`` as of D with ``segments_current``, formats the
   numbers as fixed-point text and sorts by the exported id, so Spark writes ordered part files.
2. Spark writes the part files in parallel (header-less CSV) into a staging folder; an
   :class:`~pyspark.sql.Observation` counts rows and generations in the same pass.
3. The driver concatenates the part files in partition order into ONE file, streaming bytes
   (file I/O, not a collect) and computing sha256 and size as it goes.
4. Publish: local - into ``<dest>/.<name>.<uuid>.tmp``, then ``os.replace`` to the final name;
   S3 - ``upload_file`` (multipart above ``export.multipart_chunk_mb``) to a temporary key, a managed
   server-side copy to the final key, the temporary key deleted. The manifest JSON (rows, sha256,
   as-of date, generation, engine version, columns) is written last, the same way. File names
   depend only on the as-of date, so re-exporting a date replaces the files, never duplicates them.

S3 credentials come only from boto3's standard chain (environment, profile, instance role).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from pyspark.sql import Column, DataFrame, Observation
from pyspark.sql import functions as F

from core.config import ExportConf, S3Conf
from core.errors import UserError
from core.results import StageResult
from core.storage import Storage

log = logging.getLogger(__name__)

#: The export's columns, in order; ``predicted_value`` is the value over models.horizon_months.
EXPORT_COLUMNS = ("customer_id", "segment", "generation_id", "predicted_value", "p_alive")
HMAC_BLOCK_SIZE = 64   # SHA-256 block size in bytes (RFC 2104)
_CHUNK = 8 * 1024 * 1024


class ExportError(UserError, RuntimeError):
    """The export cannot be made or delivered; the message says what to fix."""


# --------------------------------------------------------------------------------------------
# Column functions and transforms (no I/O)
# --------------------------------------------------------------------------------------------
def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """RFC 2104 inner and outer padded keys for HMAC-SHA256."""
    if len(key) > HMAC_BLOCK_SIZE:
        key = hashlib.sha256(key).digest()
    key = key.ljust(HMAC_BLOCK_SIZE, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def hmac_sha256_hex(value: Column, inner_pad: Column, outer_pad: Column) -> Column:
    """HMAC-SHA256 of the UTF-8 bytes of value as lower-case hex, from the key's padded forms
    (:func:`hmac_pads`), with native Spark functions (sha2 over binary concatenations), so no
    Python UDF runs per row."""
    inner_hash = F.unhex(F.sha2(F.concat(inner_pad, F.encode(value, "UTF-8")), 256))
    return F.sha2(F.concat(outer_pad, inner_hash), 256)


def with_hmac_pads(df: DataFrame, key: bytes) -> DataFrame:
    """Add the key's padded forms as columns ``_hmac_inner`` / ``_hmac_outer``. They come from a
    one-row frame joined in, not from literals: a literal is printed in every query plan (the
    Spark UI, event logs, errors), and the pads are as good as the key."""
    inner, outer = hmac_pads(key)
    pads_df = df.sparkSession.createDataFrame([(bytearray(inner), bytearray(outer))],
                                              "_hmac_inner binary, _hmac_outer binary")
    return df.crossJoin(F.broadcast(pads_df))


def export_header(export_conf: ExportConf, horizon_months: int = 6) -> list[str]:
    """The header line's names: ``export.header`` where set, else the column's own name (the value
    column named after the horizon: predicted_value_6m)."""
    default = {"predicted_value": f"predicted_value_{horizon_months}m"}
    return [export_conf.header.get(key, default.get(key, key)) for key in EXPORT_COLUMNS]


def source_id_column(source_name: str) -> str:
    """The export column holding a customer's ids in one source (``export.source_ids``)."""
    return f"{source_name}_customer_ids"


def source_ids_by_customer(identity_df: DataFrame, source_names: list[str],
                           hmac_key: bytes | None = None) -> DataFrame:
    """(customer_id, one column per source: its ids there, sorted, "|"-joined; null when none) from
    IDENTITY_MAP rows; with ``hmac_key`` each source id is pseudonymised like the customer id."""
    source_id = F.col("source_customer_id")
    if hmac_key is not None:
        identity_df = with_hmac_pads(identity_df, hmac_key)
        source_id = hmac_sha256_hex(source_id, F.col("_hmac_inner"), F.col("_hmac_outer"))
    ids_df = identity_df.select("customer_id", "source_name", source_id.alias("_id"))
    return ids_df.groupBy("customer_id").agg(*[
        F.nullif(F.concat_ws("|", F.array_sort(F.collect_list(F.when(F.col("source_name") == name, F.col("_id"))))),
                 F.lit("")).alias(source_id_column(name))
        for name in source_names])


def export_rows(scores_df: DataFrame, segments_df: DataFrame, as_of_date: dt.date,
                hmac_key: bytes | None = None, labels: dict[str, str] | None = None,
                source_ids_df: DataFrame | None = None) -> DataFrame:
    """One row per customer scored as of D: id, segment, generation, value over the horizon, p_alive
    (then, with ``source_ids_df`` from :func:`source_ids_by_customer`, the customer's ids per source).

    Segments are those currently assigned and valid from D or earlier; a customer scored but not
    (yet) segmented keeps an empty segment rather than being dropped; ``labels`` (segments.labels)
    replace segment names by the client's words. Numbers are fixed-point text so the file does not
    depend on Spark's float formatting (no 1.0E-5).
    """
    scores = scores_df.where(F.col("as_of_date") == F.lit(as_of_date)).select(
        "customer_id", "predicted_net_value", "p_alive")
    segments = segments_df.where(F.col("valid_from") <= F.lit(as_of_date)).select(
        "customer_id", "segment", "generation_id")
    joined_df = scores.join(segments, on="customer_id", how="left")
    extra_columns: list[str] = []
    if source_ids_df is not None:
        joined_df = joined_df.join(source_ids_df, on="customer_id", how="left")
        extra_columns = [c for c in source_ids_df.columns if c != "customer_id"]
    exported_id = F.col("customer_id")
    if hmac_key is not None:
        joined_df = with_hmac_pads(joined_df, hmac_key)
        exported_id = hmac_sha256_hex(exported_id, F.col("_hmac_inner"), F.col("_hmac_outer"))
    segment = F.col("segment")
    if labels:
        label_map = F.create_map(*[F.lit(x) for pair in sorted(labels.items()) for x in pair])
        segment = F.coalesce(F.element_at(label_map, segment), segment)
    return (joined_df
            .select(exported_id.alias("customer_id"), segment.alias("segment"), F.col("generation_id"),
                    F.format_string("%.2f", F.col("predicted_net_value")).alias("predicted_value"),
                    F.format_string("%.6f", F.col("p_alive")).alias("p_alive"), *extra_columns)
            .orderBy("customer_id"))


# --------------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Destination:
    uri: str
    bucket: str | None = None      # S3 only
    prefix: str = ""               # S3 key prefix, "" or ending in "/"
    folder: Path | None = None     # local only

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def location(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}" if self.is_s3 else str(self.folder / name)


def parse_destination(uri: str) -> Destination:
    if uri.startswith("s3a://") or uri.startswith("s3n://"):
        uri = "s3://" + uri.split("://", 1)[1]
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise ExportError(f"export destination {uri!r} has no bucket; use s3://bucket/prefix/")
        prefix = prefix.strip("/")
        return Destination(uri=uri, bucket=bucket, prefix=f"{prefix}/" if prefix else "")
    if "://" in uri and not uri.startswith("file://"):
        raise ExportError(f"export destination {uri!r}: use a local folder or s3://bucket/prefix/")
    return Destination(uri=uri, folder=Path(uri.removeprefix("file://")).resolve())


def file_names(prefix: str, as_of_date: dt.date, date_format: str = "%Y-%m-%d") -> tuple[str, str]:
    stem = f"{prefix}_{as_of_date.strftime(date_format)}"
    return f"{stem}.csv", f"{stem}.manifest.json"


def csv_header(names: list[str]) -> str:
    """One CSV line of names, quoted as the rows are (RFC 4180) where a name needs it."""
    quoted = ['"' + n.replace('"', '""') + '"' if any(c in n for c in ',"\r\n') else n for n in names]
    return ",".join(quoted) + "\n"


class _Transcoder:
    """UTF-8 (what Spark writes) to the export's encoding, block by block. A character the target
    cannot encode stops the export naming the customer, the column and the character: a file
    with '?' in place of a name would be worse than none."""

    def __init__(self, encoding: str, names: list[str]):
        import codecs

        self.encoding, self.names = encoding, names
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def __call__(self, block: bytes, final: bool = False) -> bytes:
        text = self.decoder.decode(block, final)
        try:
            return text.encode(self.encoding)
        except UnicodeEncodeError as exc:
            raise self._error(text, exc) from None

    def _error(self, text: str, exc: UnicodeEncodeError) -> ExportError:
        import csv

        start = text.rfind("\n", 0, exc.start) + 1
        end = text.find("\n", exc.start)
        line = text[start:end if end >= 0 else len(text)]
        char = text[exc.start]
        fields = next(csv.reader([line]), [])
        column = next((name for name, value in zip(self.names, fields) if char in value), "?")
        where = ("the header" if fields == self.names
                 else f"the row of customer {fields[0] if fields else '?'!r}")
        return ExportError(
            f"{where} holds {char!r} (U+{ord(char):04X}) in column {column!r}, which {self.encoding} cannot "
            f"encode; change that text (segments.labels, export.header) or set export.encoding: utf-8-sig")


def hmac_key_from_env(variable: str, needed_by: str = "export.pseudonymise_ids is on",
                      alternative: str = "set export.pseudonymise_ids=false",
                      error: type[Exception] = ExportError) -> bytes:
    """The export's HMAC key (also the identity step's, for its matching keys) from the environment."""
    value = os.environ.get(variable)
    if not value:
        raise error(f"{needed_by} but the environment variable {variable} (export.hmac_key_env) is not set "
                    f"or empty; export the key in that variable, or {alternative}")
    return value.encode("utf-8")


def s3_client(endpoint_url: str | None, s3: S3Conf | None = None):
    """boto3 S3 client with storage.s3's endpoint, addressing and retries (``endpoint_url``,
    export.s3_endpoint_url, overrides the endpoint); credentials from boto3's standard chain only."""
    from core.s3 import boto3_client

    return boto3_client(s3 or S3Conf(), endpoint_url)


def _transfer_config(chunk_mb: int):
    from boto3.s3.transfer import TransferConfig

    size = chunk_mb * 1024 * 1024
    return TransferConfig(multipart_threshold=size, multipart_chunksize=size)


# --------------------------------------------------------------------------------------------
# Part files -> one file
# --------------------------------------------------------------------------------------------
def _local_parts(folder: Path) -> list[Path]:
    if not (folder / "_SUCCESS").exists():
        raise ExportError(f"Spark did not finish writing the export parts in {folder} (no _SUCCESS)")
    return sorted(folder.glob("part-*"))   # part-00000, part-00001 ...: partition order = sort order


def _s3_parts(client, bucket: str, prefix: str) -> Iterator[BinaryIO]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    if not any(k.rsplit("/", 1)[-1] == "_SUCCESS" for k in keys):
        raise ExportError(f"Spark did not finish writing the export parts in s3://{bucket}/{prefix} (no _SUCCESS)")
    for key in sorted(k for k in keys if k.rsplit("/", 1)[-1].startswith("part-")):
        yield client.get_object(Bucket=bucket, Key=key)["Body"]


@dataclass
class Assembled:
    sha256: str
    bytes: int
    lines: int


def _write_parts(df: DataFrame, folder: str) -> None:
    """Header-less UTF-8 CSV part files, joined later by :func:`assemble` after one header line."""
    (df.write.mode("errorifexists")
     .option("header", False).option("encoding", "UTF-8").option("lineSep", "\n")
     .option("quote", '"').option("escape", '"')   # RFC 4180: a quote inside a field is doubled
     .option("ignoreLeadingWhiteSpace", False).option("ignoreTrailingWhiteSpace", False)
     .csv(folder))


def assemble(parts: Iterator[BinaryIO] | list[Path], header: str, out: BinaryIO, encoding: str = "utf-8",
             names: list[str] | None = None) -> Assembled:
    """Concatenate UTF-8 part files after a header into ``encoding`` (utf-8-sig: a BOM first;
    cp932: transcoded), streaming; sha256, size and line count of what was written on the way."""
    digest = hashlib.sha256()
    size = lines = 0
    convert = _Transcoder(encoding, names or []) if encoding == "cp932" else None

    def emit(block: bytes, final: bool = False) -> None:
        nonlocal size, lines
        if convert is not None:
            block = convert(block, final)
        out.write(block)
        digest.update(block)
        size += len(block)
        lines += block.count(b"\n")

    if encoding == "utf-8-sig":
        emit(b"\xef\xbb\xbf")
    emit(header.encode("utf-8"))
    for part in parts:
        stream = part.open("rb") if isinstance(part, Path) else part
        try:
            last = b""
            while block := stream.read(_CHUNK):
                emit(block)
                last = block
            if last and not last.endswith(b"\n"):
                emit(b"\n")
        finally:
            stream.close()
    emit(b"", final=True)
    return Assembled(sha256=digest.hexdigest(), bytes=size, lines=lines)


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------
def _write_local_atomic(folder: Path, name: str, fill) -> Any:
    """Write through a temporary name in the same folder, fsync, rename over the final name."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as handle:
            result = fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def _upload_s3_atomic(client, local: Path, dest: Destination, name: str, chunk_mb: int) -> None:
    """Upload to a temporary key, copy server-side to the final key, delete the temporary key."""
    from botocore.exceptions import BotoCoreError, ClientError

    from boto3.exceptions import Boto3Error

    config = _transfer_config(chunk_mb)
    tmp_key = f"{dest.prefix}_tmp_{uuid.uuid4().hex}_{name}.tmp"
    final_key = f"{dest.prefix}{name}"
    uploaded = False
    try:
        # a failed upload_file aborts its own multipart upload: nothing to clean up then
        client.upload_file(str(local), dest.bucket, tmp_key, Config=config)
        uploaded = True
        client.copy({"Bucket": dest.bucket, "Key": tmp_key}, dest.bucket, final_key, Config=config)
    except (Boto3Error, BotoCoreError, ClientError) as exc:
        raise ExportError(f"upload to {dest.location(name)} failed: {_first_line(exc)}; check that the bucket "
                          "exists and that boto3's credentials (environment, profile or instance role) may "
                          "write to it") from exc
    finally:
        if uploaded:
            try:
                client.delete_object(Bucket=dest.bucket, Key=tmp_key)
            except (BotoCoreError, ClientError):
                log.warning("could not delete temporary object s3://%s/%s", dest.bucket, tmp_key)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _put_s3(client, dest: Destination, name: str, body: bytes) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.put_object(Bucket=dest.bucket, Key=f"{dest.prefix}{name}", Body=body,
                          ContentType="application/json")
    except (BotoCoreError, ClientError) as exc:
        raise ExportError(f"writing {dest.location(name)} failed: {_first_line(exc)}") from exc


# --------------------------------------------------------------------------------------------
# Stage runner
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult(StageResult):
    """The CSV and manifest :func:`publish_export` wrote (``file`` / ``manifest``: paths or s3:// URIs)."""
    as_of_date: dt.date
    rows: int
    sha256: str
    bytes: int
    generation_id: int | None
    customers_without_segment: int
    file: str
    manifest: str

    def summary_line(self) -> str:
        return f"{self.rows:,} rows -> {self.file} (sha256 {self.sha256[:12]}...)"


def run_export(storage: Storage, as_of_date: dt.date, export_conf: ExportConf, dest: str | None = None,
               engine_version: str | None = None, horizon_months: int = 6,
               labels: dict[str, str] | None = None) -> ExportResult:
    """Write ``<prefix>_<D>.csv`` and its manifest to ``dest`` (default ``export.dest``);
    ``horizon_months`` names the value column, ``labels`` (segments.labels) name the segments."""
    destination = parse_destination(dest or export_conf.dest)
    hmac_key = hmac_key_from_env(export_conf.hmac_key_env) if export_conf.pseudonymise_ids else None
    for table, verb in (("customer_scores", "cvseg score"), ("segments_current", "cvseg run (segments step)")):
        try:
            present = storage.exists(table)
        except KeyError:
            present = False
        if not present:
            raise ExportError(f"table {table} does not exist yet; run `{verb} --as-of {as_of_date}` first")
    source_ids_df, names = None, export_header(export_conf, horizon_months)
    if export_conf.source_ids:
        if not storage.exists("identity_map"):
            raise ExportError("export.source_ids needs identity_map, written by the identity step (several "
                              "`sources` or `identity` settings); set export.source_ids: false for one source")
        identity_df = storage.read("identity_map")
        source_names = sorted(r[0] for r in identity_df.select("source_name").distinct().collect())   # a few
        source_ids_df = source_ids_by_customer(identity_df, source_names, hmac_key)
        names += [source_id_column(name) for name in source_names]
    rows_df = export_rows(storage.read("customer_scores"), storage.read("segments_current"), as_of_date, hmac_key,
                          labels, source_ids_df)
    try:
        return publish_export(rows_df, as_of_date, export_conf, destination, pseudonymised=hmac_key is not None,
                              engine_version=engine_version, names=names,
                              labels=labels, s3_conf=getattr(storage, "s3", None),
                              purchase_basis=scores_by_basis(storage, as_of_date))
    except ExportError:
        from pipelines.maintenance import ensure_not_pruned

        ensure_not_pruned(storage, "customer_scores", as_of_date)   # no rows because retention pruned D?
        raise


def scores_by_basis(storage: Storage, as_of_date: dt.date) -> dict[str, int]:
    """Customers scored as of D per purchase basis (gross | net | net_rule): a few rows to the driver.
    Scores written before the basis existed were on gross orders."""
    scores_df = storage.read("customer_scores").where(F.col("as_of_date") == F.lit(as_of_date))
    counts = (scores_df.groupBy(F.coalesce(F.col("purchase_basis"), F.lit("gross")).alias("basis"))
              .count().collect())
    return {row["basis"]: int(row["count"]) for row in counts}


def publish_export(rows_df: DataFrame, as_of_date: dt.date, export_conf: ExportConf,
                   destination: Destination, pseudonymised: bool = False,
                   engine_version: str | None = None, names: list[str] | None = None,
                   labels: dict[str, str] | None = None, s3_conf: S3Conf | None = None,
                   purchase_basis: dict[str, int] | None = None) -> ExportResult:
    """Write ``rows_df`` (the columns of :data:`EXPORT_COLUMNS`, then any per-source id columns,
    sorted) as one CSV + manifest,
    with ``names`` in the header (default :func:`export_header`)."""
    from core import __version__

    names = names or export_header(export_conf)
    csv_name, manifest_name = file_names(export_conf.file_prefix, as_of_date, export_conf.date_format)
    observation = Observation("export")
    observed_df = rows_df.observe(
        observation, F.count(F.lit(1)).alias("rows"),
        F.count_if(F.col("segment").isNull()).alias("without_segment"),
        F.min("generation_id").alias("generation_min"), F.max("generation_id").alias("generation_max"))
    run_token = uuid.uuid4().hex
    s3 = s3_client(export_conf.s3_endpoint_url, s3_conf) if destination.is_s3 else None
    scratch = Path(tempfile.mkdtemp(prefix="cvseg-export-"))
    staging = (f"{export_conf.staging_dir.rstrip('/')}/{run_token}" if export_conf.staging_dir
               else str(scratch / "parts"))
    try:
        _write_parts(observed_df, staging)
        metrics = observation.get
        rows = int(metrics["rows"])
        if rows == 0:
            raise ExportError(f"customer_scores has no rows for {as_of_date}; run `cvseg score --as-of {as_of_date}` first")
        header = csv_header(names)
        if staging.startswith("s3://"):
            bucket, _, key_prefix = staging[5:].partition("/")
            staging_client = s3 or s3_client(export_conf.s3_endpoint_url, s3_conf)
            parts: Any = lambda: _s3_parts(staging_client, bucket, key_prefix.rstrip("/") + "/")  # noqa: E731
        else:
            part_paths = _local_parts(Path(staging.removeprefix("file://")))
            parts = lambda: part_paths  # noqa: E731


        def fill(handle: BinaryIO) -> Assembled:
            joined = assemble(parts(), header, handle, export_conf.encoding, names)
            if joined.lines - 1 < rows:   # quoted line breaks can only add lines, never remove them
                raise ExportError(f"the joined export holds {joined.lines - 1} lines but Spark wrote {rows} rows; "
                                  "the part files in the staging folder were changed while exporting")
            return joined   # checked before the file gets its final name

        if destination.is_s3:
            local = scratch / csv_name
            with open(local, "wb") as handle:
                assembled = fill(handle)
        else:
            assembled = _write_local_atomic(destination.folder, csv_name, fill)
        generation = metrics["generation_max"]
        manifest = {
            "file": csv_name, "rows": rows, "sha256": assembled.sha256, "bytes": assembled.bytes,
            "as_of_date": as_of_date.isoformat(), "generation_id": generation,
            "generation_ids_span": [metrics["generation_min"], generation],
            "customers_without_segment": int(metrics["without_segment"]),
            "columns": names, "column_keys": rows_df.columns, "encoding": export_conf.encoding,
            "header": True, "segment_labels": dict(labels or {}),
            "customer_id": "hmac-sha256-hex" if pseudonymised else "raw",
            # which orders the value model saw: gross | net (net_rule: only cancelled, placed by rule)
            "purchase_basis": (("net" if "gross" not in purchase_basis else "gross") if purchase_basis else None),
            "customers_by_purchase_basis": dict(sorted((purchase_basis or {}).items())),
            "engine_version": engine_version or __version__,
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        body = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
        if destination.is_s3:
            _upload_s3_atomic(s3, local, destination, csv_name, export_conf.multipart_chunk_mb)
            _put_s3(s3, destination, manifest_name, body)   # last: the manifest commits the export
        else:
            _write_local_atomic(destination.folder, manifest_name, lambda handle: handle.write(body))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if export_conf.staging_dir:
            _remove_staging(staging, s3, export_conf.s3_endpoint_url, s3_conf)
    return ExportResult(as_of_date, rows, assembled.sha256, assembled.bytes, generation,
                        manifest["customers_without_segment"], file=destination.location(csv_name),
                        manifest=destination.location(manifest_name))


def write_csv_file(df: DataFrame, path: Path, encoding: str = "utf-8") -> Assembled:
    """Any DataFrame as ONE local CSV file with a header: Spark writes the part files in parallel,
    they are joined in partition order by streaming bytes (no row reaches the driver's memory), and
    the file gets its name only when whole. Maps, arrays and structs are written as JSON text."""
    from pyspark.sql import types as T

    columns = [F.to_json(F.col(f.name)).alias(f.name)
               if isinstance(f.dataType, (T.MapType, T.ArrayType, T.StructType)) else F.col(f.name)
               for f in df.schema.fields]
    scratch = Path(tempfile.mkdtemp(prefix="cvseg-csv-"))
    try:
        _write_parts(df.select(*columns), str(scratch / "parts"))
        parts = _local_parts(scratch / "parts")
        return _write_local_atomic(path.parent, path.name,
                                   lambda handle: assemble(parts, csv_header(df.columns), handle, encoding, df.columns))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_staging(staging: str, client, endpoint_url: str | None, s3_conf: S3Conf | None = None) -> None:
    if staging.startswith("s3://"):
        bucket, _, prefix = staging[5:].partition("/")
        client = client or s3_client(endpoint_url, s3_conf)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
    else:
        shutil.rmtree(staging.removeprefix("file://"), ignore_errors=True)
