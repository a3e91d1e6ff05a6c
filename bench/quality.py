"""Quality benchmark: the engine's champion vs a plain lifetimes fit, same data, same holdout.

    python bench/quality.py [--customers 200000] [--patterns retry,stray,mixed] [--no-cdnow] [--json OUT]
                            [--set models.champion_metric=spearman ...]

For each data set, in one run:

* **generated data**, one per cancellation pattern (``cvseg generate --cancellations``): orders of
  ``--customers`` customers over five years ending 2026-09-30 written straight into ``orders``
  (``bench/_orders_direct.py``: the rows ingest accepts from a clean export);
* **CDNOW** (lifetimes' sample, 2,357 customers, ingested through ``conf/examples/cdnow.yaml``),
  ending 1998-06-30, in weeks.

The holdout is the last six months (cutoff = end - 6 months). Both sides see orders up to the cutoff
only and are scored on every customer with an order on or before it, against their realised net
revenue in the holdout (``calibration_holdout.holdout_net``):

* **engine champion**: chosen as the nightly run would, by a backtest (``models.champion_metric``,
  ``models.purchase_basis=auto``: every purchase model on both bases, the cohort method, the naive
  baseline) one horizon *earlier* (origin = cutoff), so the choice never sees the evaluation window;
  then that model and basis is fitted at the cutoff and predicts the holdout. (CDNOW is too short for
  the cohort cells one horizon before that earlier cutoff: ``compare_cohort`` is off there.)
* **hybrid** (``models.hybrid``, :mod:`pipelines.hybrid`): gradient-boosted trees on the BTYD outputs
  and behavioural features of customers as of cutoff - 6 months, trained on what they spent up to
  the cutoff, then predicting the holdout from the same inputs as of the cutoff; one per basis
  (``hybrid``, ``hybrid_net``). It also competes in the backtest that picks the champion where that
  backtest has two horizons of history (not on CDNOW);
* **plain lifetimes**: ``summary_data_from_transaction_data`` of the completed orders (net amounts,
  ``freq="D"``), ``BetaGeoFitter`` + ``GammaGammaFitter``, ``customer_lifetime_value(time=6,
  discount_rate=0)`` (undiscounted, like the engine's value); customers without a completed order
  before the cutoff get 0.

Both are measured by the same reference code (:mod:`models.metrics`): Spearman, top-10% / top-20%
capture, MAE and total error; for the engine also the coverage of its 80% value intervals predicted
at the cutoff (:func:`models.intervals.interval_coverage`: a realised 0 counted by the randomised
PIT; the plain closed-interval share beside it; n/a for lifetimes, which has no per-customer interval,
and for a champion without intervals). For context the engine's BG/NBD on each basis is shown too. The
per-customer predictions come to the driver: this is a benchmark, not pipeline code.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import use_engine_imports  # noqa: E402
from _orders_direct import write_orders_direct  # noqa: E402

use_engine_imports()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402
from models import metrics as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENERATED_END = dt.date(2026, 9, 30)
CDNOW_END = dt.date(1998, 6, 30)
HORIZON_MONTHS = 6


def quality(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    return {"spearman": M.spearman(predicted, actual), "top10_capture": M.top_share_capture(predicted, actual, 0.1),
            "top20_capture": M.top_share_capture(predicted, actual, 0.2), "mae": M.mae(predicted, actual),
            "total_error_pct": M.total_error_pct(predicted, actual)}


def engine_predictions(storage: Storage, config, end: dt.date) -> tuple[str, dict[str, pd.Series], pd.Series, dict]:
    """(champion, predictions by model name, actual holdout net, backtest summary of the choice)."""
    from pipelines.backtest import ensure_calibration, fit_origin_models, predict_all, run_backtest
    from core.dates import add_months
    from pipelines.hybrid import origin_hybrids

    cutoff = add_months(end, -HORIZON_MONTHS)
    choice = run_backtest(storage, cutoff, config, n_origins=1, track=False)   # one horizon earlier
    champion = choice.champion
    holdout_df, _ = ensure_calibration(storage, cutoff, config)
    cohort_df = None
    if champion == "cohort":
        cohort_df, _ = ensure_calibration(storage, add_months(cutoff, -HORIZON_MONTHS), config)
    only_btyd = config.model_copy(update={"models": config.models.model_copy(update={
        "compare_cohort": champion == "cohort", "compare_naive": champion == "naive"})})
    bundles = fit_origin_models(holdout_df, cohort_df, only_btyd).bundles
    hybrids, _, notes = origin_hybrids(storage, cutoff, config, bundles)
    for note in [*notes, *choice.notes]:
        print(f"... {note}", flush=True)
    bundles.update(hybrids)
    shown = {name: bundles[name] for name in dict.fromkeys([champion, "bgnbd", "bgnbd_net", *hybrids])
             if name in bundles}
    rows = predict_all(holdout_df, shown).toPandas()
    wide = rows.pivot(index="customer_id", columns="model", values="predicted")
    actual = rows.drop_duplicates("customer_id").set_index("customer_id")["actual"].reindex(wide.index)
    # the 80% interval predicted at the cutoff (null where the model has none: cohort, naive, Pareto/NBD)
    bands = {name: rows[rows["model"] == name].set_index("customer_id")[["p10", "p90", "p_zero"]].reindex(wide.index)
             for name in shown}
    return champion, {name: wide[name] for name in shown}, actual, choice, bands


def coverage(band: pd.DataFrame, actual: np.ndarray) -> dict[str, float]:
    """Interval coverage (models.intervals: a realised 0 counted by the randomised PIT) and the plain
    closed-interval share, over the customers with an interval (net basis: those placed by rule, who
    only cancelled, have none, as in the backtest's ``interval_coverage``); NaN when the model has none."""
    from models.intervals import interval_coverage

    has = band["p10"].notna().to_numpy()
    if not has.any():
        return {"coverage": float("nan"), "closed_coverage": float("nan")}
    p10, p90, p_zero = (band[c].to_numpy(float)[has] for c in ("p10", "p90", "p_zero"))
    result = interval_coverage(actual[has], p10, p10, p90, p_zero)
    return {"coverage": result["coverage"], "closed_coverage": result["closed_coverage"]}


def lifetimes_predictions(storage: Storage, cutoff: dt.date, customers: pd.Index) -> pd.Series:
    """The plain lifetimes path on completed orders up to the cutoff (customers without one: 0)."""
    from cvseg.baselines import plain_lifetimes_value

    completed = (storage.read("orders").where(~F.col("is_cancelled") & (F.col("order_date") <= F.lit(cutoff)))
                 .select("customer_id", "order_date", "net_amount").toPandas())
    return plain_lifetimes_value(completed, cutoff, HORIZON_MONTHS).reindex(customers).fillna(0.0)


def compare(name: str, storage: Storage, config, end: dt.date) -> list[dict]:
    from core.dates import add_months

    started = time.perf_counter()
    champion, engine, actual, choice, bands = engine_predictions(storage, config, end)
    plain = lifetimes_predictions(storage, add_months(end, -HORIZON_MONTHS), actual.index)
    y = actual.to_numpy(float)
    rows = []
    for model, predicted in engine.items():
        role = "engine champion" if model == champion else "engine (context)"
        rows.append({"data": name, "method": f"{role}: {model}", **quality(predicted.to_numpy(float), y),
                     **coverage(bands[model], y)})
    # lifetimes gives parameter intervals only, no per-customer value interval
    rows.append({"data": name, "method": "plain lifetimes (completed orders)", **quality(plain.to_numpy(float), y),
                 "coverage": float("nan"), "closed_coverage": float("nan")})
    for row in rows:
        row.update(customers=len(y), champion_basis=choice.champion_purchase_basis,
                   basis_comparison=json.dumps(choice.basis_comparison), seconds=round(time.perf_counter() - started))
    return rows


def generated_storage(spark, root: Path, pattern: str, customers: int, seed: int, overrides: list[str]):
    from datagen.generate import GeneratorParams

    warehouse = root / f"wh-{pattern}"
    config = load_config(ROOT / "conf" / "examples" / "synthetic.yaml",
                         [f"storage.warehouse={warehouse}", "storage.backend=deltalake", *overrides])
    storage = Storage(spark, str(warehouse), "deltalake")
    write_orders_direct(spark, storage, customers, seed, GENERATED_END, config.business.timezone,
                        params=GeneratorParams(cancellations=pattern))
    return storage, config


def cdnow_storage(spark, root: Path, overrides: list[str]):
    import lifetimes

    from pipelines.ingest import run_ingest

    path = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_sample.txt"
    warehouse = root / "wh-cdnow"
    config = load_config(ROOT / "conf" / "examples" / "cdnow.yaml",
                         [f"storage.warehouse={warehouse}", f"source.path={path}", "storage.backend=deltalake",
                          "models.compare_cohort=false", *overrides])
    storage = Storage(spark, str(warehouse), "deltalake")
    run_ingest(spark, storage, config.source, config.validation, config.business.timezone, CDNOW_END, path=str(path))
    return storage, config


def print_table(rows: list[dict]) -> None:
    header = ("data", "method", "spearman", "top10", "top20", "MAE", "total err %", "80% interval coverage",
              "(closed interval)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    def share(value: float) -> str:
        return "n/a" if not np.isfinite(value) else f"{value:.1%}"

    for r in rows:
        print(f"| {r['data']} | {r['method']} | {r['spearman']:.3f} | {r['top10_capture']:.1%} | "
              f"{r['top20_capture']:.1%} | {r['mae']:,.1f} | {r['total_error_pct']:+.1f} | "
              f"{share(r['coverage'])} | {share(r['closed_coverage'])} |")


def share_text(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.1%}"


def acceptance(rows: list[dict], method: str = "engine champion") -> list[str]:
    """Data sets where the champion's (or ``method``'s) Spearman or top-20% capture is below the plain fit's."""
    failures = []
    for data in dict.fromkeys(r["data"] for r in rows):
        champ = next((r for r in rows if r["data"] == data and (r["method"].startswith(method)
                                                                 or r["method"].endswith(f": {method}"))), None)
        if champ is None:
            failures.append(f"{data}: no {method} row")
            continue
        plain = next(r for r in rows if r["data"] == data and r["method"].startswith("plain lifetimes"))
        for metric in ("spearman", "top20_capture"):
            if champ[metric] < plain[metric]:
                failures.append(f"{data}: {metric} {champ[metric]:.4f} < plain {plain[metric]:.4f}")
    return failures


def hybrid_acceptance(rows: list[dict]) -> list[str]:
    """As :func:`acceptance`, for the hybrid on the basis the backtest chose (``hybrid`` / ``hybrid_net``)."""
    failures = []
    for data in dict.fromkeys(r["data"] for r in rows):
        first = next(r for r in rows if r["data"] == data)
        name = "hybrid" if first["champion_basis"] == "gross" else "hybrid_net"
        failures += acceptance([r for r in rows if r["data"] == data and (not r["method"].startswith("engine")
                                                                          or r["method"].endswith(f": {name}"))],
                               name)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--patterns", default="retry,stray,mixed",
                        help="comma-separated cancellation patterns (independent, retry, stray, mixed)")
    parser.add_argument("--no-cdnow", action="store_true")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a configuration override for every data set (e.g. models.champion_metric=spearman)")
    args = parser.parse_args()

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cvseg-quality-") as tmp:
        root = Path(tmp)
        config = load_config(None, [f"storage.warehouse={root}/wh"])
        spark = build_spark(config.spark, f"{root}/wh")
        for pattern in [p for p in args.patterns.split(",") if p]:
            storage, pattern_config = generated_storage(spark, root, pattern, args.customers, args.seed, args.set)
            rows += compare(f"generated {pattern} ({args.customers:,})", storage, pattern_config, GENERATED_END)
            print(f"... {pattern} done ({rows[-1]['seconds']} s)", flush=True)
        if not args.no_cdnow:
            storage, cdnow_config = cdnow_storage(spark, root, args.set)
            rows += compare("CDNOW (2,357)", storage, cdnow_config, CDNOW_END)
    print_table(rows)
    for data in dict.fromkeys(r["data"] for r in rows):
        first = next(r for r in rows if r["data"] == data)
        print(f"{data}: champion basis {first['champion_basis']}; best BTYD per basis at the earlier origin "
              f"{first['basis_comparison']}")
    failures = acceptance(rows)
    print("acceptance (champion >= plain lifetimes on spearman and top-20% capture): "
          + ("met on every data set" if not failures else "NOT met: " + "; ".join(failures)))
    failures = hybrid_acceptance(rows)
    print("acceptance (hybrid on the champion's basis >= plain lifetimes on spearman and top-20% capture): "
          + ("met on every data set" if not failures else "NOT met: " + "; ".join(failures)))
    misses = [f"{r['data']}: {share_text(r['coverage'])}" for r in rows if r["method"].startswith("engine champion")
              and r["data"].startswith("generated") and not abs(r["coverage"] - 0.8) <= 0.05]
    print("acceptance (champion's interval coverage 80% +- 5 points on generated data): "
          + ("met on every pattern" if not misses else "NOT met: " + "; ".join(misses)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
