"""Reading a client's export (the I/O edge of ingest): CSV / parquet / Delta with each row's file and
position, the files a source lists, and the checks that make a bad path or mapping a clear error."""
from __future__ import annotations

import difflib
import glob
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence
from urllib.parse import unquote

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import SourceConf
from core.spark import sql_settings
from core.storage import Storage
from core.tables import INGESTED_FILES
from pipelines.ingest.summary import IngestError
from pipelines.ingest.transforms import source_col

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# Reading the source (edge: I/O)
# --------------------------------------------------------------------------------------------
# Exports labelled Shift_JIS nearly always carry the Windows extensions (①, ㈱, 髙) and Java's
# "cp932" is IBM-942, not the Windows code page: read all of them as windows-31j.
_JAVA_CHARSETS = {"cp932": "windows-31j", "ms932": "windows-31j", "windows-31j": "windows-31j",
                  "shift_jis": "windows-31j", "shift-jis": "windows-31j", "sjis": "windows-31j",
                  "utf8": "UTF-8", "utf-8-sig": "UTF-8"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_LINE_SEP_FREE = "\u0001"   # a delimiter that never occurs: one column holding the whole line


@dataclass
class Source:
    df: DataFrame                # _s0.._sN, _src_file, _src_block, _src_pos, _src_key, _is_malformed,
                                 # _line (see _with_positions)
    names: list[str]             # the source column names, in order
    exact_positions: bool        # True: _src_pos is the row index in the file (parquet)
    # CSV only, for the malformed_row message: where the expected field count comes from ("the
    # header", "source.csv.column_names") and the fields of a line (an expression of ``_line``,
    # evaluated on the few malformed rows only).
    names_from: str | None = None
    field_count: Column | None = None


_SPARK_CHARSETS = {"iso-8859-1", "us-ascii", "utf-16", "utf-16be", "utf-16le", "utf-32", "utf-8"}
_LEGACY_CHARSETS = "spark.sql.legacy.javaCharsets"


@contextmanager
def java_charsets(spark: SparkSession, source: SourceConf) -> Iterator[None]:
    """Spark 4 reads only a short list of charsets unless the legacy flag is on; windows-31j (cp932)
    needs it for the duration of the run (set back afterwards)."""
    needs_flag = (source.format == "csv"
                  and _JAVA_CHARSETS.get(source.csv.encoding.strip().lower(), source.csv.encoding).lower()
                  not in _SPARK_CHARSETS)
    with sql_settings(spark, {_LEGACY_CHARSETS: "true"} if needs_flag else {}):
        yield


def _java_charset(spark: SparkSession, encoding: str) -> str:
    name = _JAVA_CHARSETS.get(encoding.strip().lower(), encoding.strip())
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - asking the JVM which charsets it knows
    try:
        ok = bool(jvm.java.nio.charset.Charset.isSupported(name))
    except Exception:  # noqa: BLE001 - illegal charset names raise
        ok = False
    if not ok:
        raise IngestError(f"source.csv.encoding: unknown encoding {encoding!r}; use utf-8, cp932 or shift_jis")
    return name


def _check_exists(path: str | list[str]) -> None:
    """Fail early and clearly for local paths; remote paths are checked by Spark (PATH_NOT_FOUND)."""
    if isinstance(path, list):   # files just listed by list_source_files
        return
    local = path[len("file:"):] if path.startswith("file:") else path
    if _SCHEME.match(path) and not path.startswith("file:"):
        return
    if any(ch in local for ch in "*?["):
        if not glob.glob(local):
            raise IngestError(f"no file matches the source path {path}; check source.path or --path")
        return
    if "{" not in local and not os.path.exists(local):
        raise IngestError(f"the source file or folder {path} does not exist; check source.path or --path")


def _with_positions(df: DataFrame, names: list[str], exact: bool, *, columns: Sequence[str] | None = None,
                    malformed: Column | None = None, line: Column | None = None,
                    names_from: str | None = None, field_count: Column | None = None) -> Source:
    """Rename source columns to _s0.._sN and add the row's file and position.

    ``columns``: the columns of ``df`` holding the source columns (default: ``names``). CSV
    readers also pass ``malformed`` (the row's field count is not the expected one) and ``line``
    (the row as read); they become ``_is_malformed`` (never null; False for parquet/Delta) and
    ``_line`` (null unless the row is malformed). On a raw CSV scan both come from Spark's
    corrupt-record column: a query reading only them (no source column) is refused by Spark.
    ``names_from`` and ``field_count`` are kept on the :class:`Source` for messages.
    """
    pos = F.col("_metadata.row_index") if exact else F.monotonically_increasing_id()
    block = F.lit(0).cast("bigint") if exact else F.col("_metadata.file_block_start")
    file_path = F.col("_metadata.file_path")   # a URI; decoded once per split on the driver
    quoted = ["`" + n.replace("`", "``") + "`" for n in (columns if columns is not None else names)]
    is_malformed = F.lit(False) if malformed is None else F.coalesce(malformed, F.lit(False))
    out = df.select(*[F.col(q).alias(source_col(i)) for i, q in enumerate(quoted)],
                    file_path.alias("_src_file"), block.alias("_src_block"), pos.alias("_src_pos"),
                    is_malformed.alias("_is_malformed"),
                    (F.when(is_malformed, line) if line is not None else F.lit(None)).cast("string").alias("_line"))
    key = F.monotonically_increasing_id() if exact else F.col("_src_pos")   # CSV: the position is the id
    return Source(out.withColumn("_src_key", key), list(names), exact, names_from, field_count)


def _regex_literal(text: str) -> str:
    """``text`` as a Java regex matching it literally (every non-alphanumeric escaped)."""
    return "".join(c if c.isalnum() else "\\" + c for c in text)


def _delimited_field_count(line: Column, delimiter: str, quote: str) -> Column:
    """Fields of a delimited line: delimiters outside quoted parts + 1 (a backslash escape is
    honoured inside quotes; RFC 4180 doubled quotes split into two adjacent quoted parts, which
    count the same). For the message on malformed rows, not for detection."""
    if quote:
        q = _regex_literal(quote)
        line = F.regexp_replace(line, f"{q}(?:[^{q}\\\\]|\\\\.)*{q}", "")
    return F.size(F.split(line, _regex_literal(delimiter), -1))


def unused_name(base: str, taken: Sequence[str]) -> str:
    """``base``, or ``base`` with more leading underscores, not in ``taken`` (in any case)."""
    lowered = {t.lower() for t in taken}
    name = base
    while name.lower() in lowered:
        name = "_" + name
    return name


def _read_csv(spark: SparkSession, path: str, source: SourceConf) -> Source:
    csv = source.csv
    encoding = _java_charset(spark, csv.encoding)
    reader = (spark.read.option("encoding", encoding).option("mode", "PERMISSIVE")
              .option("quote", csv.quote).option("escape", csv.escape).option("multiLine", "false"))
    if csv.delimiter == "whitespace":
        # Fixed-width style exports (CDNOW): read each line whole, split on runs of blanks.
        line_df = (reader.option("sep", _LINE_SEP_FREE).option("quote", "").option("header", csv.header)
                   .option("enforceSchema", "true").schema("line string").csv(path))
        names = list(csv.column_names)
        if not names:
            if not csv.header:
                raise IngestError("source.csv.column_names is empty: a file without a header needs the column "
                                  "names, e.g. column_names: [customer_id, order_date, amount]")
            first = (reader.option("sep", _LINE_SEP_FREE).option("quote", "").option("header", "false")
                     .schema("line string").csv(path).limit(1).collect())
            names = first[0]["line"].split() if first and first[0]["line"] else []
            if not names:
                raise IngestError(f"{path}: the file is empty (no header, no data rows)")
        def words(line: Column) -> Column:
            return F.split(F.regexp_replace(line, r"^\s+|\s+$", ""), r"\s+")

        def word_count(line: Column) -> Column:
            return F.when(line.rlike(r"^\s*$"), F.lit(0)).otherwise(F.size(words(line)))

        fields = words(F.col("line"))
        # a line with more or fewer words than columns is malformed (a blank in a value, a cut
        # line): the words cannot be matched to columns. Same split as the values, no extra parse.
        split_df = line_df.select("*", word_count(F.col("line")).alias("_words"),
                                  *[F.try_element_at(fields, F.lit(i + 1)).alias(f"_w{i}")
                                    for i in range(len(names))])
        return _with_positions(split_df, names, exact=False, columns=[f"_w{i}" for i in range(len(names))],
                               malformed=F.col("_words") != len(names), line=F.col("line"),
                               names_from="source.csv.column_names" if csv.column_names else "the header",
                               field_count=word_count(F.col("_line")))
    delimiter = {"tab": "\t", "\\t": "\t"}.get(csv.delimiter, csv.delimiter)
    reader = reader.option("sep", delimiter)
    if csv.column_names:
        names = list(csv.column_names)
        header_options = {"header": csv.header, "enforceSchema": "true"}
        names_from = "source.csv.column_names"
    else:
        # Every column is read as text (bad values stay visible). The names are what Spark makes
        # of the first line (it reads only that line); enforceSchema=false makes Spark check every
        # file's header against them.
        names = list(reader.option("header", csv.header).option("enforceSchema", "false").csv(path).columns)
        header_options = {"header": csv.header, "enforceSchema": "false"}
        names_from = "the header" if csv.header else "the first line"
    if not names:
        raise IngestError(f"{path}: the file is empty (no header, no data rows)")
    # Spark flags a row whose field count differs from the schema (too many: the extra fields
    # are dropped; too few: the missing ones are null) only when the schema has a corrupt-record
    # column, which then holds the line; the column is null on well-formed rows.
    corrupt = unused_name("_corrupt_record", names)
    schema = T.StructType([T.StructField(n, T.StringType()) for n in names]
                          + [T.StructField(corrupt, T.StringType())])
    df = (reader.options(**header_options).option("columnNameOfCorruptRecord", corrupt)
          .schema(schema).csv(path))
    return _with_positions(df, names, exact=False, malformed=F.col(corrupt).isNotNull(), line=F.col(corrupt),
                           names_from=names_from,
                           field_count=_delimited_field_count(F.col("_line"), delimiter, csv.quote))


def _read_parquet_like(spark: SparkSession, path: str | list[str], fmt: str) -> Source:
    if fmt == "delta":
        from core.spark import has_delta_classes

        if has_delta_classes(spark):
            df = spark.read.format("delta").load(path)
            try:
                df.select("_metadata.row_index").schema  # noqa: B018 - probe: analysis only
                return _with_positions(df, list(df.columns), exact=True)
            except Exception:  # noqa: BLE001 - older Delta: fall back to split ordinals
                return _with_positions(df, list(df.columns), exact=False)
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            uris = DeltaTable(path).file_uris()
        except TableNotFoundError:
            raise IngestError(f"{path} is not a Delta table (no _delta_log); check source.path "
                              "or source.format") from None
        if not uris:
            raise IngestError(f"{path}: the Delta table has no data files (no data rows)")
        df = _with_nanosecond_timestamps(spark.read.parquet(*uris))
    else:
        df = _with_nanosecond_timestamps(spark.read.parquet(*([path] if isinstance(path, str) else path)))
    return _with_positions(df, list(df.columns), exact=True)


def _with_nanosecond_timestamps(df: DataFrame) -> DataFrame:
    """Nanosecond parquet timestamps (what pandas 2 writes) as Spark timestamps (microseconds).

    Spark 4.0 cannot read TIMESTAMP(NANOS); the session reads them as long nanoseconds
    (``spark.sql.legacy.parquet.nanosAsLong``, set by :func:`core.spark.build_spark`), and the
    columns the first file's footer declares as such are converted here: naive ones to
    TIMESTAMP_NTZ (wall time, as microsecond naive timestamps are read), zoned ones to TIMESTAMP.
    Only one footer is read, on the driver.
    """
    nanos = _nanosecond_timestamp_columns(df)
    if not nanos:
        return df
    columns = []
    for name in df.columns:
        if name not in nanos or not isinstance(df.schema[name].dataType, T.LongType):
            columns.append(F.col(name))
            continue
        quoted = f"`{name.replace('`', '``')}`"
        # floor division: nanoseconds -> microseconds, also before 1970
        micros = F.expr(f"timestamp_micros({quoted} div 1000 - IF({quoted} % 1000 < 0, 1, 0))")
        columns.append((micros.cast(T.TimestampNTZType()) if nanos[name] is None else micros).alias(name))
    return df.select(*columns)


def _nanosecond_timestamp_columns(df: DataFrame) -> dict[str, str | None]:
    """{column: time zone or None} of the nanosecond timestamps in the first input file's footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    if not any(isinstance(f.dataType, T.LongType) for f in df.schema.fields):
        return {}
    files = df.inputFiles()
    if not files:
        return {}
    uri = files[0]
    if _SCHEME.match(uri) and not uri.startswith("file:"):
        # s3a://, s3:// (EMRFS), dbfs:/ ...: the footer read through Spark's own file system, with
        # the session's endpoint and credentials (pyarrow would know neither)
        try:
            return _nanosecond_columns_from_jvm(df.sparkSession, uri)
        except Exception as exc:  # noqa: BLE001 - py4j raises several types
            log.warning("could not read the parquet footer of %s to find nanosecond timestamps (%s); "
                        "such columns stay long integers", uri, _first_line(exc))
            return {}
    try:
        filesystem, file_path = fs.FileSystem.from_uri(uri)
        schema = pq.read_schema(unquote(file_path), filesystem=filesystem)
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("could not read the parquet footer of %s to find nanosecond timestamps (%s); "
                    "such columns stay long integers", uri, exc)
        return {}
    return {field.name: field.type.tz for field in schema
            if pa.types.is_timestamp(field.type) and field.type.unit == "ns"}


def _nanosecond_columns_from_jvm(spark: SparkSession, uri: str) -> dict[str, str | None]:
    """As :func:`_nanosecond_timestamp_columns` for a remote file: parquet-hadoop's footer reader
    on Hadoop's file system. UTC-adjusted nanosecond timestamps map to "UTC", local ones to None."""
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - the footer through the session's file systems
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))
    reader = jvm.org.apache.parquet.hadoop.ParquetFileReader.open(
        jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(path, hadoop_conf))
    try:
        fields = reader.getFooter().getFileMetaData().getSchema().getFields()
    finally:
        reader.close()
    found: dict[str, str | None] = {}
    for field in fields:
        annotation = field.getLogicalTypeAnnotation()
        if (annotation is not None and annotation.getClass().getSimpleName() == "TimestampLogicalTypeAnnotation"
                and annotation.getUnit().toString() == "NANOS"):
            found[field.getName()] = "UTC" if annotation.isAdjustedToUTC() else None
    return found


