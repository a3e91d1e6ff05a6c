"""lifetimes' documented single-node path, run in a child process under a memory cap.

    python bench/_lifetimes_path.py --orders WAREHOUSE/orders --end-date 2026-09-30 [--horizon-months 6]

The single-node baseline of ``bench/models.py``: the orders read from the Delta table with delta-rs
into pandas, ``summary_data_from_transaction_data`` (daily), ``BetaGeoFitter``, ``GammaGammaFitter``
and ``customer_lifetime_value`` over the horizon, undiscounted. It prints one JSON line when a step
starts and one when it ends (seconds, this process's peak RSS), and the figures last.

``run_capped`` starts it as a child and samples the child's RSS; above the cap it kills the child and
reports the step that was running. At 20M customers the pandas path does not fit a 24 GiB machine:
a child keeps that from taking the machine (and the benchmark's own Spark driver) down with it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


@contextmanager
def _step(name: str):
    _emit(event="start", step=name)
    started = time.perf_counter()
    yield
    _emit(event="end", step=name, seconds=round(time.perf_counter() - started, 3), peak_rss=_peak_rss())


def run_lifetimes_path(orders_path: str, end_date: dt.date, horizon_months: int) -> None:
    import pandas as pd
    from deltalake import DeltaTable
    from lifetimes import BetaGeoFitter, GammaGammaFitter
    from lifetimes.utils import summary_data_from_transaction_data

    try:
        with _step("baseline: load orders to pandas"):
            orders = DeltaTable(orders_path).to_pandas(columns=["customer_id", "order_date", "gross_amount"])
            orders["order_date"] = orders["order_date"].astype("datetime64[ns]")
        _emit(event="info", orders=int(len(orders)))
        with _step("baseline: summary_data_from_transaction_data"):
            summary = summary_data_from_transaction_data(orders, "customer_id", "order_date",
                                                         monetary_value_col="gross_amount", freq="D",
                                                         observation_period_end=pd.Timestamp(end_date))
        del orders
        with _step("baseline: BetaGeoFitter"):
            bgf = BetaGeoFitter(penalizer_coef=0.0).fit(summary["frequency"], summary["recency"], summary["T"])
        repeat = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
        with _step("baseline: GammaGammaFitter"):
            ggf = GammaGammaFitter(penalizer_coef=0.0).fit(repeat["frequency"], repeat["monetary_value"])
        with _step(f"baseline: customer_lifetime_value {horizon_months} months"):
            value = ggf.customer_lifetime_value(bgf, summary["frequency"], summary["recency"], summary["T"],
                                                summary["monetary_value"], time=horizon_months,
                                                discount_rate=0.0, freq="D")
    except MemoryError:
        _emit(event="error", error="MemoryError", peak_rss=_peak_rss())
        raise SystemExit(3)
    _emit(event="figures", customers=int(len(summary)), predicted_gross_total=float(value.sum()),
          bgnbd_params={k: round(float(v), 5) for k, v in bgf.params_.items()})


def run_capped(orders_path: str, end_date: dt.date, horizon_months: int, cap_bytes: int,
               on_step=None, poll_seconds: float = 0.2) -> dict:
    """Run the path in a child; kill it when its RSS passes ``cap_bytes``.

    Returns ``{"steps": [(name, seconds, peak_rss)], "figures": {...} | None, "failed": None | {...}}``;
    ``failed`` names the step that was running, the child's sampled peak RSS and why it stopped.
    ``on_step(name, seconds, peak_rss)`` is called as each step ends.
    """
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--orders", orders_path,
                              "--end-date", end_date.isoformat(), "--horizon-months", str(horizon_months)],
                             stdout=subprocess.PIPE, text=True, bufsize=1)
    process = psutil.Process(child.pid)
    result: dict = {"steps": [], "figures": None, "failed": None, "cap_bytes": cap_bytes}
    state = {"running": "start-up (imports)", "since": time.perf_counter(), "sampled_peak": 0, "killed": False}

    import threading

    def watch() -> None:
        while child.poll() is None:
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                break
            state["sampled_peak"] = max(state["sampled_peak"], rss)
            if rss > cap_bytes:
                state["killed"] = True
                child.kill()
                break
            time.sleep(poll_seconds)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in child.stdout:
        message = json.loads(line)
        event = message.pop("event")
        if event == "start":
            state["running"], state["since"] = message["step"], time.perf_counter()
        elif event == "end":
            state["running"], state["since"] = f"after {message['step']}", time.perf_counter()
            result["steps"].append((message["step"], message["seconds"], message["peak_rss"]))
            if on_step:
                on_step(message["step"], message["seconds"], message["peak_rss"])
        elif event == "figures":
            result["figures"] = message
        elif event == "info":
            result.setdefault("info", {}).update(message)
        elif event == "error":
            result["failed"] = {"step": state["running"], "why": message["error"],
                                "seconds_into_step": time.perf_counter() - state["since"]}
    returncode = child.wait()
    watcher.join()
    if returncode != 0 and result["failed"] is None:
        why = (f"RSS passed the cap of {cap_bytes / 1024**3:.2f} GiB (killed)" if state["killed"]
               else f"exit code {returncode}")
        result["failed"] = {"step": state["running"], "why": why,
                            "seconds_into_step": time.perf_counter() - state["since"]}
    if result["failed"] is not None:
        result["failed"]["sampled_peak_rss"] = state["sampled_peak"]
    result["sampled_peak_rss"] = state["sampled_peak"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", required=True, help="path of the orders Delta table")
    parser.add_argument("--end-date", required=True, type=dt.date.fromisoformat)
    parser.add_argument("--horizon-months", type=int, default=6)
    args = parser.parse_args()
    run_lifetimes_path(args.orders, args.end_date, args.horizon_months)


if __name__ == "__main__":
    main()
