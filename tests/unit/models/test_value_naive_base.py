"""Value composition, the naive baseline, and the shared save/load and registry rules."""
from __future__ import annotations

import json

import numpy as np
import pytest

import models
from models import NaiveRepeatModel, predict_value


def from_params(name: str, params: dict, **hyperparameters):
    return models.MODEL_REGISTRY[name].from_dict({"format_version": 1, "model": name,
                                                  "hyperparameters": hyperparameters, "params": params})


# ---- value -----------------------------------------------------------------------------------------
def test_predict_value_by_hand():
    purchase = from_params("bgnbd", {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}, time_unit="weeks")
    spend = from_params("gamma_gamma", {"p": 6.0, "q": 4.0, "v": 15.0})
    frequency, recency, T = [2, 0, 5], [30.43, 0.0, 10.0], [38.86, 38.86, 38.86]
    monetary = [20.0, np.nan, 40.0]
    out = predict_value(purchase, spend, 26, frequency, recency, T, monetary, cancellation_rate=[0.1, 0.0, 0.5])
    purchases = purchase.expected_purchases(26, frequency, recency, T)
    assert out.expected_purchases == pytest.approx(purchases)
    # order values by hand: x=2, m=20 -> 0.2*30 + 0.8*20 = 22; x=0 -> population mean 30;
    # x=5, m=40 -> weight 30/33 -> (3/33)*30 + (30/33)*40 = 39.0909...
    assert out.expected_order_value == pytest.approx([22.0, 30.0, (3 * 30 + 30 * 40) / 33])
    assert out.gross_value == pytest.approx(purchases * np.array([22.0, 30.0, (3 * 30 + 30 * 40) / 33]))
    assert out.net_value == pytest.approx(out.gross_value * np.array([0.9, 1.0, 0.5]))
    assert set(out.to_dict()) == {"expected_purchases", "expected_order_value", "gross_value",
                                  "cancellation_rate", "net_value"}


def test_predict_value_with_the_cancellation_model():
    purchase = from_params("paretonbd", {"r": 0.553, "alpha": 10.578, "s": 0.606, "beta": 11.669})
    spend = from_params("gamma_gamma", {"p": 6.0, "q": 4.0, "v": 15.0})
    cancel = from_params("cancellation", {"alpha": 1.0, "beta": 9.0})
    rate = cancel.predict([4, 0], [2, 0])                       # 3/14 and 1/10
    out = predict_value(purchase, spend, 26, [3, 0], [20.0, 0.0], [30.0, 30.0], [10.0, 0.0], rate)
    assert out.cancellation_rate == pytest.approx([3 / 14, 0.1])
    assert out.net_value == pytest.approx(out.gross_value * np.array([11 / 14, 0.9]))
    assert np.all(np.isfinite(out.net_value))
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        predict_value(purchase, spend, 26, [3], [20.0], [30.0], [10.0], 1.5)


# ---- naive -----------------------------------------------------------------------------------------
def test_naive_repeats_the_trailing_revenue(tmp_path):
    model = NaiveRepeatModel().fit()
    assert model.params_ == {"scale": 1.0}
    assert model.predict([0.0, 1200.0, 35.5]).tolist() == [0.0, 1200.0, 35.5]
    loaded = models.load_model(model.save(tmp_path / "naive.json"))
    assert isinstance(loaded, NaiveRepeatModel) and loaded.predict([7.0]).tolist() == [7.0]
    with pytest.raises(ValueError, match="missing or infinite"):
        model.predict([np.nan])


# ---- shared rules ----------------------------------------------------------------------------------
def test_every_registered_model_rejects_another_format_version(tmp_path):
    for name, cls in models.MODEL_REGISTRY.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"format_version": 0, "model": name, "hyperparameters": {}, "params": {}}))
        with pytest.raises(ValueError, match="format_version is 0"):
            cls.load(path)


