"""Six-month cohort method: band edges, cell means and back-off computed by hand."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import models
from models import CohortModel, assign_cells
from models.cohort import DEFAULT_BANDS, band_index

KEYS = ["f", "r", "channel"]


@pytest.fixture()
def cells():
    return pd.DataFrame({
        "f":       [0, 0, 0, 0, 1],
        "r":       [0, 0, 1, 1, 0],
        "channel": ["web", "app", "web", "app", "web"],
        "n_customers": [40, 10, 20, 5, 100],
        "revenue_sum": [4000.0, 3000.0, 400.0, 50.0, 30000.0],
        "revenue_sq_sum": [40 * (100 ** 2 + 50 ** 2), 10 * 300 ** 2, 20 * 20 ** 2, 5 * 10 ** 2, 100 * 300 ** 2],
    })


QUERY = pd.DataFrame({"f": [0, 0, 0, 1, 2, 1], "r": [0, 0, 1, 0, 0, 0],
                      "channel": ["web", "app", "web", "web", "web", "dm"]}, index=list("abcdef"))


def test_backoff_by_hand(cells):
    model = CohortModel(key_columns=KEYS, min_cell_size=30).fit(cells)
    out = model.predict(QUERY)
    assert list(out.index) == list("abcdef")
    # a: own cell (40 customers) -> 4000 / 40
    # b: (0,0,app) has 10 -> drop channel: (0,0) has 50 customers, 7000 -> 140
    # c: (0,1,web) has 20 -> (0,1) has 25 -> (0) has 75 customers, 7450 -> 99.33
    # d: own cell -> 300
    # e: never seen -> population: 175 customers, 37450 -> 214
    # f: unseen channel 'dm' -> (1,0) has 100 customers -> 300
    assert out["expected_revenue"].tolist() == pytest.approx([100, 140, 7450 / 75, 300, 37450 / 175, 300])
    assert out["level"].tolist() == [0, 1, 2, 0, 3, 1]
    assert out["level_keys"].tolist() == ["f,r,channel", "f,r", "f", "f,r,channel", "", "f,r"]
    assert out["cell_n_customers"].tolist() == [40, 50, 75, 100, 175, 100]
    # spread in cell a: mean of squares 12500 - 100^2 = 2500 -> sd 50
    assert out.loc["a", "revenue_sd"] == pytest.approx(50.0)
    assert model.fit_info_["n_sparse_cells"] == 3


def test_backoff_order_is_configurable(cells):
    model = CohortModel(key_columns=KEYS, min_cell_size=30, backoff_order=["channel", "f", "r"]).fit(cells)
    out = model.predict(QUERY.loc[["c"]])
    # drop r first: (channel=web, f=0) has 40 + 20 = 60 customers, 4400 -> 73.33
    assert out["expected_revenue"].iloc[0] == pytest.approx(4400 / 60)
    assert out["level_keys"].iloc[0] == "channel,f"


def test_min_cell_size_one_uses_every_cell(cells):
    out = CohortModel(key_columns=KEYS, min_cell_size=1).fit(cells).predict(QUERY)
    assert out["expected_revenue"].tolist()[:4] == pytest.approx([100, 300, 20, 300])


def test_contract_errors(cells):
    with pytest.raises(ValueError, match="lacks columns"):
        CohortModel(key_columns=KEYS).fit(cells.drop(columns="revenue_sum"))
    with pytest.raises(ValueError, match="one row per cell"):
        CohortModel(key_columns=KEYS).fit(pd.concat([cells, cells.iloc[[0]]]))
    with pytest.raises(ValueError, match="missing key"):
        CohortModel(key_columns=KEYS).fit(cells.assign(channel=[None, "app", "web", "app", "web"]))
    with pytest.raises(ValueError, match="must list exactly the key columns"):
        CohortModel(key_columns=KEYS, backoff_order=["f", "r"])
    with pytest.raises(ValueError, match="lacks key columns"):
        CohortModel(key_columns=KEYS).fit(cells).predict(QUERY.drop(columns="channel"))


def test_save_load_round_trip(tmp_path, cells):
    model = CohortModel(key_columns=KEYS, min_cell_size=30).fit(cells)
    path = model.save(tmp_path / "cohort.json")
    document = json.loads(path.read_text())
    assert document["model"] == "cohort" and len(document["params"]["cells"]) == 5
    assert document["hyperparameters"]["key_columns"] == KEYS
    loaded = models.load_model(path)
    assert isinstance(loaded, CohortModel) and loaded.min_cell_size == 30
    pd.testing.assert_frame_equal(loaded.predict(QUERY), model.predict(QUERY))


def test_band_edges():
    assert band_index([0, 0.5, 1, 2, 4, 5, 19, 20, 1000], DEFAULT_BANDS["frequency"]).tolist() == [
        0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert band_index([0, 29.9, 30, 364, 365, 10_000], DEFAULT_BANDS["recency_days"]).tolist() == [0, 0, 1, 4, 5, 6]
    with pytest.raises(ValueError, match="below the first band edge"):
        band_index([-1], DEFAULT_BANDS["frequency"], "frequency")
    with pytest.raises(ValueError, match="strictly increasing"):
        band_index([1], [0, 5, 5])


def test_assign_cells():
    out = assign_cells(frequency=[0, 3, 25], recency_days=[10, 45, 800], tenure_days=[10, 200, 4000],
                       channel=["web", "app", "dm"])
    expected = pd.DataFrame({"frequency_band": [0, 3, 6], "recency_band": [0, 1, 6], "tenure_band": [0, 2, 6],
                             "channel": ["web", "app", "dm"]})
    pd.testing.assert_frame_equal(out, expected, check_dtype=False)
    custom = assign_cells([0, 1], [0, 100], [0, 100], bands={"frequency": [0, 1], "recency_days": [0, 50],
                                                              "tenure_days": [0, 1000]})
    assert custom.to_numpy().tolist() == [[0, 0, 0], [1, 1, 0]]
    with pytest.raises(ValueError, match="bands lacks edges"):
        assign_cells([0], [0], [0], bands={"frequency": [0]})
    with pytest.raises(ValueError, match="differ in length"):
        assign_cells([0, 1], [0], [0])


def test_default_bands_are_plain_data():
    # the Spark side builds the same bands from this structure: a dict of lists of numbers
    assert json.loads(json.dumps(DEFAULT_BANDS)) == DEFAULT_BANDS
    assert set(DEFAULT_BANDS) == {"frequency", "recency_days", "tenure_days"}
    for edges in DEFAULT_BANDS.values():
        assert edges[0] == 0 and all(np.diff(edges) > 0)
