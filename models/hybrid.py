"""The hybrid value model: gradient-boosted trees on BTYD outputs and behavioural features.

Pure pandas / scikit-learn (no Spark). At a cutoff ``C`` the trees are trained on customers as of
``C - H`` (their features, and the outputs of a BTYD bundle fitted at ``C - H``), with the target
their realised net value in ``(C - H, C]``; they then predict each customer's next-``H`` net value
from the same inputs as of ``C`` (BTYD outputs of the bundle fitted at ``C``). So the trees learn
how far the BTYD forecast and the customer's own recent behaviour should be trusted *on this
client's data*, which is what the published hybrids (Chou et al. 2022, EJOR) found to beat either
alone.

* :func:`design_matrix` builds the inputs (:data:`NUMERIC_INPUTS`, :data:`CATEGORICAL_INPUTS`) from
  customer features and a :class:`models.bundle.ScoringBundle`; every time is in days, whatever
  the features' time unit, so a model trained in weeks reads the same numbers as one in days.
* :class:`HybridValueModel` (``fit`` / ``predict``, hyper-parameters in the constructor, fitted
  values ending in ``_``) wraps ``HistGradientBoostingRegressor`` with Poisson loss (values are
  non-negative with many zeros), monotonic constraints where the direction is known
  (:data:`MONOTONIC`), and acquisition channel / first category as native categorical inputs.
* :class:`HybridBundle` is what scoring, the backtest and MLflow use: the BTYD bundle fitted at the
  scoring cutoff plus the trees; :meth:`HybridBundle.predict` returns the same columns as
  :meth:`ScoringBundle.predict` (p_alive, expected purchases, ... from the BTYD components; the
  net value from the trees).
* :func:`bundle_from_payload` / :func:`load_bundle` read either kind of bundle.

The trees are stored with ``pickle`` (scikit-learn's own persistence) next to the JSON of the BTYD
components, with the scikit-learn version: loading under another version is refused with a message.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from models.bundle import (DAYS_PER_UNIT, FEATURE_COLUMNS, GROUP_COLUMNS, INTERVAL_COLUMNS, LOADINGS_COLUMN,
                           SCORE_COLUMNS, ScoringBundle)

HYBRID_FORMAT_VERSION = 1
VALUE_MODEL = "hybrid"

#: customer_features columns the design matrix reads (besides the BTYD bundle's own).
BEHAVIOUR_COLUMNS = ("n_orders", "n_cancelled", "n_purchase_days", "frequency", "recency", "T",
                     "monetary_value", "avg_order_value", "cancel_rate_count", "cancel_rate_amount",
                     "gap_mean_days", "gap_std_days", "orders_3m", "net_3m", "orders_6m", "net_6m",
                     "acquisition_channel", "first_category")

#: Numeric inputs of the trees, in order.
#: Left out on purpose: inputs that grow with a customer's age (tenure, lifetime net amount, the
#: trailing 12 months). The training customers are one horizon younger than the scored ones, so
#: trees would split on ages they never see at scoring and extrapolate flat; on CDNOW (where every
#: customer joined in the same quarter) they made the ranking worse. Age reaches the trees
#: through the BTYD outputs, which model it.
NUMERIC_INPUTS = ("btyd_net_value", "btyd_expected_purchases", "btyd_p_alive", "btyd_order_value",
                  "predicted_cancel_rate", "days_since_last", "purchase_days", "monetary_value",
                  "avg_order_value", "cancel_rate_count", "cancel_rate_amount", "gap_mean_days",
                  "gap_std_days", "orders_3m", "net_3m", "orders_6m", "net_6m")
#: Categorical inputs (native categorical splits; unseen and missing levels share one bin).
CATEGORICAL_INPUTS = ("acquisition_channel", "first_category")
INPUTS = NUMERIC_INPUTS + CATEGORICAL_INPUTS
#: Known directions: +1 the prediction never falls as the input grows, -1 never rises.
#: A more recent last purchase (fewer days since it) never lowers the prediction; neither does a
#: higher BTYD forecast or more spend in the last three / six months.
MONOTONIC = {"btyd_net_value": 1, "btyd_expected_purchases": 1, "btyd_p_alive": 1, "days_since_last": -1,
             "net_3m": 1, "net_6m": 1}
#: How many distinct levels a categorical input keeps (the most frequent; the rest share "other").
MAX_LEVELS = 50
OTHER = "other"
#: Smallest BTYD forecast the trees multiply (currency units).
BASE_FLOOR = 1e-3


def design_matrix(features: pd.DataFrame, btyd: ScoringBundle, btyd_scores: pd.DataFrame | None = None
                  ) -> pd.DataFrame:
    """The trees' inputs (:data:`INPUTS`) for customer feature rows, with the BTYD outputs of ``btyd``.

    ``btyd_scores`` (``btyd.predict(features)``) may be passed when the caller has it already.
    Times are converted to days from the features' time unit (the bundle's).
    """
    scores = btyd.predict(features) if btyd_scores is None else btyd_scores
    per_unit = DAYS_PER_UNIT[btyd.time_unit]
    number = {c: pd.to_numeric(features[c], errors="coerce").to_numpy(float) for c in BEHAVIOUR_COLUMNS
              if c not in CATEGORICAL_INPUTS}
    out = pd.DataFrame({
        "btyd_net_value": scores["predicted_net_value"].to_numpy(float),
        "btyd_expected_purchases": scores["expected_purchases"].to_numpy(float),
        "btyd_p_alive": scores["p_alive"].to_numpy(float),
        "btyd_order_value": scores["expected_order_value"].to_numpy(float),
        "predicted_cancel_rate": scores["predicted_cancel_rate"].to_numpy(float),
        "days_since_last": (number["T"] - number["recency"]) * per_unit,
        "purchase_days": number["n_purchase_days"],
        **{c: number[c] for c in ("monetary_value", "avg_order_value", "cancel_rate_count", "cancel_rate_amount",
                                  "gap_mean_days", "gap_std_days", "orders_3m", "net_3m", "orders_6m", "net_6m")},
    }, index=features.index)
    for column in CATEGORICAL_INPUTS:
        out[column] = features[column].astype(object).where(features[column].notna(), None)
    return out[list(INPUTS)]


@dataclass
class HybridValueModel:
    """``HistGradientBoostingRegressor`` (Poisson loss) on :func:`design_matrix` inputs.

    Hyper-parameters in the constructor; ``fit`` returns ``self``; fitted values end in ``_``.
    """

    max_iter: int = 100
    learning_rate: float = 0.05
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 100
    l2_regularization: float = 1.0
    loss: str = "poisson"
    monotonic: bool = True
    # "btyd": the trees learn a multiplicative correction of the BTYD forecast (Poisson with offset
    # log(BTYD value): target y / BTYD, weight BTYD); None: they learn the value from scratch
    offset: str | None = None
    exclude: tuple[str, ...] = ()       # inputs left out (names of INPUTS)
    # OpenMP threads for fit and predict: 1 by default (a Spark task has one core; more threads on
    # a shared machine made a 2,357-row fit take 116 s instead of 2 s here)
    threads: int = 1
    random_state: int = 0
    levels_: dict[str, list[str]] | None = None
    inputs_: list[str] | None = None
    estimator_: Any = None
    n_train_: int = 0
    importances_: dict[str, float] | None = None

    def _encode(self, design: pd.DataFrame) -> pd.DataFrame:
        """Categorical inputs as codes 0..k-1 of the levels kept at fit (unseen / missing: NaN)."""
        columns: dict[str, np.ndarray] = {}
        for column in design.columns:
            if column not in CATEGORICAL_INPUTS:
                columns[column] = design[column].to_numpy(dtype=float, na_value=np.nan)
                continue
            levels = self.levels_[column]
            values = design[column]
            # pd.Categorical matches every value against the kept levels in one hashed pass
            codes = pd.Categorical(values.astype(object), categories=levels).codes.astype(float)
            unseen = (codes < 0) & values.notna().to_numpy()
            codes[codes < 0] = np.nan
            if OTHER in levels:
                codes[unseen] = float(levels.index(OTHER))
            columns[column] = codes
        # an input missing for everyone (CDNOW has no channel) cannot be binned: a constant instead
        for column, values in columns.items():
            if len(values) and np.isnan(values).all():
                columns[column] = np.zeros(len(values))
        return pd.DataFrame(columns, index=design.index)

    def fit(self, design: pd.DataFrame, target, sample_weight=None) -> "HybridValueModel":
        from sklearn.ensemble import HistGradientBoostingRegressor

        missing = [c for c in INPUTS if c not in design.columns]
        if missing:
            raise ValueError(f"design matrix lacks {missing}")
        y = np.clip(np.asarray(target, dtype=float), 0.0, None)     # net value is never negative
        if not np.isfinite(y).all():
            raise ValueError("the target holds missing or infinite values")
        if len(y) != len(design):
            raise ValueError(f"design has {len(design)} rows, target {len(y)}")
        if y.sum() <= 0:
            raise ValueError("nobody in the training sample bought in the target window: nothing to learn")
        self.levels_ = {}
        for column in CATEGORICAL_INPUTS:
            counts = design[column].dropna().astype(str).value_counts()
            kept = sorted(counts.index[:MAX_LEVELS - 1])
            if len(counts) > MAX_LEVELS - 1:
                kept.append(OTHER)
            self.levels_[column] = kept
        unknown = sorted(set(self.exclude) - set(INPUTS))
        if unknown:
            raise ValueError(f"exclude names {unknown}, not inputs of the hybrid ({', '.join(INPUTS)})")
        self.inputs_ = [c for c in INPUTS if c not in self.exclude]
        X = self._encode(design[list(INPUTS)])[self.inputs_]
        constraints = [MONOTONIC.get(c, 0) if self.monotonic else 0 for c in self.inputs_]
        categorical = [c in CATEGORICAL_INPUTS and len(self.levels_[c]) > 0 for c in self.inputs_]
        self.estimator_ = HistGradientBoostingRegressor(
            loss=self.loss, max_iter=self.max_iter, learning_rate=self.learning_rate,
            max_leaf_nodes=self.max_leaf_nodes, min_samples_leaf=self.min_samples_leaf,
            l2_regularization=self.l2_regularization, monotonic_cst=constraints,
            categorical_features=np.array(categorical), early_stopping=False, random_state=self.random_state)
        weight = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if self.offset == "btyd":
            base = self._base(design)
            y, weight = y / base, weight * base
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=self.threads):
            self.estimator_.fit(X, y, sample_weight=weight)
        self.n_train_ = int(len(y))
        return self

    def predict(self, design: pd.DataFrame) -> np.ndarray:
        if self.estimator_ is None:
            raise ValueError("HybridValueModel is not fitted")
        if design.empty:
            return np.zeros(0)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=self.threads):
            predicted = self.estimator_.predict(self._encode(design[list(INPUTS)])[self.inputs_])
        if self.offset == "btyd":
            predicted = predicted * self._base(design)
        return np.clip(predicted, 0.0, None)

    @staticmethod
    def _base(design: pd.DataFrame) -> np.ndarray:
        """The BTYD forecast the trees correct, floored (a customer the BTYD values at 0 keeps a tiny base)."""
        return np.maximum(design["btyd_net_value"].to_numpy(float), BASE_FLOOR)

    def permutation_importance(self, design: pd.DataFrame, actual, n_repeats: int = 5, seed: int = 0
                               ) -> pd.DataFrame:
        """How much the mean absolute error per customer grows when one input is shuffled (mean and
        spread over ``n_repeats`` shuffles), largest first: the inputs the predictions lean on."""
        from sklearn.inspection import permutation_importance

        X = self._encode(design[list(INPUTS)])[self.inputs_]
        from threadpoolctl import threadpool_limits

        if self.offset == "btyd":
            raise NotImplementedError("permutation importance of the offset variant is not implemented")
        with threadpool_limits(limits=self.threads):
            result = permutation_importance(self.estimator_, X, np.asarray(actual, dtype=float),
                                            scoring="neg_mean_absolute_error", n_repeats=n_repeats,
                                            random_state=seed)
        return (pd.DataFrame({"feature": list(self.inputs_), "importance": result.importances_mean,
                              "importance_std": result.importances_std})
                .sort_values("importance", ascending=False, kind="mergesort").reset_index(drop=True))

    # -- persistence ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        import sklearn

        return pickle.dumps({"sklearn_version": sklearn.__version__, "model": self})

    @classmethod
    def from_bytes(cls, blob: bytes, source: str = "bytes") -> "HybridValueModel":
        import sklearn

        document = pickle.loads(blob)   # noqa: S301 -- our own artifact (MLflow registry / broadcast)
        if document.get("sklearn_version") != sklearn.__version__:
            raise ValueError(f"{source}: the hybrid's trees were saved with scikit-learn "
                             f"{document.get('sklearn_version')}, this environment has {sklearn.__version__}; "
                             "re-run the backtest (or `cvseg fit`) to refit")
        return document["model"]


def rescale_intervals(scores: pd.DataFrame, scale: np.ndarray) -> None:
    """Multiply each row's value distribution by ``scale`` in place (NaN: the row's interval becomes NaN).

    ``c * V`` keeps ``P(V = 0)``; its quantiles, sd and parameter loadings are ``c`` times ``V``'s."""
    for column in (*INTERVAL_COLUMNS[:3], *GROUP_COLUMNS):
        scores[column] = scores[column].to_numpy(float) * scale
    scores[INTERVAL_COLUMNS[3]] = np.where(np.isfinite(scale), scores[INTERVAL_COLUMNS[3]].to_numpy(float), np.nan)
    loadings = scores[LOADINGS_COLUMN]
    if loadings.isna().all():
        return
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pa.array(loadings)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    per_value = np.repeat(np.nan_to_num(scale, nan=0.0), lengths)
    values = pc.multiply(pc.list_flatten(lists), pa.array(per_value))
    mask = pc.or_(pc.is_null(lists), pa.array(~np.isfinite(scale)))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    scores[LOADINGS_COLUMN] = pd.arrays.ArrowExtensionArray(
        pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask))


