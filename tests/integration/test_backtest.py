"""Backtest and true-parameter recovery on generated data, through the engine's own path.

One seeded synthetic export (3,000 customers, 3 years of history, known true parameters in
``true_params.json``) is generated and ingested once for this module (a module-scoped warehouse, as
the CDNOW test does: ingest is the expensive part and both tests read the same ``orders``).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from core.config import load_config
from core.storage import Storage
from datagen.generate import GeneratorParams, generate
from pipelines.ingest import run_ingest

END = dt.date(2026, 9, 30)
N_CUSTOMERS = 3000
CONF = Path(__file__).resolve().parents[2] / "conf" / "examples" / "synthetic.yaml"


@pytest.fixture(scope="module")
def synthetic(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("backtest")
    warehouse = root / "warehouse"
    summary = generate(spark, n_customers=N_CUSTOMERS, seed=20261123, end_date=END, out_dir=str(root / "export"),
                       fmt="parquet", params=GeneratorParams(history_days=1096))
    # gross basis: five models per run (the auto basis doubles the BTYD fits; it is exercised below
    # on one model, untracked, and in test_purchase_basis.py)
    overrides = [f"storage.warehouse={warehouse}", "source.format=parquet", "spark.shuffle_partitions=2",
                 "storage.backend=deltalake", "models.purchase_basis=gross"]
    config = load_config(CONF, overrides)
    storage = Storage(spark, str(warehouse), backend="deltalake")
    run_ingest(spark, storage, config.source, config.validation, config.business.timezone, END,
               path=summary["orders_path"])
    truth = json.loads(Path(summary["true_params_path"]).read_text(encoding="utf-8"))
    return config, storage, truth, overrides


def test_bgnbd_and_gamma_gamma_recover_the_true_parameters(synthetic):
    """ingest -> features as of the export's last day (days) -> fit recovers the generator's parameters.

    Tolerance: each fitted parameter within 4 standard errors of the truth, the standard errors from
    the fit's own Fisher information (inverse Hessian of the log-likelihood at the optimum). With 7
    parameters checked, 4 SE keeps the chance of a false alarm from sampling noise below 7 x 6e-5
    even for an unlucky seed, while a wrong likelihood, unit (weeks vs days), scale (v in yen) or
    feature definition moves an estimate by far more. For that to mean anything the fit must be
    informative: every standard error must be under 35% of the true value (at 3,000 customers they
    are about 3-20%), so a bias of 4 x 35% = 140% can never pass. The remaining, deterministic
    biases of the engine path (purchase days instead of continuous time, same-day orders merged into
    one purchase day, whole-yen rounding) are well below one standard error at this size.
    """
    from pipelines.features import run_features
    from pipelines.ltv import fit_btyd_bundles

    config, storage, truth, _ = synthetic
    run_features(storage, END, config.features)
    features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(END))
    fitted = fit_btyd_bundles(features_df, ("bgnbd",), "days")
    purchase, spend = fitted.bundles["bgnbd"].purchase, fitted.bundles["bgnbd"].spend
    checks = {f"bgnbd.{k}": (purchase.params_[k], purchase.fit_info_["standard_errors"][k], truth["bg_nbd"][k])
              for k in ("r", "alpha", "a", "b")}
    checks.update({f"gamma_gamma.{k}": (spend.params_[k], spend.fit_info_["standard_errors"][k],
                                        truth["gamma_gamma"][k]) for k in ("p", "q", "v")})
    assert truth["bg_nbd"]["time_unit"] == "days" and truth["bg_nbd"]["r"] == 0.8 and truth["gamma_gamma"]["v"] == 3500
    report = {name: f"fitted {est:.4g} +- {se:.3g}, true {true:g}, z={(est - true) / se:+.2f}"
              for name, (est, se, true) in checks.items()}
    uninformative = {name: report[name] for name, (_, se, true) in checks.items() if not se < 0.35 * true}
    assert not uninformative, f"standard errors too large to test recovery: {uninformative}"
    off = {name: report[name] for name, (est, se, true) in checks.items() if abs(est - true) > 4 * se}
    assert not off, f"not recovered within 4 standard errors: {off}"


def test_backtest_registers_a_champion_and_a_second_run_adds_rows_and_versions(synthetic, capsys):
    import mlflow

    from core import tracking
    from jobs.cli import main as cli
    from models.bundle import ScoringBundle
    from pipelines.backtest import run_backtest

    config, storage, _, overrides = synthetic
    first = run_backtest(storage, END, config, n_origins=1)
    models = {"bgnbd", "paretonbd", "mbgnbd", "cohort", "naive", "hybrid"}   # hybrid: 3 years of history
    assert set(first.model_versions) == models and all(first.model_versions.values())
    rows = storage.read("model_backtest").toPandas()
    assert len(rows) == 6 and set(rows["model"]) == models
    assert (rows["cutoff_date"] == dt.date(2026, 3, 30)).all() and (rows["horizon_months"] == 6).all()
    assert rows["n_customers"].nunique() == 1 and rows["n_customers"].iloc[0] > 0.5 * N_CUSTOMERS
    assert rows["actual_total"].nunique() == 1 and rows["actual_total"].iloc[0] > 0
    for metric in ("mae", "rmse", "spearman", "normalized_gini", "top_decile_capture", "top20_capture"):
        assert rows[metric].notna().all(), metric
    # models with signal rank customers better than chance; the BTYD models' totals are in range
    btyd = rows[rows["value_model"] == "btyd"]
    assert (btyd["normalized_gini"] > 0.3).all() and (btyd["abs_total_error_pct"] < 50).all()
    champion_row = rows[rows["is_champion"]]
    assert len(champion_row) == 1
    # champion_metric auto, quantile bands: normalized_gini, higher is better
    assert config.champion_metric == "normalized_gini" and (rows["champion_metric"] == "normalized_gini").all()
    assert champion_row["normalized_gini"].iloc[0] == rows["normalized_gini"].max()
    assert champion_row["model"].iloc[0] == first.champion
    deciles = storage.read("model_backtest_deciles").toPandas()
    assert len(deciles) == 60
    assert deciles.groupby("model")["n"].sum().eq(rows["n_customers"].iloc[0]).all()

    target = tracking.tracking_target(config)
    tracking.start(target)
    assert tracking.champion_version(target.registered_model) == first.champion_version
    run = mlflow.get_run(rows.loc[rows["model"] == "bgnbd", "mlflow_run_id"].iloc[0])
    assert run.data.tags["mlflow.parentRunId"] == first.mlflow_parent_run_id
    assert {"model", "penalizer_coef", "time_unit", "cutoff_date", "horizon_months",
            "calibration_holdout_version"} <= set(run.data.params)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"calibration_plot.png", "decile_table.csv", "parameters.csv"} <= artifacts

    # the cohort and naive methods are scorable from the registry, with their own value model
    for name in ("cohort", "naive"):
        local = mlflow.artifacts.download_artifacts(f"models:/{target.registered_model}/{first.model_versions[name]}")
        bundle = ScoringBundle.load(next(Path(local).rglob("bundle.json")).parent)
        assert bundle.value_model == name
        sample = (storage.read("calibration_holdout").where(F.col("cutoff_date") == F.lit(dt.date(2026, 3, 30)))
                  .limit(50).toPandas())
        scores = bundle.predict(sample)
        assert scores["predicted_net_value"].notna().all() and (scores["predicted_net_value"] >= 0).all()
        if name == "cohort":
            assert bundle.cohort.fit_info_["n_cells"] > 10 and scores["predicted_net_value"].nunique() > 3

    capsys.readouterr()
    assert cli(["models", "--conf", str(CONF), *sum((["--set", o] for o in overrides), [])]) == 0
    listing = capsys.readouterr().out
    assert f"champion: version {first.champion_version}" in listing and "cohort" in listing

    # a second backtest: new run id, new versions, new rows; the calibration partitions are reused
    assert cli(["backtest", "--as-of", END.isoformat(), "--json", "--conf", str(CONF),
                *sum((["--set", o] for o in overrides), [])]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["backtest_run_id"] != first.backtest_run_id
    assert second["calibration_reused"][END.isoformat()] == {"calibration": True, "cohort_cells": True}
    assert min(map(int, second["model_versions"].values())) > max(map(int, first.model_versions.values()))
    assert tracking.champion_version(target.registered_model) == second["champion_version"]
    assert len(tracking.list_versions(target.registered_model)) == 12
    rows = storage.read("model_backtest").toPandas()
    assert len(rows) == 12 and rows.groupby("backtest_run_id").size().eq(6).all()
    # same data, same fits: the metrics of the two runs agree
    by_run = rows.set_index(["backtest_run_id", "model"])["mae"].unstack(0)
    pd.testing.assert_series_equal(by_run[first.backtest_run_id], by_run[second["backtest_run_id"]],
                                   check_names=False, rtol=1e-5)   # iterative fits: agree to 5 digits, not the last bits

    assert set(rows["purchase_basis"]) == {"gross"} and second["champion_purchase_basis"] == "gross"

    # re-running the SAME run id replaces its rows instead of adding them
    # (one model, untracked, to keep the test short: the merge keys are what is tested), here on
    # both purchase bases (auto): bgnbd replaces its row, bgnbd_net adds one
    one_model = load_config(CONF, [*overrides, "models.purchase_models=[bgnbd]", "models.compare_cohort=false",
                                   "models.compare_naive=false", "models.purchase_basis=auto",
                                   "models.hybrid.enabled=false"])
    again = run_backtest(storage, END, one_model, n_origins=1, backtest_run_id=second["backtest_run_id"],
                         track=False)
    assert again.backtest_run_id == second["backtest_run_id"]
    assert set(again.basis_comparison) == {"gross", "net"}
    assert again.champion_purchase_basis == ("net" if again.champion == "bgnbd_net" else "gross")
    rows = storage.read("model_backtest").toPandas()
    assert len(rows) == 13 and not rows.duplicated(["backtest_run_id", "origin_date", "model"]).any()
    assert len(storage.read("model_backtest_deciles").toPandas()) == 130
    replaced = rows[(rows["backtest_run_id"] == second["backtest_run_id"]) & (rows["model"] == "bgnbd")]
    assert replaced["mlflow_run_id"].isna().all()       # the untracked re-run's row replaced the tracked one
    assert rows.set_index("model").loc["bgnbd_net", "purchase_basis"] == "net"
    assert math.isfinite(rows["mae"].sum())
