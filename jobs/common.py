"""What every entry point shares: --conf/--set, config loading, session and storage, error exits."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

from core.config import Config, load_config
from core.errors import UserError


class UsageError(UserError, ValueError):
    """The command line asks for something that cannot be done; the message says what to change."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conf", metavar="PATH", help="YAML layered on conf/base.yaml and the env file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set features.time_unit=weeks (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; use YYYY-MM-DD") from None


def config_from(args: argparse.Namespace) -> Config:
    return load_config(args.conf, args.overrides)


def build_session(config: Config):
    from core.s3 import is_s3
    from core.spark import build_spark

    paths = (config.storage.warehouse, *(s.path for s in config.order_sources), config.identity.map,
             config.export.staging_dir)
    return build_spark(config.spark, config.storage.warehouse, s3=any(is_s3(p) for p in paths),
                       s3_conf=config.storage.s3)


def build_storage(config: Config, spark):
    from core.storage import Storage

    return Storage(spark, config.storage.warehouse, config.storage.backend, config.storage.catalog,
                   s3=config.storage.s3)


def open_warehouse(args: argparse.Namespace, config: Config):
    """Session and storage for a verb that writes tables, holding the warehouse's run lock
    (core/run_lock.py) until the verb returns: a second writer stops at once, before its JVM
    starts when the lock needs no Hadoop file system."""
    from core.run_lock import RunLock, needs_spark

    command = " ".join([args.verb, *_command_words(args)])
    lock_kwargs = dict(s3_conf=config.storage.s3,
                       stale_after=dt.timedelta(minutes=config.storage.lock_stale_minutes))
    spark = None
    if needs_spark(config.storage.warehouse):
        spark = build_session(config)
        lock_kwargs["spark"] = spark
    lock = RunLock(config.storage.warehouse, command, **lock_kwargs)
    _exit_stack(args).enter_context(lock)
    spark = spark or build_session(config)
    return spark, build_storage(config, spark)


def _command_words(args: argparse.Namespace) -> list[str]:
    """The verb's date argument, to name the holder in a concurrent run's message."""
    for name in ("as_of", "run_date", "cutoff"):
        value = getattr(args, name, None)
        if value is not None:
            return [f"--{name.replace('_', '-')} {value}"]
    return []


def _exit_stack(args: argparse.Namespace) -> ExitStack:
    if getattr(args, "exit_stack", None) is None:
        args.exit_stack = ExitStack()
    return args.exit_stack


def today_in(timezone: str) -> dt.date:
    from zoneinfo import ZoneInfo

    return dt.datetime.now(ZoneInfo(timezone)).date()


@contextmanager
def step(name: str) -> Iterator[None]:
    """Print a progress line with the step's wall time."""
    started = time.perf_counter()
    print(f"[{name}] ...", flush=True)
    yield
    print(f"[{name}] done in {time.perf_counter() - started:.1f}s", flush=True)


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what to fix: printed without a traceback, exit code 2."""
    return (UserError, FileNotFoundError)


def run_main(func, args: argparse.Namespace) -> int:
    """Run a verb; known errors become one clear line and exit code 2, anything else exit code 1."""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from core.run_lock import RunLockHeld

    try:
        with _exit_stack(args):        # releases the run lock (open_warehouse) however the verb ends
            func(args)
        return 0
    except RunLockHeld as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 3                       # another command holds the warehouse: nothing was done
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        if args.debug:
            raise
        if isinstance(exc, known_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from core.s3 import s3_error_summary

        s3_error = s3_error_summary(exc)
        if s3_error:   # S3 down or throttling beyond the retries: nothing to fix here but to wait
            print(f"error: {s3_error} (the S3 retries of storage.s3 were used up); nothing after the last "
                  "committed write was kept: once S3 answers again, re-run the same command (`cvseg run` "
                  "resumes after its last committed step)", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(exc).__name__}: {exc}\n(run again with --debug for the traceback)",
              file=sys.stderr)
        return 1
