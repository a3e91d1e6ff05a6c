"""A model version logged to MLflow loads back as a pyfunc and scores like the bundle, quietly."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest

from core import tracking
from models.bundle import FEATURE_COLUMNS, ScoringBundle
from models.btyd import BGNBDModel
from models.cancellation import CancellationRateModel
from models.gamma_gamma import GammaGammaModel
from tests.unit.models.helpers import simulate_bgnbd


def _bundle() -> ScoringBundle:
    rng = np.random.default_rng(7)
    rows = simulate_bgnbd(3000, r=0.8, alpha=40.0, a=0.6, b=2.5, T=rng.uniform(60, 400, 3000), seed=7)
    repeat = rows[rows.frequency > 0]
    spend = GammaGammaModel().fit(repeat.frequency, rng.gamma(6.0, 800.0, len(repeat)))
    orders = rows.frequency.to_numpy() + 1
    cancels = CancellationRateModel().fit(orders, rng.binomial(orders.astype(int), 0.05))
    return ScoringBundle(purchase=BGNBDModel().fit(rows.frequency, rows.recency, rows["T"]), spend=spend,
                         cancellation=cancels)


def _channel_bundle() -> ScoringBundle:
    """The same with per-channel components ("web" buys more often than "app" in the simulation)."""
    from models.channels import fit_channel_components

    bundle = _bundle()
    rng = np.random.default_rng(8)
    rows = pd.concat([simulate_bgnbd(2000, r=0.8, alpha=20.0, a=0.6, b=2.5, T=rng.uniform(60, 400, 2000), seed=8)
                      .assign(channel="web"),
                      simulate_bgnbd(2000, r=0.8, alpha=80.0, a=0.6, b=2.5, T=rng.uniform(60, 400, 2000), seed=9)
                      .assign(channel="app")])
    rfm = rows.assign(weight=1.0)
    spend = rows[rows.frequency > 0].assign(monetary_value=lambda d: rng.gamma(6.0, 800.0, len(d)), weight=1.0)
    components = fit_channel_components(bundle.purchase, bundle.spend, rfm, spend, prior_customers=1000,
                                        min_customers=100)
    return ScoringBundle(purchase=bundle.purchase, spend=bundle.spend, cancellation=bundle.cancellation,
                         by_channel=components)


@pytest.mark.parametrize("make_bundle", [_bundle, _channel_bundle], ids=["pooled", "by_channel"])
def test_logged_bundle_loads_as_pyfunc_and_scores_the_same(tmp_path, make_bundle):
    import mlflow

    bundle = make_bundle()
    target = tracking.TrackingTarget(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t",
                                     registered_model="t_ltv", artifact_root=(tmp_path / "artifacts").as_uri())
    tracking.start(target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, version = tracking.log_bundle(bundle, "fit", params={"model": "bgnbd"}, metrics={"ll": -1.0},
                                         register_as=target.registered_model)
    assert not caught, [f"{w.category.__name__} at {w.filename}:{w.lineno}: {str(w.message)[:200]}" for w in caught]
    features = pd.DataFrame({"customer_id": ["A", "B", "C"], "frequency": [0.0, 3.0, 10.0],
                             "recency": [0.0, 120.0, 300.0], "T": [90.0, 200.0, 310.0],
                             "monetary_value": [0.0, 4200.0, 6100.0], "n_orders": [1.0, 4.0, np.nan],
                             "n_cancelled": [0.0, 1.0, 0.0], "net_6m": [0.0, 5000.0, 21000.0],
                             "acquisition_channel": ["web", "app", None]})[list(FEATURE_COLUMNS)]
    features.loc[2, "n_orders"] = 11.0     # a float column (missing values allowed) with whole counts
    served = mlflow.pyfunc.load_model(f"models:/{target.registered_model}/{version}")
    pd.testing.assert_frame_equal(served.predict(features).reset_index(drop=True),
                                  bundle.predict(features).reset_index(drop=True))
    if bundle.by_channel is not None:         # the channels' own parameters were used: not the pooled scores
        pooled = dataclasses.replace(bundle, by_channel=None).predict(features)
        by_channel = bundle.predict(features)
        assert not np.allclose(pooled["expected_purchases"].iloc[:2], by_channel["expected_purchases"].iloc[:2])


def _target(tmp_path) -> tracking.TrackingTarget:
    return tracking.TrackingTarget(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t",
                                   registered_model="t_ltv", artifact_root=(tmp_path / "artifacts").as_uri())


def test_the_names_champion_info_and_list_versions_read_are_the_ones_log_fit_writes(tmp_path):
    """MLflow parameter names are an interface: the nightly refit (champion_info) and `cvseg models`
    (list_versions) read what `cvseg fit` and the refit logged, also from runs of older versions."""
    import datetime as dt

    from core.config import load_config

    target = _target(tmp_path)
    tracking.start(target)
    config = load_config(None, [f"storage.warehouse={tmp_path / 'wh'}", "spark.master=null"])
    _, version = tracking.log_fit(_channel_bundle(), config, dt.date(2026, 3, 31), 4, {"bgnbd": 0.5},
                                  run_name="fit", register_as=target.registered_model,
                                  extra_params={"by_channel": True})
    tracking.set_champion(target.registered_model, version)
    info = tracking.champion_info(target.registered_model)
    assert (info.version, info.fitted_as_of, info.purchase_basis, info.value_model, info.by_channel,
            info.purchase_model) == (version, dt.date(2026, 3, 31), "gross", "btyd", True, "bgnbd")
    listed = tracking.list_versions(target.registered_model).iloc[0]
    assert (str(listed["version"]), listed["aliases"], listed["value_model"], listed["purchase_model"],
            listed["as_of"]) == (version, "champion", "btyd", "bgnbd", "2026-03-31")


def test_log_backtest_nests_the_fits_registers_the_newest_and_names_the_champion(tmp_path):
    import datetime as dt
    import json

    import mlflow

    target = _target(tmp_path)
    tracking.start(target)
    bundle = _bundle()
    newest, earlier = dt.date(2026, 3, 31), dt.date(2026, 2, 28)
    fits = [tracking.BacktestFit(origin, name, bundle, {"model": name}, {"mae": mae}, {}, {"kind": "backtest_fit"},
                                 register=origin == newest)
            for origin, name, mae in ((newest, "bgnbd", 1.0), (newest, "mbgnbd", 2.0), (earlier, "bgnbd", 1.5))]
    runs = tracking.log_backtest(target.registered_model, "backtest", {"origins": 2}, {"kind": "backtest"}, fits,
                                 champion="bgnbd", summary_metrics={"mean_mae_bgnbd": 1.25},
                                 summary_artifacts={"champion": {"model": "bgnbd"}})
    assert set(runs.run_ids) == {(newest, "bgnbd"), (newest, "mbgnbd"), (earlier, "bgnbd")}
    assert set(runs.versions) == {"bgnbd", "mbgnbd"} and runs.champion_version == runs.versions["bgnbd"]
    assert tracking.champion_version(target.registered_model) == runs.champion_version
    client = mlflow.MlflowClient()
    for run_id in runs.run_ids.values():
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == runs.parent_run_id
    parent = client.get_run(runs.parent_run_id)
    assert parent.data.metrics["mean_mae_bgnbd"] == 1.25
    champion = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=runs.parent_run_id, artifact_path="champion.json")).read())
    assert champion == {"model": "bgnbd", "version": runs.champion_version}