def test_load_model_errors_are_clear(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format_version": 1, "model": "xgboost", "params": {}}))
    with pytest.raises(ValueError, match="unknown model 'xgboost'"):
        models.load_model(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ValueError, match="not a model file"):
        models.load_model(tmp_path / "y.json")
    document = {"format_version": 1, "model": "bgnbd", "hyperparameters": {"learning_rate": 0.1},
                "params": {"r": 1, "alpha": 1, "a": 1, "b": 1}}
    (tmp_path / "z.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="unknown hyper-parameters for 'bgnbd': learning_rate"):
        models.load_model(tmp_path / "z.json")
    document = {"format_version": 1, "model": "bgnbd", "hyperparameters": {}, "params": {"r": 1, "alpha": 1}}
    (tmp_path / "w.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="params must be exactly"):
        models.load_model(tmp_path / "w.json")


def test_hyperparameters_follow_the_scikit_learn_convention():
    model = models.make_model("gamma_gamma", penalizer_coef=0.1, monetary_scale=1000.0)
    assert model.get_params() == {"penalizer_coef": 0.1, "fallback_penalizers": (0.001, 0.01),
                                  "fallback_restart": True, "monetary_scale": 1000.0}
    assert model.params_ is None and not model.is_fitted
    assert "GammaGammaModel(penalizer_coef=0.1" in repr(model)
    fitted = model.fit([1, 2, 3, 1, 4] * 20, [10.0, 12.0, 9.0, 11.0, 13.0] * 20)
    assert fitted is model and model.is_fitted


def test_models_package_does_not_import_spark():
    import subprocess
    import sys

    code = "import sys, models; print('pyspark' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(models.__file__).parents[1]))
    assert out.stdout.strip() == "False"


def test_only_the_implementation_modules_import_lifetimes():
    import ast
    from pathlib import Path

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    root = Path(models.__file__).parent
    importers = {p.name for p in root.glob("*.py") if "lifetimes" in imported(p)}
    assert importers == {"_lifetimes_compat.py"}
    assert not any("pyspark" in imported(p) for p in root.glob("*.py"))


# ---- purchase basis --------------------------------------------------------------------------------
def _bundles():
    from models.bundle import ScoringBundle

    purchase = from_params("bgnbd", {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}, time_unit="weeks")
    spend = from_params("gamma_gamma", {"p": 6.0, "q": 4.0, "v": 15.0})
    cancel = from_params("cancellation", {"alpha": 1.0, "beta": 9.0})
    return {basis: ScoringBundle(purchase=purchase, spend=spend, cancellation=cancel, time_unit="weeks",
                                 purchase_basis=basis) for basis in ("gross", "net")}


def test_the_net_basis_reads_completed_orders_and_places_only_cancelled_customers_by_rule(tmp_path):
    import pandas as pd

    from models.bundle import ScoringBundle

    features = pd.DataFrame({
        "customer_id": ["A", "B"], "frequency": [3.0, 1.0], "recency": [20.0, 5.0], "T": [30.0, 30.0],
        "monetary_value": [12.0, 10.0], "n_orders": [5.0, 2.0], "n_cancelled": [1.0, 2.0], "net_6m": [0.0, 0.0],
        "acquisition_channel": ["web", None],
        # A: one cancelled purchase day fewer on the net basis; B only cancelled
        "net_frequency": [2.0, np.nan], "net_recency": [20.0, np.nan], "net_T": [30.0, np.nan],
        "net_monetary_value": [11.0, np.nan]})
    bundles = _bundles()
    gross, net = (bundles[b].predict(features) for b in ("gross", "net"))
    purchase, spend = bundles["net"].purchase, bundles["net"].spend
    want = purchase.expected_purchases(26.09, [2.0], [20.0], [30.0]) * spend.expected_order_value([2.0], [11.0])
    assert net.loc[0, "predicted_net_value"] == pytest.approx(want[0], rel=1e-3)   # no cancellation factor
    assert net.loc[0, "predicted_net_value"] != pytest.approx(gross.loc[0, "predicted_net_value"], rel=1e-3)
    assert net["purchase_basis"].tolist() == ["net", "net_rule"] and set(gross["purchase_basis"]) == {"gross"}
    assert net.loc[1, ["p_alive", "expected_purchases", "predicted_net_value"]].tolist() == [0.0, 0.0, 0.0]
    assert gross.loc[1, "predicted_net_value"] > 0
    with pytest.raises(ValueError, match="features --as-of D --full"):
        bundles["net"].predict(features.drop(columns=["net_T"]))
    loaded = ScoringBundle.load(bundles["net"].save(tmp_path / "b"))
    assert loaded.purchase_basis == "net"
    pd.testing.assert_frame_equal(loaded.predict(features), net)


def test_the_basis_comparison_names_each_basis_best_btyd_model():
    import pandas as pd

    from pipelines.backtest import compare_bases

    bundles = {"bgnbd": _bundles()["gross"], "bgnbd_net": _bundles()["net"]}
    means = pd.Series({"bgnbd": 0.61, "bgnbd_net": 0.58, "naive": 0.9})
    assert compare_bases(means, bundles, "spearman") == {"gross": {"model": "bgnbd", "value": 0.61},
                                                          "net": {"model": "bgnbd_net", "value": 0.58}}