def read_source(spark: SparkSession, path: str | list[str], source: SourceConf) -> Source:
    """Open the export lazily (only the header or footers are read here); ``path`` is the configured
    file, folder or glob, or a list of files (the new ones, :func:`list_source_files`)."""
    from pyspark.errors import AnalysisException

    _check_exists(path)
    try:
        if source.format == "csv":
            return _read_csv(spark, path, source)
        return _read_parquet_like(spark, path, source.format)
    except AnalysisException as exc:
        condition = exc.getCondition() or ""
        if condition == "PATH_NOT_FOUND":
            raise IngestError(f"the source file or folder {path} does not exist; check source.path "
                              "or --path") from None
        if condition in ("UNABLE_TO_INFER_SCHEMA",):
            raise IngestError(f"{path}: no data to read (empty file or folder)") from None
        raise IngestError(f"cannot read {path} as {source.format}: {_first_line(exc)}") from exc


@dataclass(frozen=True)
class SourceFile:
    """One file of the export as the file system describes it."""
    uri: str                 # what the reader is given (a decoded Hadoop path)
    path: str                # as stored in orders.source_file
    size: int
    modified_ms: int         # modification time, epoch milliseconds

    @property
    def key(self) -> tuple[str, int, int]:
        """A file is "already ingested" when this matches: same path, size and modification time."""
        return self.path, self.size, self.modified_ms


