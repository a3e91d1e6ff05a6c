"""Gamma-Gamma spend model: published CDNOW values, weights, money unit, frequency 0, fallbacks."""
from __future__ import annotations

import json

import numpy as np
import pytest

import models
from models import GammaGammaModel, ModelFitError
from models import gamma_gamma
from tests.unit.models.helpers import unique_rows


@pytest.fixture(scope="module")
def repeaters(cdnow):
    return cdnow[cdnow.frequency > 0]


@pytest.fixture(scope="module")
def cdnow_gg(cdnow):
    rows = unique_rows(cdnow, ["frequency", "monetary_value"])
    return GammaGammaModel().fit(rows.frequency, rows.monetary_value, rows.n)


def test_reproduces_fader_hardie_lee_cdnow(cdnow_gg):
    # Fader, Hardie & Lee (2005) "RFM and CLV", Hardie note 025: p=6.25, q=3.74, v (gamma)=15.44.
    for name, value in {"p": 6.25, "q": 3.74, "v": 15.44}.items():
        assert abs(cdnow_gg.params_[name] - value) / value < 0.005, (name, cdnow_gg.params_[name])
    # fitted on the 946 customers with repeat purchases; the 1411 others are excluded, not rejected
    assert cdnow_gg.fit_info_["n_customers"] == 946
    assert cdnow_gg.fit_info_["n_excluded"] == 2357 - 946


def test_weighted_fit_equals_unweighted(cdnow_gg, repeaters):
    full = GammaGammaModel().fit(repeaters.frequency, repeaters.monetary_value)
    for name in ("p", "q", "v"):
        assert cdnow_gg.params_[name] == pytest.approx(full.params_[name], rel=1e-4)


def test_money_unit_only_rescales_v(cdnow_gg, cdnow):
    # yen-like amounts (x 1000): v scales, p and q do not; the internal rescaling makes this exact
    rows = unique_rows(cdnow, ["frequency", "monetary_value"])
    yen = GammaGammaModel().fit(rows.frequency, 1000 * rows.monetary_value, rows.n)
    assert yen.params_["v"] == pytest.approx(1000 * cdnow_gg.params_["v"], rel=1e-4)
    for name in ("p", "q"):
        assert yen.params_[name] == pytest.approx(cdnow_gg.params_[name], rel=1e-4)
    assert yen.fit_info_["monetary_scale"] == pytest.approx(1000 * cdnow_gg.fit_info_["monetary_scale"])


def test_expected_order_value_by_hand():
    model = models.GammaGammaModel.from_dict({"format_version": 1, "model": "gamma_gamma", "hyperparameters": {},
                                              "params": {"p": 6.0, "q": 4.0, "v": 15.0}})
    # population mean p v / (q - 1) = 6 * 15 / 3 = 30
    assert model.population_mean_order_value() == pytest.approx(30.0)
    # x = 2, m = 20: weight p x / (p x + q - 1) = 12 / 15 = 0.8 -> 0.2 * 30 + 0.8 * 20 = 22
    # frequency 0: the population mean whatever monetary says (0, NaN, 999)
    values = model.expected_order_value([2, 0, 0, 0], [20.0, 0.0, np.nan, 999.0])
    assert values == pytest.approx([22.0, 30.0, 30.0, 30.0])


def test_customers_without_repeat_orders_get_the_population_mean(cdnow_gg):
    p, q, v = cdnow_gg.params_["p"], cdnow_gg.params_["q"], cdnow_gg.params_["v"]
    assert cdnow_gg.expected_order_value([0], [0.0])[0] == pytest.approx(p * v / (q - 1), rel=1e-12)
    assert p * v / (q - 1) == pytest.approx(35.17, abs=0.05)     # CDNOW: about $35 per order


def test_simulated_recovery():
    # nu ~ Gamma(q, rate v); each order value ~ Gamma(p, rate nu); m = mean of x order values.
    rng = np.random.default_rng(42)
    n, p, q, v = 20_000, 6.0, 4.0, 15.0
    x = rng.integers(1, 10, n)
    nu = rng.gamma(q, 1.0 / v, n)
    m = rng.gamma(p * x, 1.0 / (nu * x))
    model = GammaGammaModel().fit(x, m)
    errors = model.fit_info_["standard_errors"]
    # relative standard errors here are about 2-5%; 4 SE is a safe but still sharp tolerance
    for name, value in {"p": p, "q": q, "v": v}.items():
        assert errors[name] / model.params_[name] < 0.08
        assert abs(model.params_[name] - value) < 4 * errors[name], (name, model.params_[name], errors[name])


def test_q_below_one_is_a_failed_fit(monkeypatch, repeaters):
    original = gamma_gamma._GammaGammaFitter.fit
    calls = []

    def fit(self, *args, **kwargs):
        calls.append(1)
        out = original(self, *args, **kwargs)
        if len(calls) == 1:
            self.params_["q"] = 0.9
        return out

    monkeypatch.setattr(gamma_gamma._GammaGammaFitter, "fit", fit)
    model = GammaGammaModel().fit(repeaters.frequency, repeaters.monetary_value)
    assert "q = 0.9" in model.fit_info_["failed_attempts"][0]["error"]
    assert model.fit_info_["penalizer"] == 0.001
    assert model.params_["q"] > 1


def test_everything_failing_raises_model_fit_error(monkeypatch, repeaters):
    def fit(self, *args, **kwargs):
        raise FloatingPointError("forced")

    monkeypatch.setattr(gamma_gamma._GammaGammaFitter, "fit", fit)
    with pytest.raises(ModelFitError, match="What to try: cap extreme order values"):
        GammaGammaModel().fit(repeaters.frequency, repeaters.monetary_value)


def test_input_checks():
    with pytest.raises(ValueError, match="nothing to fit"):
        GammaGammaModel().fit([0, 0], [0.0, 0.0])
    with pytest.raises(ValueError, match="monetary must be finite"):
        GammaGammaModel().fit([1, 2], [np.nan, 3.0])


def test_save_load_round_trip(tmp_path, cdnow_gg):
    path = cdnow_gg.save(tmp_path / "gg.json")
    document = json.loads(path.read_text())
    assert (document["format_version"], document["model"]) == (1, "gamma_gamma")
    loaded = models.load_model(path)
    assert isinstance(loaded, GammaGammaModel) and loaded.params_ == cdnow_gg.params_
    assert np.array_equal(loaded.expected_order_value([0, 3], [0.0, 25.0]),
                          cdnow_gg.expected_order_value([0, 3], [0.0, 25.0]))
    with pytest.raises(ValueError, match="not 'bgnbd'"):
        models.BGNBDModel.load(path)
