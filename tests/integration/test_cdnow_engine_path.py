"""Through the engine's own path: raw CDNOW_sample.txt -> ingest (conf mapping) -> features as of
1997-09-30 in weeks -> fit. Features must equal lifetimes' summary; parameters the published values."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from core.config import load_config
from pipelines.features import run_features
from pipelines.ingest import run_ingest
from pipelines.ltv import fit_btyd_bundles

AS_OF = dt.date(1997, 9, 30)
CONF = Path(__file__).resolve().parents[2] / "conf" / "examples" / "cdnow.yaml"


def _cdnow_path() -> Path:
    import lifetimes

    return Path(lifetimes.__file__).parent / "datasets" / "CDNOW_sample.txt"


@pytest.fixture(scope="module")
def cdnow(spark, tmp_path_factory):
    from core.storage import Storage

    warehouse = tmp_path_factory.mktemp("cdnow") / "warehouse"
    config = load_config(CONF, [f"storage.warehouse={warehouse}", f"source.path={_cdnow_path()}"])
    storage = Storage(spark, str(warehouse), backend="deltalake")
    summary = run_ingest(spark, storage, config.source, config.validation, config.business.timezone,
                         dt.date(2026, 1, 1), path=str(_cdnow_path()))
    run_features(storage, AS_OF, config.features)
    features = storage.read("customer_features").where(F.col("as_of_date") == F.lit(AS_OF))
    return config, storage, summary, features


def _lifetimes_summary() -> pd.DataFrame:
    from lifetimes.utils import summary_data_from_transaction_data

    raw = pd.read_csv(_cdnow_path(), sep=r"\s+", header=None,
                      names=["customer_id", "customer_index", "date", "quantity", "amount"],
                      dtype={"customer_id": str})
    raw["date"] = pd.to_datetime(raw["date"].astype(str), format="%Y%m%d")
    return summary_data_from_transaction_data(raw, "customer_id", "date", monetary_value_col="amount", freq="D",
                                              freq_multiplier=7, observation_period_end="1997-09-30")


def test_features_equal_lifetimes_summary_for_every_customer(cdnow):
    _, storage, summary, features = cdnow
    assert storage.read("orders").count() == 6919
    assert storage.read_or_empty("orders_quarantine").count() == 0
    ours = features.select("customer_id", "frequency", "recency", "T", "monetary_value").toPandas()
    ours = ours.set_index("customer_id").sort_index()
    ref = _lifetimes_summary().sort_index()
    assert len(ours) == len(ref) == 2357
    assert list(ours.index) == list(ref.index)
    np.testing.assert_array_equal(ours["frequency"].to_numpy(), ref["frequency"].to_numpy())
    np.testing.assert_allclose(ours["recency"], ref["recency"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours["T"], ref["T"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours["monetary_value"], ref["monetary_value"], rtol=1e-9, atol=1e-9)


def test_fit_through_the_engine_matches_published_values(cdnow):
    config, _, _, features = cdnow
    fitted = fit_btyd_bundles(features, ("bgnbd", "paretonbd"), config.features.time_unit)
    bg = fitted.bundles["bgnbd"].purchase.params_
    published_bg = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
    for key, value in published_bg.items():
        assert bg[key] == pytest.approx(value, rel=5e-3), key
    pareto = fitted.bundles["paretonbd"].purchase.params_
    for key, value in {"r": 0.553, "alpha": 10.578, "s": 0.606, "beta": 11.669}.items():
        assert pareto[key] == pytest.approx(value, rel=5e-3), key
    gg = fitted.bundles["bgnbd"].spend.params_
    for key, value in {"p": 6.25, "q": 3.74, "v": 15.44}.items():
        assert gg[key] == pytest.approx(value, rel=5e-3), key
    expected = fitted.bundles["bgnbd"].purchase.expected_purchases(39, [2], [30.43], [38.86])
    assert float(expected[0]) == pytest.approx(1.226, abs=5e-4)
    # sufficient statistics: far fewer rows than customers, all customers counted
    assert fitted.sizes["customers"] == 2357 and fitted.sizes["rfm_rows"] < 2357


def test_fit_gives_the_same_bits_whatever_order_the_statistics_arrive_in(cdnow):
    # a resumed or cluster run groups the same features in other tasks: the statistics reach the
    # driver in another order, and the parameters (so every score) must not move in the last bits
    config, _, _, features = cdnow
    shuffled = features.repartition(7, F.rand(seed=3))
    one, other = (fit_btyd_bundles(df, ("bgnbd",), config.features.time_unit).bundles["bgnbd"]
                  for df in (features.coalesce(1), shuffled))
    assert one.purchase.params_ == other.purchase.params_
    assert one.spend.params_ == other.spend.params_
    assert one.cancellation.params_ == other.cancellation.params_