def list_source_files(spark: SparkSession, src: Source) -> list[SourceFile] | None:
    """The files the source reader reads (Spark's own listing), with size and modification time:
    file-system metadata only, no data. None when the session has no JVM gateway (Spark Connect),
    where the files cannot be described and every file is read."""
    try:
        jvm = spark.sparkContext._jvm  # noqa: SLF001 - Hadoop FileSystem status of each file
        hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    except Exception:  # noqa: BLE001 - Spark Connect has no sparkContext
        log.warning("cannot list source files on this session (no JVM gateway): every file is read")
        return None
    files = []
    for uri in src.df.inputFiles():
        hadoop_path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))
        status = hadoop_path.getFileSystem(hadoop_conf).getFileStatus(hadoop_path)
        name = status.getPath().toString()
        files.append(SourceFile(name, local_path(name), int(status.getLen()), int(status.getModificationTime())))
    return sorted(files, key=lambda f: f.path)


def spark_file_paths(spark: SparkSession, files: list[SourceFile]) -> dict[str, str]:
    """File path -> the name Spark's ``_metadata.file_path`` gives its rows (a URI-encoded Hadoop
    path: file:/x/a%20b.csv)."""
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - Hadoop's own encoding of the path
    return {f.path: str(jvm.org.apache.hadoop.fs.Path(f.uri).toUri().toString()) for f in files}


