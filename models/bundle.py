"""What scoring needs, as one versioned object: the champion's value model plus BTYD components.

A :class:`ScoringBundle` always carries the BTYD components (a purchase model, Gamma-Gamma spend
model and the beta-binomial cancellation model), because every customer score reports
``p_alive``, expected purchases, expected order value and the predicted cancellation rate. The
6-month net value comes from ``value_model``:

* ``"btyd"``: expected purchases x expected order value x (1 - predicted cancellation rate);
* ``"cohort"``: the mean actual net revenue of the customer's cell six months earlier
  (the empirical six-month cohort method, :class:`models.cohort.CohortModel`);
* ``"naive"``: the customer's own net revenue of the last six months.

``purchase_basis`` says which orders the purchase and spend models were fitted on and so which
feature columns they read: ``"gross"`` (every order, cancelled ones too: ``frequency``,
``recency``, ``T``, ``monetary_value`` of gross amounts; the value is then net of the predicted
cancellation rate) or ``"net"`` (completed orders only: ``net_frequency``, ``net_recency``,
``net_T``, ``net_monetary_value`` of net amounts; the value needs no cancellation factor). Under
the net basis a customer without a completed order has no BTYD score: value, purchases and
p_alive are 0 and the row's ``purchase_basis`` is ``"net_rule"`` (the segment rules place them:
``new`` when recent, else ``dormant``).

:meth:`ScoringBundle.predict` takes a pandas frame of customer features (the columns named in
:data:`FEATURE_COLUMNS`) and returns :data:`SCORE_COLUMNS` and :data:`INTERVAL_COLUMNS` (P10 / P50 /
P90 of the 6-month net value and P(value = 0), :mod:`models.intervals`; NaN for the cohort and
naive values and customers placed by rule), then :data:`GROUP_COLUMNS` and
:data:`LOADINGS_COLUMN` (what intervals of group totals add up; NaN / None likewise); it is what Spark's ``mapInPandas``
runs per batch and what the MLflow pyfunc serves. Everything is pure numpy/pandas.

**Channel-aware bundles** (``by_channel``, :mod:`models.channels`): the purchase and spend
parameters of each acquisition channel, shrunk towards the pooled ones; a customer is scored (and
gets its interval) with the components of its ``acquisition_channel``, and a customer whose channel
is null, was unseen at fit time or had too few customers, with the pooled ones. Without
``by_channel`` every customer is scored with the pooled components, as before (same numbers, same
payload and files).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from models import intervals as intervals_lib
from models.base import BaseModel, PurchaseModel, SpendModel, load_model
from models.cancellation import CancellationRateModel
from models.channels import ChannelComponents
from models.cohort import DEFAULT_BANDS, CohortModel, assign_cells
from models.naive import NaiveRepeatModel

BUNDLE_FORMAT_VERSION = 1
VALUE_MODELS = ("btyd", "cohort", "naive")
DAYS_PER_UNIT = {"days": 1.0, "weeks": 7.0}
#: The file of a saved channel-aware bundle holding the per-channel components.
CHANNELS_FILE = "channels.json"

#: Feature columns a bundle reads (a subset of the customer_features table).
FEATURE_COLUMNS = ("customer_id", "frequency", "recency", "T", "monetary_value", "n_orders", "n_cancelled",
                   "net_6m", "acquisition_channel")
#: Net-basis statistics (completed orders only) a ``purchase_basis="net"`` bundle reads as well.
NET_FEATURE_COLUMNS = ("net_frequency", "net_recency", "net_T", "net_monetary_value")
PURCHASE_BASES = ("gross", "net")
#: Columns :meth:`ScoringBundle.predict` returns, in order (all doubles but the id and the basis).
SCORE_COLUMNS = ("customer_id", "p_alive", "expected_purchases", "expected_order_value", "predicted_gross_value",
                 "predicted_cancel_rate", "predicted_net_value", "purchase_basis")
#: The value interval columns :meth:`ScoringBundle.predict` adds after them (doubles, NaN = no interval):
#: P10 / P50 / P90 of the same 6-month net value and the probability that it is 0 (models.intervals).
INTERVAL_COLUMNS = ("predicted_net_value_p10", "predicted_net_value_p50", "predicted_net_value_p90",
                    "p_zero_value")
#: What intervals of group totals need (models.intervals.group_terms), after INTERVAL_COLUMNS (NaN = no
#: interval): the value's sd and its parameter part's sd (doubles), then the loadings (arrays of doubles).
GROUP_COLUMNS = ("predicted_net_value_sd", "predicted_net_value_param_sd")
LOADINGS_COLUMN = "predicted_net_value_param_loadings"


def loadings_column(loadings: np.ndarray, present: np.ndarray) -> pd.arrays.ArrowExtensionArray:
    """One Arrow ``list<double>`` per row of ``loadings`` (null where not ``present``), built from the flat
    matrix: no Python object per customer (a column of numpy arrays cost ~1.3 s per 2M customers in
    pandas and again in Spark's per-row conversion; pipelines.ltv hands this column to Arrow as is)."""
    import pyarrow as pa

    rows, width = loadings.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    values = pa.array(np.ascontiguousarray(loadings, dtype=float).reshape(-1))
    return pd.arrays.ArrowExtensionArray(pa.ListArray.from_arrays(offsets, values, mask=pa.array(~present)))


def horizon_in_units(horizon_months: int, time_unit: str) -> float:
    """The horizon in the model's time unit (a month is 365.25/12 days)."""
    return horizon_months * 365.25 / 12.0 / DAYS_PER_UNIT[time_unit]


def cells_from_features(features: pd.DataFrame, time_unit: str, bands: Mapping[str, list[float]],
                        with_channel: bool) -> pd.DataFrame:
    """Cohort cells of customers from BTYD features (recency/T in ``time_unit``)."""
    per_unit = DAYS_PER_UNIT[time_unit]
    tenure_days = features["T"].to_numpy(float) * per_unit
    days_since_last = (features["T"].to_numpy(float) - features["recency"].to_numpy(float)) * per_unit
    channel = features["acquisition_channel"].fillna("unknown").to_numpy(object) if with_channel else None
    return assign_cells(features["frequency"].to_numpy(float), np.round(days_since_last, 6),
                        np.round(tenure_days, 6), channel=channel, bands=bands)


@dataclass
class ScoringBundle:
    purchase: PurchaseModel
    spend: SpendModel
    cancellation: CancellationRateModel
    value_model: str = "btyd"
    cohort: CohortModel | None = None
    naive: NaiveRepeatModel | None = None
    horizon_months: int = 6
    time_unit: str = "days"
    bands: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_BANDS.items()})
    cohort_with_channel: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    purchase_basis: str = "gross"
    #: add the value interval columns (``models.intervals: false`` leaves them null); not persisted:
    #: a scoring-time choice
    intervals: bool = True
    #: with the intervals, what totals of groups need (sd, parameter sd, loadings); the backtest, which
    #: reads only each customer's own interval, switches it off. Not persisted either
    group_terms: bool = True
    #: per-channel purchase and spend components (models.channels); None: the pooled ones for everyone
    by_channel: ChannelComponents | None = None

    def __post_init__(self) -> None:
        if self.purchase_basis not in PURCHASE_BASES:
            raise ValueError(f"purchase_basis must be one of {PURCHASE_BASES}, got {self.purchase_basis!r}")
        if self.value_model not in VALUE_MODELS:
            raise ValueError(f"value_model must be one of {VALUE_MODELS}, got {self.value_model!r}")
        if self.value_model == "cohort" and self.cohort is None:
            raise ValueError("value_model 'cohort' needs a fitted CohortModel")
        if self.time_unit not in DAYS_PER_UNIT:
            raise ValueError(f"time_unit must be days or weeks, got {self.time_unit!r}")

    @property
    def horizon(self) -> float:
        return horizon_in_units(self.horizon_months, self.time_unit)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """The customer_features columns :meth:`predict` reads."""
        return FEATURE_COLUMNS + (NET_FEATURE_COLUMNS if self.purchase_basis == "net" else ())

    def _btyd_inputs(self, features: pd.DataFrame) -> tuple[np.ndarray, ...]:
        """(scored, frequency, recency, T, monetary) on this bundle's basis; rows not scored hold zeros."""
        if self.purchase_basis == "gross":
            columns = ("frequency", "recency", "T", "monetary_value")
        else:
            columns = NET_FEATURE_COLUMNS
        values = [features[c].to_numpy(float) for c in columns]
        scored = np.isfinite(values[0])          # net basis: null for a customer who only cancelled
        if self.purchase_basis == "gross" and not scored.all():
            raise ValueError("features hold missing frequency values; rebuild customer_features")
        # a placeholder customer (1 purchase day, T 1) keeps the closed forms finite; overwritten below
        placeholder = (0.0, 0.0, 1.0, 0.0)
        return (scored, *[np.where(scored, v, fill) for v, fill in zip(values, placeholder)])

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        """Scores for each customer row; never NaN or infinite (checked)."""
        missing = [c for c in self.feature_columns if c not in features.columns]
        if missing:
            raise ValueError(f"features lack columns {missing}" + (
                " (the net purchase basis needs customer_features from this release: "
                "`cvseg features --as-of D --full`)" if set(missing) & set(NET_FEATURE_COLUMNS) else ""))
        scored, frequency, recency, age, monetary = self._btyd_inputs(features)
        cancel_rate = self.cancellation.predict(features["n_orders"].to_numpy(float),
                                                features["n_cancelled"].to_numpy(float))
        purchases, p_alive, order_value = (np.zeros(len(scored)) for _ in range(3))
        intervals = np.full((len(scored), len(INTERVAL_COLUMNS) + len(GROUP_COLUMNS)), np.nan)
        blocks = self.loading_blocks
        with_loadings = self.has_intervals and self.group_terms
        loadings = np.zeros((len(scored) if with_loadings else 0, self.loading_width * blocks))
        has_loadings = np.zeros(len(scored), dtype=bool)
        for rows, purchase, spend in self._component_groups(features):
            # rows None: every row (the pooled bundle; no subsetting, so exactly the former arithmetic)
            at = slice(None) if rows is None else rows
            inputs = [v[at] for v in (scored, frequency, recency, age, monetary)]
            purchases[at], p_alive[at], order_value[at] = self._btyd_scores(purchase, spend, *inputs)
            intervals[at], group_loadings = self._intervals(purchase, spend, *inputs, cancel_rate[at])
            if group_loadings is not None:
                # each fit's loadings in its own block of the array: group totals add a block's
                # coordinates (one fit's parameters) and treat the channels' fits as independent
                start = self._block_of(rows, features) * self.loading_width
                positions = np.arange(len(scored))[at][inputs[0]]
                loadings[positions, start:start + group_loadings.shape[1]] = group_loadings
                has_loadings[positions] = True
        if self.purchase_basis == "gross":
            gross = purchases * order_value
            btyd_net = gross * (1.0 - cancel_rate)
        else:
            # net basis: purchases of completed orders x their net value; gross implied by the rate
            btyd_net = purchases * order_value
            gross = btyd_net / np.maximum(1.0 - cancel_rate, 1e-9)
        if self.value_model == "btyd":
            net = btyd_net
        elif self.value_model == "cohort":
            cells = cells_from_features(features, self.time_unit, self.bands, self.cohort_with_channel)
            net = self.cohort.predict(cells)["expected_revenue"].to_numpy(float)
        else:
            net = features["net_6m"].fillna(0.0).to_numpy(float)
        out = pd.DataFrame({
            "customer_id": features["customer_id"].to_numpy(),
            "p_alive": p_alive, "expected_purchases": purchases, "expected_order_value": order_value,
            "predicted_gross_value": gross, "predicted_cancel_rate": cancel_rate, "predicted_net_value": net,
            "purchase_basis": np.where(scored, self.purchase_basis, "net_rule").astype(object),
        })
        for j, column in enumerate(INTERVAL_COLUMNS + GROUP_COLUMNS):
            out[column] = intervals[:, j]
        out[LOADINGS_COLUMN] = loadings_column(loadings, has_loadings) if has_loadings.any() else None
        numeric = out[list(SCORE_COLUMNS[1:-1])].to_numpy(float)
        if not np.isfinite(numeric).all():
            bad = ~np.isfinite(numeric).all(axis=1)
            raise FloatingPointError(
                f"{int(bad.sum())} customers got non-finite scores, e.g. "
                f"{features.loc[bad, list(self.feature_columns)].head(3).to_dict('records')}")
        return out

    def _component_groups(self, features: pd.DataFrame):
        """(rows, purchase model, spend model) covering every row once: ``rows`` None for all rows
        (no channel components), else one boolean mask per channel with own components and one for
        the rest (null, unseen or small channels), scored with the pooled components."""
        if self.by_channel is None or not self.by_channel.channels:
            yield None, self.purchase, self.spend
            return
        channel = features["acquisition_channel"].to_numpy(object)
        rest = np.ones(len(channel), dtype=bool)
        for name in self.by_channel.channels:
            rows = channel == name
            rest &= ~rows
            if rows.any():
                yield (rows, self.by_channel.purchase.get(name, self.purchase),
                       self.by_channel.spend.get(name, self.spend))
        if rest.any():
            yield rest, self.purchase, self.spend

    def _btyd_scores(self, purchase: PurchaseModel, spend: SpendModel, scored, frequency, recency, age, monetary
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expected purchases, p_alive, expected order value) under these components; 0 where not scored."""
        purchases = np.where(scored, purchase.expected_purchases(self.horizon, frequency, recency, age), 0.0)
        p_alive = np.where(scored, purchase.p_alive(frequency, recency, age), 0.0)
        order_value = np.where(scored, spend.expected_order_value(frequency, monetary), 0.0)
        return purchases, p_alive, order_value

    @property
    def has_intervals(self) -> bool:
        """Whether :meth:`predict` fills the interval columns: switched on, the BTYD value, and a purchase
        model whose count moments :mod:`models.intervals` has (BG/NBD, MBG/NBD, Pareto/NBD).
        The cohort and naive values (no distribution) get nulls."""
        return (self.intervals and self.value_model == "btyd"
                and self.purchase.name in intervals_lib.SUPPORTED_PURCHASE_MODELS)

    def _intervals(self, purchase: PurchaseModel, spend: SpendModel, scored, frequency, recency, age, monetary,
                   cancel_rate) -> tuple[np.ndarray, np.ndarray | None]:
        """(customers x INTERVAL_COLUMNS + GROUP_COLUMNS): P10, P50, P90, P(value = 0), sd and parameter sd
        under these components (each with its own parameter covariance), and the scored customers' loadings
        (rows of the scored customers only; None without intervals); NaN where there is no interval, also
        for customers placed by rule (net basis, no completed order: value 0 by rule, not a model)."""
        out = np.full((len(scored), len(INTERVAL_COLUMNS) + len(GROUP_COLUMNS)), np.nan)
        if not self.has_intervals or not scored.any():
            return out, None
        rows = scored
        purchase_points = intervals_lib.sigma_points(
            purchase.params_, purchase.fit_info_.get("log_param_covariance"), purchase.param_names)
        spend_points = intervals_lib.sigma_points(
            spend.params_, spend.fit_info_.get("log_param_covariance"), spend.param_names)
        by_point = self._count_moments_by_point(purchase, purchase_points, frequency[rows], recency[rows], age[rows])
        counts = by_point.averaged()
        spend_moments = intervals_lib.spend_moments(spend_points, frequency[rows], monetary[rows])
        # the same value as predicted_net_value: gross basis net of the predicted cancellation rate
        factor = 1.0 - cancel_rate[rows] if self.purchase_basis == "gross" else 1.0
        distribution = intervals_lib.value_distribution(counts, spend_moments, factor)
        out[rows, :3] = distribution.quantiles(intervals_lib.LEVELS)
        out[rows, 3] = np.clip(distribution.p_zero, 0.0, 1.0)
        if not self.group_terms:
            return out, None
        terms = intervals_lib.group_terms(by_point, intervals_lib.spend_means_by_point(
            spend_points, frequency[rows], monetary[rows]), distribution, factor)
        out[rows, 4], out[rows, 5] = terms.sd, terms.param_sd
        return out, terms.loadings

    @property
    def loading_width(self) -> int:
        """Coordinates of one fit's loadings: (purchase parameters) + (spend parameters), the sigma points
        of each less one (models.intervals.group_terms); a fit without a covariance fills none of them."""
        return len(self.purchase.param_names) + len(self.spend.param_names)

    @property
    def loading_blocks(self) -> int:
        """Blocks of the loadings array: the pooled fit's, then one per channel with own components
        (their order in ``by_channel.channels``), the same in every batch."""
        return 1 + (len(self.by_channel.channels) if self.by_channel is not None else 0)

    def _block_of(self, rows, features: pd.DataFrame) -> int:
        """The loadings block of a component group of :meth:`_component_groups`: 0 for the pooled rows
        (all rows, or the rest), else 1 + the channel's index in ``by_channel.channels``."""
        if rows is None or self.by_channel is None:
            return 0
        channels = features["acquisition_channel"].to_numpy(object)[rows]
        name = channels[0] if len(channels) else None
        return 1 + self.by_channel.channels.index(name) if name in self.by_channel.channels else 0

    def _count_moments_by_point(self, purchase: PurchaseModel, purchase_points, frequency, recency, age
                                ) -> intervals_lib.CountMoments:
        """The purchase count's moments over the horizon at each parameter vector (rows x customers):
        group totals need them per vector, the customer's own interval their average."""
        if purchase.name == "paretonbd":
            from models.btyd import pareto_p_alive     # the stable 2F1 form lives with the likelihood

            alive = np.stack([pareto_p_alive(row, frequency, recency, age) for row in purchase_points])
            return intervals_lib.pareto_count_moments_by_point(purchase_points, self.horizon, frequency, recency,
                                                               age, alive)
        return intervals_lib.count_moments_by_point(purchase_points, self.horizon, frequency, recency, age,
                                                    modified=purchase.name == "mbgnbd")

    # -- persistence ---------------------------------------------------------------------
    def to_payload(self) -> dict[str, Any]:
        """Plain, picklable dict (JSON documents of each component): what Spark broadcasts."""
        components = {"purchase": self.purchase, "spend": self.spend, "cancellation": self.cancellation,
                      "cohort": self.cohort, "naive": self.naive}
        payload = {"components": {role: m.to_dict() for role, m in components.items() if m is not None},
                   "value_model": self.value_model, "horizon_months": self.horizon_months,
                   "time_unit": self.time_unit, "bands": self.bands,
                   "cohort_with_channel": self.cohort_with_channel, "metadata": self.metadata,
                   "purchase_basis": self.purchase_basis}
        if self.by_channel is not None:       # only then: a pooled bundle's payload stays as before
            payload["by_channel"] = self.by_channel.to_dict()
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "ScoringBundle":
        from models.base import MODEL_REGISTRY

        parts = {role: MODEL_REGISTRY[doc["model"]].from_dict(doc, source=f"payload:{role}")
                 for role, doc in payload["components"].items()}
        return cls(purchase=parts["purchase"], spend=parts["spend"], cancellation=parts["cancellation"],
                   value_model=payload["value_model"], cohort=parts.get("cohort"), naive=parts.get("naive"),
                   horizon_months=payload["horizon_months"], time_unit=payload["time_unit"],
                   bands=payload["bands"], cohort_with_channel=payload["cohort_with_channel"],
                   metadata=payload.get("metadata", {}), purchase_basis=payload.get("purchase_basis", "gross"),
                   by_channel=_channel_components(payload.get("by_channel")))

    # one folder, one JSON per component
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        components = {"purchase": self.purchase, "spend": self.spend, "cancellation": self.cancellation,
                      "cohort": self.cohort, "naive": self.naive}
        saved = {}
        for role, model in components.items():
            if model is not None:
                model.save(folder / f"{role}.json")
                saved[role] = f"{role}.json"
        manifest = {"format_version": BUNDLE_FORMAT_VERSION, "value_model": self.value_model,
                    "components": saved, "horizon_months": self.horizon_months, "time_unit": self.time_unit,
                    "bands": self.bands, "cohort_with_channel": self.cohort_with_channel,
                    "metadata": self.metadata, "purchase_basis": self.purchase_basis}
        if self.by_channel is not None:       # one more file; a pooled bundle's folder stays as before
            (folder / CHANNELS_FILE).write_text(json.dumps(self.by_channel.to_dict(), indent=2, sort_keys=True,
                                                           allow_nan=False), encoding="utf-8")
            manifest["by_channel"] = CHANNELS_FILE
        (folder / "bundle.json").write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ScoringBundle":
        folder = Path(folder)
        manifest_path = folder / "bundle.json"
        if not manifest_path.exists():
            raise ValueError(f"{folder} holds no bundle.json; not a saved scoring bundle")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: bundle format_version {manifest.get('format_version')!r} is not "
                             f"{BUNDLE_FORMAT_VERSION}; re-fit with this engine version")
        parts: dict[str, BaseModel] = {role: load_model(folder / name)
                                       for role, name in manifest["components"].items()}
        return cls(purchase=parts["purchase"], spend=parts["spend"], cancellation=parts["cancellation"],
                   value_model=manifest["value_model"], cohort=parts.get("cohort"), naive=parts.get("naive"),
                   horizon_months=manifest["horizon_months"], time_unit=manifest["time_unit"],
                   bands=manifest["bands"], cohort_with_channel=manifest["cohort_with_channel"],
                   metadata=manifest.get("metadata", {}),
                   # bundles saved before the basis existed were fitted on gross orders
                   purchase_basis=manifest.get("purchase_basis", "gross"),
                   by_channel=_channel_components(
                       json.loads((folder / manifest["by_channel"]).read_text(encoding="utf-8"))
                       if manifest.get("by_channel") else None))

    def describe(self) -> dict[str, Any]:
        """Small, JSON-ready summary: model names and fitted parameters."""
        def params(model: BaseModel | None) -> dict[str, Any] | None:
            if model is None or model.params_ is None:
                return None
            return {k: float(v) for k, v in model.params_.items() if np.isscalar(v)}

        described = {"value_model": self.value_model, "purchase_model": self.purchase.name,
                     "purchase_params": params(self.purchase), "spend_params": params(self.spend),
                     "cancellation_params": params(self.cancellation), "horizon_months": self.horizon_months,
                     "time_unit": self.time_unit, "purchase_basis": self.purchase_basis}
        if self.by_channel is not None:
            described["by_channel"] = {"prior_customers": self.by_channel.prior_customers,
                                       "min_customers": self.by_channel.min_customers,
                                       "channels": self.by_channel.describe()}
        return described


def _channel_components(document: Mapping[str, Any] | None) -> ChannelComponents | None:
    return None if document is None else ChannelComponents.from_dict(document)
