"""A model version logged to MLflow loads back as a pyfunc and scores like the bundle, quietly."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

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


def test_logged_bundle_loads_as_pyfunc_and_scores_the_same(tmp_path):
    import mlflow

    bundle = _bundle()
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
