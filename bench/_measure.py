"""Benchmark helpers: wall time per step and peak resident memory of the driver and the JVM."""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def use_engine_imports() -> None:
    """Take bench/ off the import path and put the repository root first: bench/ holds scripts
    named like engine packages (bench/models.py), and ``import models`` must find the engine's
    package. Call it after importing the bench helpers, before importing the engine."""
    bench = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != bench]
    sys.path.insert(0, str(bench.parent))


@dataclass
class PeakMemory:
    """Samples RSS of this Python process (driver) and its child processes (the Spark JVM, Python
    workers) in a background thread; psutil's RSS is a point reading, so peaks are sampled maxima."""

    interval: float = 0.1
    driver_peak: int = 0
    jvm_peak: int = 0
    workers_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            try:
                driver = me.memory_info().rss
                jvm = workers = 0
                for child in me.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                        if "java" in child.name():
                            jvm += rss
                        else:
                            workers += rss
                    except psutil.Error:
                        continue
                self.driver_peak = max(self.driver_peak, driver)
                self.jvm_peak = max(self.jvm_peak, jvm)
                self.workers_peak = max(self.workers_peak, workers)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def reset(self) -> None:
        self.driver_peak = self.jvm_peak = self.workers_peak = 0

    def summary(self) -> str:
        gib = 1024 ** 3
        return (f"peak RSS driver {self.driver_peak / gib:.2f} GiB, JVM {self.jvm_peak / gib:.2f} GiB, "
                f"python workers {self.workers_peak / gib:.2f} GiB")


class Timer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []
        self.peaks: list[tuple[str, float, float, int, int]] = []   # name, s, -, driver, jvm bytes

    @contextmanager
    def step(self, name: str, memory: PeakMemory | None = None):
        if memory:
            memory.reset()
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        note = memory.summary() if memory else ""
        self.rows.append((name, seconds, note))
        if memory:
            self.peaks.append((name, seconds, 0.0, memory.driver_peak, memory.jvm_peak))
        print(f"{name:<28} {seconds:8.1f} s   {note}", flush=True)

    def record(self, name: str, seconds: float, note: str = "", driver_peak: int = 0) -> None:
        """A step measured elsewhere (a child process) added as if timed here."""
        self.rows.append((name, seconds, note))
        self.peaks.append((name, seconds, 0.0, driver_peak, 0))
        print(f"{name:<28} {seconds:8.1f} s   {note}", flush=True)

    def total(self, *names: str) -> float:
        return sum(s for n, s, _ in self.rows if not names or n in names)


def warehouse_arguments(parser, default_repeats: int) -> None:
    """The arguments of a bench that runs on a ``bench/pipeline.py`` warehouse with its champion."""
    import datetime as dt

    parser.add_argument("--conf", default=str(Path(__file__).resolve().parent.parent / "conf/examples/synthetic.yaml"))
    parser.add_argument("--date", type=dt.date.fromisoformat, default=dt.date(2026, 10, 1))
    parser.add_argument("--repeats", type=int, default=default_repeats)
    parser.add_argument("--driver-memory", default="12g")


def champion_session(args):
    """(config, champion bundle, its version, Spark session, Storage) for ``args`` of
    :func:`warehouse_arguments` plus ``--warehouse``; call after :func:`use_engine_imports`."""
    import pipelines.ltv as ltv
    from core import tracking
    from core.config import load_config
    from jobs.common import build_session, build_storage

    config = load_config(args.conf, [f"storage.warehouse={args.warehouse}", f"spark.driver_memory={args.driver_memory}"])
    target = tracking.tracking_target(config)
    tracking.start(target)
    bundle, version = ltv.load_champion(target.registered_model)
    spark = build_session(config)
    return config, bundle, version, spark, build_storage(config, spark)
