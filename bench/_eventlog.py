"""Per-step cluster figures from a Spark event log (``spark.eventLog.enabled``, uncompressed JSON lines).

Every job the nightly run starts carries the job group ``cvseg:<step>`` (pipelines.nightly.step_job_group);
a stage belongs to the group of the first job that lists it; each ``SparkListenerTaskEnd`` adds its
task metrics to its stage's step. Failed task attempts are counted (and their time too: a cluster
pays for them) with their end reason.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: Settings that make a session write an event log this module can read.
def event_log_settings(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {"spark.eventLog.enabled": "true", "spark.eventLog.dir": folder.resolve().as_uri(),
            "spark.eventLog.compress": "false", "spark.eventLog.rolling.enabled": "false"}


@dataclass
class StepFigures:
    tasks: int = 0
    failed_tasks: int = 0
    task_seconds: float = 0.0            # executor run time (the Spark UI's "Duration" of tasks)
    cpu_seconds: float = 0.0
    gc_seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0
    shuffle_read_bytes: int = 0          # local + remote
    shuffle_remote_bytes: int = 0
    shuffle_write_bytes: int = 0
    memory_spill_bytes: int = 0
    disk_spill_bytes: int = 0
    peak_execution_memory: int = 0       # largest single task
    failure_reasons: Counter = field(default_factory=Counter)
    executors: set = field(default_factory=set)

    def add(self, event: dict) -> None:
        info = event.get("Task Info", {})
        metrics = event.get("Task Metrics") or {}
        reason = (event.get("Task End Reason") or {}).get("Reason", "Success")
        self.tasks += 1
        self.executors.add(info.get("Executor ID"))
        if info.get("Failed") or reason != "Success":
            self.failed_tasks += 1
            self.failure_reasons[reason] += 1
        self.task_seconds += metrics.get("Executor Run Time", 0) / 1000
        self.cpu_seconds += metrics.get("Executor CPU Time", 0) / 1e9
        self.gc_seconds += metrics.get("JVM GC Time", 0) / 1000
        self.input_bytes += (metrics.get("Input Metrics") or {}).get("Bytes Read", 0)
        self.output_bytes += (metrics.get("Output Metrics") or {}).get("Bytes Written", 0)
        read = metrics.get("Shuffle Read Metrics") or {}
        self.shuffle_remote_bytes += read.get("Remote Bytes Read", 0)
        self.shuffle_read_bytes += read.get("Remote Bytes Read", 0) + read.get("Local Bytes Read", 0)
        self.shuffle_write_bytes += (metrics.get("Shuffle Write Metrics") or {}).get("Shuffle Bytes Written", 0)
        self.memory_spill_bytes += metrics.get("Memory Bytes Spilled", 0)
        self.disk_spill_bytes += metrics.get("Disk Bytes Spilled", 0)
        self.peak_execution_memory = max(self.peak_execution_memory, metrics.get("Peak Execution Memory", 0))


def read_events(path: Path):
    """The events of a log; a running application's log (``.inprogress``) may end in a line being
    written, which is left out."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if path.name.endswith(".inprogress"):
                    return
                raise


def figures_by_group(path: Path, prefix: str = "cvseg:",
                     windows: list[tuple[str, float, float]] | None = None) -> dict[str, StepFigures]:
    """Job group (minus ``prefix``; ``other`` for jobs outside any step) -> summed task figures.

    With ``windows`` (label, start, end in epoch seconds), the key is ``"<label>: <step>"`` for
    the window the job was submitted in (jobs outside every window are left out)."""
    stage_group: dict[int, str | None] = {}
    out: dict[str, StepFigures] = defaultdict(StepFigures)
    for event in read_events(path):
        kind = event.get("Event")
        if kind == "SparkListenerJobStart":
            group = (event.get("Properties") or {}).get("spark.jobGroup.id") or ""
            name = group.removeprefix(prefix) if group.startswith(prefix) else "other"
            if windows is not None:
                submitted = event.get("Submission Time", 0) / 1000
                label = next((w for w, start, end in windows if start <= submitted <= end), None)
                name = f"{label}: {name}" if label else None
            for stage in event.get("Stage IDs", []):
                stage_group.setdefault(stage, name)
        elif kind == "SparkListenerTaskEnd":
            key = stage_group.get(event.get("Stage ID"), "other" if windows is None else None)
            if key is not None:
                out[key].add(event)
    return dict(out)


def app_log(folder: Path, app_id: str) -> Path:
    """The event log file of one application (``<app id>`` or ``<app id>.inprogress``)."""
    for candidate in (folder / app_id, folder / f"{app_id}.inprogress"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no event log for {app_id} in {folder}")


def task_intervals(path: Path) -> list[tuple[float, float]]:
    """(launch, finish) in epoch seconds of every task attempt in the log."""
    out = []
    for event in read_events(path):
        if event.get("Event") == "SparkListenerTaskEnd":
            info = event.get("Task Info") or {}
            launch, finish = info.get("Launch Time", 0) / 1000, info.get("Finish Time", 0) / 1000
            if finish >= launch > 0:
                out.append((launch, finish))
    return out


def busy_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] during which at least one task ran (the union of the task intervals)."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    busy, current_start, current_end = 0.0, None, None
    for a, b in clipped:
        if current_end is None or a > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = a, b
        else:
            current_end = max(current_end, b)
    if current_end is not None:
        busy += current_end - current_start
    return busy
