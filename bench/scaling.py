"""Scale evidence for the nightly run: where a night's time goes as customers grow and as cores are added.

    python bench/scaling.py [--sizes 1000000,2000000,4000000] [--speedup-size 2000000]
                            [--workdir DIR] [--reuse-export] [--json-out FILE]

For every size, bench/cluster.py runs the first load and a regular night (no refit) on ``local[2]``;
at ``--speedup-size`` also on ``local[1]``. From each run's Spark event log, per step:

* wall seconds, task (executor) seconds and shuffle bytes (as bench/cluster.py prints them);
* **serial seconds**: the part of the step's wall time during which no task ran anywhere, i.e. the
  driver alone (planning, Delta log reads and commits, the fits and other driver-side Python,
  collecting small results). This is the part more executors do not shorten;
* the speed-up of each step from one core to two (``local[1]`` wall / ``local[2]`` wall): a step
  far below 2x holds serial work (its serial seconds say how much).

Then, per step, a least-squares line through the sizes: serial seconds and task seconds per
million customers, which separates the fixed cost of a step from the part that grows with the
client. Each size is one run on one machine: read the ratios and the slopes, not the last digit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
STEPS = ("ingest", "features", "score", "segments", "trends", "export", "other", "night")
NIGHTS = ("first load", "regular night")


def run_size(customers: int, masters: list[str], workdir: Path, reuse: bool, overrides: list[str]) -> dict:
    """bench/cluster.py for one size on ``masters``; its JSON result."""
    out = workdir / f"scaling-{customers}.json"
    command = [sys.executable, str(BENCH / "cluster.py"), "--customers", str(customers), "--masters", ",".join(masters),
               "--workdir", str(workdir / f"size-{customers}"), "--json-out", str(out),
               *(["--reuse-export"] if reuse else []), *[f"--set={o}" for o in overrides]]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    print("$", " ".join(command), flush=True)
    if subprocess.run(command, env=env).returncode:
        sys.exit(f"bench/cluster.py failed at {customers:,} customers")
    return json.loads(out.read_text())["results"]


def figure(results: dict, master: str, night: str, step: str, key: str) -> float | None:
    steps = results.get(master, {}).get("steps", {}).get(night, {})
    if step == "night" and key != "serial_s":
        if key == "wall_s":
            return results.get(master, {}).get("walls", {}).get(night, {}).get("night")
        return sum((v.get(key) or 0) for name, v in steps.items() if name != "night")
    value = steps.get(step, {}).get(key)
    if value is None and key == "wall_s":
        value = results.get(master, {}).get("walls", {}).get(night, {}).get(step)
    return value


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line; slope 0 with fewer than two points."""
    if len(xs) < 2:
        return (ys[0] if ys else float("nan")), 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return mean_y - slope * mean_x, slope


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_speedup(results: dict, customers: int) -> None:
    print(f"\n## One core to two at {customers:,} customers: wall s (serial s) and speed-up")
    for night in NIGHTS:
        print(f"\n{night}:\n| step | local[1] wall (serial) | local[2] wall (serial) | speed-up | task s local[1] / local[2] |")
        print("| --- | --- | --- | --- | --- |")
        for step in STEPS:
            one, two = (figure(results, m, night, step, "wall_s") for m in ("local[1]", "local[2]"))
            if one is None and two is None:
                continue
            s1, s2 = (figure(results, m, night, step, "serial_s") for m in ("local[1]", "local[2]"))
            t1, t2 = (figure(results, m, night, step, "task_s") for m in ("local[1]", "local[2]"))
            speedup = one / two if one and two else None
            print(f"| {step} | {fmt(one)} ({fmt(s1)}) | {fmt(two)} ({fmt(s2)}) | {fmt(speedup, 2)}x | "
                  f"{fmt(t1)} / {fmt(t2)} |")


def print_growth(by_size: dict[int, dict], master: str = "local[2]") -> dict:
    sizes = sorted(by_size)
    millions = [s / 1e6 for s in sizes]
    growth: dict = {}
    header = " | ".join(f"{s / 1e6:g}M" for s in sizes)
    for night in NIGHTS:
        print(f"\n## {night} on {master}: wall / serial / task seconds per size; lines per million customers")
        print(f"| step | {header} | serial: fixed + per M | task s: fixed + per M |")
        print("| --- |" + " --- |" * (len(sizes) + 2))
        for step in STEPS:
            walls = [figure(by_size[s], master, night, step, "wall_s") for s in sizes]
            if all(w is None for w in walls):
                continue
            serial = [figure(by_size[s], master, night, step, "serial_s") for s in sizes]
            tasks = [figure(by_size[s], master, night, step, "task_s") for s in sizes]
            cells = " | ".join(f"{fmt(w)} / {fmt(se)} / {fmt(t)}" for w, se, t in zip(walls, serial, tasks))
            points = [(m, se) for m, se in zip(millions, serial) if se is not None]
            s_fixed, s_slope = line_fit([p[0] for p in points], [p[1] for p in points])
            points = [(m, t) for m, t in zip(millions, tasks) if t is not None]
            t_fixed, t_slope = line_fit([p[0] for p in points], [p[1] for p in points])
            growth.setdefault(night, {})[step] = {"serial_fixed_s": s_fixed, "serial_per_million_s": s_slope,
                                                  "task_fixed_s": t_fixed, "task_per_million_s": t_slope}
            print(f"| {step} | {cells} | {s_fixed:.1f} + {s_slope:.1f} | {t_fixed:.1f} + {t_slope:.1f} |")
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,2000000,4000000")
    parser.add_argument("--speedup-size", type=int, default=2_000_000, help="0: no local[1] run")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder (kept: exports are reused)")
    parser.add_argument("--reuse-export", action="store_true")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")} | ({args.speedup_size} if args.speedup_size else set()))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    by_size = {}
    for customers in sizes:
        masters = ["local[1]", "local[2]"] if customers == args.speedup_size else ["local[2]"]
        by_size[customers] = run_size(customers, masters, workdir, args.reuse_export, args.overrides)
    if args.speedup_size:
        print_speedup(by_size[args.speedup_size], args.speedup_size)
    growth = print_growth(by_size)
    out = {"sizes": by_size, "growth": growth}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"growth": growth}))


if __name__ == "__main__":
    main()