def ingested_file_keys(storage: Storage) -> set[tuple[str, int, int]]:
    """(path, size, modification ms) of every file committed before: one small row per file."""
    if not storage.exists(INGESTED_FILES):
        return set()
    rows = storage.read(INGESTED_FILES).select(
        "source_file", "file_size", F.unix_millis("modified_at").alias("modified_ms")).collect()
    return {(r["source_file"], int(r["file_size"]), int(r["modified_ms"])) for r in rows}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def action_error(exc: Exception, path: str, source: SourceConf) -> IngestError:
    """Turn a failure while scanning the data into a message that says what to fix."""
    text = str(exc)
    if "CSV header does not conform to the schema" in text or "does not conform to the schema" in text:
        found = re.search(r"CSV file: (\S+)", text)
        return IngestError(
            f"a file under {path} has a different header from the first file"
            + (f" ({found.group(1)})" if found else "")
            + "; every file of one ingest must have the same columns. Detail: "
            + " ".join(text.split("\n")[0:3])[:600])
    if "MalformedInput" in text or "UnmappableCharacter" in text or "CharacterCodingException" in text:
        return IngestError(f"{path}: the file cannot be decoded as {source.csv.encoding}; try "
                           "source.csv.encoding: cp932 (Shift_JIS exports) or utf-8")
    if "INVALID_DATETIME_PATTERN" in text or "DATETIME_PATTERN" in text or "Illegal pattern" in text:
        return IngestError(f"source.timestamp_format or source.timestamp_formats_extra is not a valid Spark "
                           f"datetime pattern (e.g. yyyy/MM/dd HH:mm:ss): {_first_line(exc)}")
    if "FileNotFoundException" in text or "PATH_NOT_FOUND" in text:
        return IngestError(f"a file under {path} disappeared while it was read: {_first_line(exc)}")
    return IngestError(f"reading {path} failed: {_first_line(exc)}")


