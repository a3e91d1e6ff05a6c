"""The warehouse's run lock: one writing `cvseg` command per warehouse at a time.

Delta tables assume one writer per table at a time on object stores without a conditional put
(see conf/README.md, "Delta on S3"), and the nightly steps assume nobody else is half-way through
the same tables. Two schedulers firing at once (a retried Airflow task beside the original, a
manual `cvseg run` during the night) must therefore not both proceed: the second stops at once
with a message naming the first.

The lock is one small JSON object, ``<warehouse>/_cvseg_run_lock.json``, created with an atomic
put-if-absent:

* local and mounted folders (``/dbfs``, ``/Volumes``): ``open(O_CREAT | O_EXCL)``;
* ``s3://`` / ``s3a://``: S3's conditional write (``PutObject`` with ``If-None-Match: *``), which
  S3 and most S3-compatible stores honour;
* other Hadoop schemes (``dbfs:``, ``abfss://``, ``hdfs://``, ``gs://``): Hadoop's
  ``FileSystem.create(path, overwrite=false)``, atomic on HDFS, ABFS and DBFS.

The holder rewrites its ``heartbeat_at`` while it runs. A lock is stale, and the next run takes it
over with a warning, when its holder's process is gone (same host, pid not running: a killed
driver) or its heartbeat is older than ``storage.lock_stale_minutes`` (a driver lost with its
machine). Taking over is delete + put-if-absent again, so two runs that find the same stale lock
still end with one holder.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from core.errors import CvsegError

log = logging.getLogger(__name__)

LOCK_NAME = "_cvseg_run_lock.json"


class RunLockHeld(CvsegError, RuntimeError):
    """Another writing command holds the warehouse; the message names it and says what to do."""


@dataclass(frozen=True)
class LockHolder:
    command: str            # e.g. "run --as-of 2026-09-30"
    run_id: str
    host: str
    pid: int
    started_at: str         # ISO 8601, UTC
    heartbeat_at: str

    @classmethod
    def this_process(cls, command: str) -> "LockHolder":
        now = _now_iso()
        return cls(command, f"lock-{uuid.uuid4().hex[:12]}", socket.gethostname(), os.getpid(), now, now)

    def describe(self) -> str:
        return (f"`cvseg {self.command}` (pid {self.pid} on {self.host}, started {self.started_at}, "
                f"last heartbeat {self.heartbeat_at})")


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _parse_holder(raw: bytes | None) -> LockHolder | None:
    if not raw:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
        return LockHolder(**{k: data[k] for k in LockHolder.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Where the lock object lives: put-if-absent, read, replace (holder only), delete
# --------------------------------------------------------------------------------------------
class _LocalStore:
    def __init__(self, path: str):
        self.path = path

    def create(self, body: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def replace(self, body: bytes) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(body)
        os.replace(tmp, self.path)

    def delete(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


class _S3Store:
    def __init__(self, uri: str, s3_conf: Any):
        from core.config import S3Conf
        from core.s3 import boto3_client, bucket_and_key

        self.bucket, self.key = bucket_and_key(uri)
        # storage.s3's endpoint and retries; credentials from the standard chain
        self.client = boto3_client(s3_conf or S3Conf())

    def create(self, body: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise

    def read(self) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def replace(self, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body)

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _HadoopStore:
    """Through the session's Hadoop FileSystem (dbfs:, abfss://, hdfs://, gs://)."""

    def __init__(self, uri: str, spark: Any):
        jvm = spark.sparkContext._jvm  # noqa: SLF001 - Hadoop's FileSystem has no Python API
        self._jvm = jvm
        self._path = jvm.org.apache.hadoop.fs.Path(uri)
        self._fs = self._path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # noqa: SLF001

    def _write(self, body: bytes, overwrite: bool) -> None:
        stream = self._fs.create(self._path, overwrite)
        try:
            stream.write(bytearray(body))
        finally:
            stream.close()

    def create(self, body: bytes) -> bool:
        try:
            self._write(body, False)
            return True
        except Exception as exc:  # noqa: BLE001 - py4j wraps FileAlreadyExistsException
            if "FileAlreadyExists" in str(exc) or self._fs.exists(self._path):
                return False
            raise

    def read(self) -> bytes | None:
        if not self._fs.exists(self._path):
            return None
        stream = self._fs.open(self._path)
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def replace(self, body: bytes) -> None:
        self._write(body, True)

    def delete(self) -> None:
        self._fs.delete(self._path, False)


def lock_uri(warehouse: str) -> str:
    return warehouse.rstrip("/") + "/" + LOCK_NAME


def needs_spark(warehouse: str) -> bool:
    """Whether the lock of this warehouse goes through Hadoop (a session must exist first)."""
    if warehouse.startswith(("s3://", "s3a://", "file:")):
        return False
    return ":" in warehouse.split("/", 1)[0]     # dbfs:/, abfss://, hdfs://, gs://