@dataclass
class HybridBundle:
    """The BTYD bundle fitted at the scoring cutoff plus the trees; scores like a :class:`ScoringBundle`."""

    btyd: ScoringBundle
    trees: HybridValueModel
    metadata: dict[str, Any] = field(default_factory=dict)
    value_model: str = VALUE_MODEL
    #: read like ScoringBundle.intervals / group_terms: the base's interval, rescaled to the trees' value
    #: (:meth:`predict`), and the terms of group totals (the backtest switches these off)
    intervals: bool = True
    group_terms: bool = True

    # the attributes the pipelines read from any bundle
    @property
    def purchase(self):
        return self.btyd.purchase

    @property
    def spend(self):
        return self.btyd.spend

    @property
    def cancellation(self):
        return self.btyd.cancellation

    @property
    def cohort(self):
        return None

    @property
    def by_channel(self):
        """The per-channel components of the BTYD bundle the trees read (None: pooled, as it is fitted)."""
        return self.btyd.by_channel

    @property
    def purchase_basis(self) -> str:
        return self.btyd.purchase_basis

    @property
    def horizon_months(self) -> int:
        return self.btyd.horizon_months

    @property
    def time_unit(self) -> str:
        return self.btyd.time_unit

    @property
    def horizon(self) -> float:
        return self.btyd.horizon

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.btyd.feature_columns + BEHAVIOUR_COLUMNS))

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        """:data:`SCORE_COLUMNS` per customer row, the net value from the trees (never NaN, checked),
        then the interval columns of :meth:`ScoringBundle.predict`, rescaled to that value.

        The trees give a mean, not a distribution. The interval is the BTYD base's distribution of the
        same customer's value scaled by ``trees' value / BTYD value``: the trees move where a
        customer's value lies, the base says how spread and how likely zero it is (P(value = 0) kept,
        quantiles, sd and parameter loadings multiplied). A customer whose BTYD value is 0 (placed by
        rule) gets no interval. The backtest measures the coverage this gives like any model's.
        """
        scores = dataclasses.replace(self.btyd, intervals=self.intervals, group_terms=self.group_terms
                                     ).predict(features)
        if len(features):
            net = self.trees.predict(design_matrix(features, self.btyd, scores))
            if not np.isfinite(net).all():
                raise FloatingPointError(f"{int((~np.isfinite(net)).sum())} customers got non-finite hybrid values")
            base = scores["predicted_net_value"].to_numpy(float)
            scale = np.divide(net, base, out=np.full(len(net), np.nan), where=base > 0)
            scores["predicted_net_value"] = net
            rescale_intervals(scores, scale)
        return scores

    def input_example(self) -> pd.DataFrame:
        """One customer row with every column :meth:`predict` reads (the MLflow signature's example)."""
        row = {"customer_id": "C1", "frequency": 2.0, "recency": 30.0, "T": 60.0, "monetary_value": 5000.0,
               "n_orders": 3.0, "n_cancelled": 0.0, "net_6m": 12000.0, "acquisition_channel": "web",
               "net_frequency": 2.0, "net_recency": 30.0, "net_T": 60.0, "net_monetary_value": 5000.0,
               "n_purchase_days": 3.0, "avg_order_value": 5000.0, "cancel_rate_count": 0.0,
               "cancel_rate_amount": 0.0, "gap_mean_days": 15.0, "gap_std_days": 5.0, "orders_3m": 1.0,
               "net_3m": 5000.0, "orders_6m": 3.0, "first_category": "food"}
        return pd.DataFrame([row])[list(self.feature_columns)]

    def to_payload(self) -> dict[str, Any]:
        return {"value_model": VALUE_MODEL, "btyd": self.btyd.to_payload(),
                "trees": base64.b64encode(self.trees.to_bytes()).decode("ascii"), "metadata": self.metadata}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "HybridBundle":
        return cls(btyd=ScoringBundle.from_payload(payload["btyd"]),
                   trees=HybridValueModel.from_bytes(base64.b64decode(payload["trees"]), "payload"),
                   metadata=dict(payload.get("metadata", {})))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.btyd.save(folder / "btyd")
        (folder / "trees.pkl").write_bytes(self.trees.to_bytes())
        manifest = {"format_version": HYBRID_FORMAT_VERSION, "value_model": VALUE_MODEL, "btyd": "btyd",
                    "trees": "trees.pkl", "metadata": self.metadata, "purchase_basis": self.purchase_basis,
                    "horizon_months": self.horizon_months, "time_unit": self.time_unit}
        (folder / "bundle.json").write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "HybridBundle":
        folder = Path(folder)
        manifest = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
        if manifest.get("format_version") != HYBRID_FORMAT_VERSION:
            raise ValueError(f"{folder}: hybrid bundle format_version {manifest.get('format_version')!r} is not "
                             f"{HYBRID_FORMAT_VERSION}; re-fit with this engine version")
        return cls(btyd=ScoringBundle.load(folder / manifest["btyd"]),
                   trees=HybridValueModel.from_bytes((folder / manifest["trees"]).read_bytes(), str(folder)),
                   metadata=manifest.get("metadata", {}))

    def describe(self) -> dict[str, Any]:
        return {**self.btyd.describe(), "value_model": VALUE_MODEL, "training_rows": self.trees.n_train_,
                "training_cutoff": self.metadata.get("training_cutoff")}