def check_mapping(names: Sequence[str], source: SourceConf, path: str) -> None:
    """Every mapped column must be in the header; otherwise say which, what was found, and what is close."""
    mapping = source.columns.model_dump()
    missing = {canon: col for canon, col in mapping.items() if col is not None and col not in names}
    if not missing:
        return
    lines = [f"{path}: the header does not contain the mapped column(s) "
             + ", ".join(f"{col!r} (source.columns.{canon})" for canon, col in missing.items()) + "."]
    lines.append("  columns found: " + ", ".join(repr(n) for n in names))
    for canon, col in missing.items():
        close = difflib.get_close_matches(col, list(names), n=3, cutoff=0.5)
        if close:
            lines.append(f"  did you mean {' or '.join(repr(c) for c in close)} for source.columns.{canon}?")
    lines.append("  change source.columns.<field> in your conf to the export's column names.")
    if any("\ufffd" in n for n in names):
        lines.append("  the header holds undecodable characters: the file is probably not "
                     f"{source.csv.encoding}; try source.csv.encoding: cp932")
    if len(names) == 1 and any(d in names[0] for d in (",", ";", "\t", "|")):
        lines.append(f"  only one column was found: is source.csv.delimiter ({source.csv.delimiter!r}) right?")
    raise IngestError("\n".join(lines))


def local_path(uri: str) -> str:
    """Spark's file URI -> the path a user recognises (file:/x/a%20b.csv -> /x/a b.csv)."""
    return unquote(re.sub(r"^file:(//)?", "", uri))