def _store(warehouse: str, spark: Any = None, s3_conf: Any = None):
    uri = lock_uri(warehouse)
    if uri.startswith(("s3://", "s3a://")):
        return _S3Store(uri, s3_conf)
    if needs_spark(warehouse):
        if spark is None:
            raise ValueError(f"the run lock on {warehouse} needs the Spark session (Hadoop file system)")
        return _HadoopStore(uri, spark)
    return _LocalStore(uri[len("file://"):] if uri.startswith("file://") else os.path.abspath(uri))


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------
class RunLock:
    """Hold with ``with RunLock(...):``; raises :class:`RunLockHeld` when another live command holds it."""

    def __init__(self, warehouse: str, command: str, *, spark: Any = None, s3_conf: Any = None,
                 stale_after: dt.timedelta = dt.timedelta(minutes=30), heartbeat_seconds: float | None = None):
        self.warehouse = warehouse
        self.uri = lock_uri(warehouse)
        self.store = _store(warehouse, spark, s3_conf)
        self.holder = LockHolder.this_process(command)
        self.stale_after = stale_after
        # several heartbeats within the stale window, at most one a minute
        self.heartbeat_seconds = heartbeat_seconds or max(1.0, min(60.0, stale_after.total_seconds() / 5))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _body(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=1).encode("utf-8")

    def stale_reason(self, other: LockHolder) -> str | None:
        """Why ``other``'s lock may be taken over, or None while it is alive."""
        if other.host == socket.gethostname() and not _pid_alive(other.pid):
            return f"its process {other.pid} on {other.host} is no longer running"
        try:
            beat = dt.datetime.fromisoformat(other.heartbeat_at)
        except ValueError:
            return "its heartbeat time is unreadable"
        age = dt.datetime.now(dt.timezone.utc) - beat
        if self.stale_after.total_seconds() > 0 and age > self.stale_after:
            return (f"its last heartbeat is {age.total_seconds() / 60:.0f} minutes old "
                    f"(storage.lock_stale_minutes={self.stale_after.total_seconds() / 60:.0f})")
        return None

    def acquire(self) -> None:
        for attempt in range(3):
            if self.store.create(self._body()):
                return self._hold()
            raw = self.store.read()
            other = _parse_holder(raw)
            if other is None:
                if raw is None:
                    continue                       # released meanwhile: try again
                time.sleep(0.2 * (attempt + 1))    # created but not yet written by its holder
                other = _parse_holder(self.store.read())
                if other is None:
                    raise RunLockHeld(
                        f"the warehouse lock {self.uri} exists but is unreadable; if no cvseg command is "
                        "running on this warehouse, delete that object and run again")
            if other.run_id == self.holder.run_id:
                # our own put went through but its answer was lost (an S3 5xx or timeout, then
                # the SDK's retry found the object): we hold it
                return self._hold()
            reason = self.stale_reason(other)
            if reason is None:
                raise RunLockHeld(
                    f"another cvseg command is writing this warehouse: {other.describe()}. This one stops "
                    f"without touching any table. Run again when it has finished; if it is gone, its lock "
                    f"({self.uri}) is taken over once its heartbeat is older than storage.lock_stale_minutes.")
            # on stdout, in the run's own progress lines: the night's log shows who was taken over
            print(f"warning: taking over the warehouse lock of {other.describe()}: {reason}", flush=True)
            self.store.delete()
        raise RunLockHeld(f"could not take the warehouse lock {self.uri}: other commands keep taking it")

    def _hold(self) -> None:
        self.held = True
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_seconds):
                try:
                    current = _parse_holder(self.store.read())
                    if current is None or current.run_id != self.holder.run_id:
                        log.error("the warehouse lock %s was taken over by another command", self.uri)
                        return
                    self.holder = LockHolder(**{**asdict(self.holder), "heartbeat_at": _now_iso()})
                    self.store.replace(self._body())
                except Exception:  # noqa: BLE001 - a missed beat is retried; staleness needs many
                    log.warning("could not renew the warehouse lock %s", self.uri, exc_info=True)

        self._thread = threading.Thread(target=beat, name="cvseg-run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.held:
            return
        self.held = False
        try:
            current = _parse_holder(self.store.read())
            if current is not None and current.run_id == self.holder.run_id:   # never delete another's lock
                self.store.delete()
        except Exception:  # noqa: BLE001 - the command's own outcome (or error) is what to report
            # left behind, the lock is taken over by the next command: this process is gone then
            log.warning("could not remove the warehouse lock %s; the next command takes it over",
                        self.uri, exc_info=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a killed child not yet reaped by its parent is a zombie: gone for our purposes
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True