def bundle_from_payload(payload: Mapping[str, Any]) -> ScoringBundle | HybridBundle:
    """Either kind of bundle from its broadcast payload."""
    if payload.get("value_model") == VALUE_MODEL:
        return HybridBundle.from_payload(payload)
    return ScoringBundle.from_payload(dict(payload))


def load_bundle(folder: str | Path) -> ScoringBundle | HybridBundle:
    """Either kind of bundle from a saved folder (the MLflow artifact ``bundle``)."""
    manifest = Path(folder) / "bundle.json"
    if manifest.exists() and json.loads(manifest.read_text(encoding="utf-8")).get("value_model") == VALUE_MODEL:
        return HybridBundle.load(folder)
    return ScoringBundle.load(folder)


def training_target(features: pd.DataFrame, column: str = "holdout_net") -> np.ndarray:
    """Realised net value in the window after the training cutoff (negative totals count as 0)."""
    return np.clip(features[column].to_numpy(float), 0.0, None)


__all__ = ["HybridValueModel", "HybridBundle", "design_matrix", "bundle_from_payload", "load_bundle", "INPUTS",
           "NUMERIC_INPUTS", "CATEGORICAL_INPUTS", "MONOTONIC", "BEHAVIOUR_COLUMNS", "FEATURE_COLUMNS"]
