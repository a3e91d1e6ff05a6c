"""The model interface: purchase models, spend models, save/load, the registry, the fit ladder.

Nothing here knows about Spark, tables or jobs, and nothing here imports ``lifetimes``: the
implementation modules (``models.btyd``, ``models.gamma_gamma``) do, so a successor library
can replace them behind the same interface.

Conventions (scikit-learn / lifetimes style):

* hyper-parameters are constructor arguments, returned by ``get_params()``;
* ``fit(...)`` returns ``self``; fitted values end in ``_`` (``params_``, ``fit_info_``);
* ``save(path)`` writes one JSON file
  ``{"format_version": 1, "model": "<name>", "hyperparameters": {...}, "params": {...},
  "fit_info": {...}}``; ``Model.load(path)`` (or :func:`load_model` for any registered model)
  raises ``ValueError`` for another ``format_version`` or another model name;
* inputs are sufficient statistics, one row per distinct customer state with a ``weights``
  count; a weighted fit equals the fit on the expanded rows.

``fit_info_`` of the lifetimes-based models records the path the fit took::

    {"converged": True, "penalizer": 0.001, "start": "default",   # the attempt that succeeded
     "fallback_used": True, "failed_attempts": [{"penalizer": 0.0, "start": "default",
                                                 "error": "ConvergenceError: ..."}],
     "log_likelihood": -9582.4,          # total, unpenalised, in the caller's units
     "n_customers": 2357.0, "n_rows": 1016, "standard_errors": {...} or None,
     "backend": "lifetimes 0.11.3"}     # what maximised the likelihood; BG/NBD by default: "fast"
"""
from __future__ import annotations

import abc
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from core.errors import InternalError, UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: model name -> class; filled by :func:`register_model` when ``models`` is imported.
MODEL_REGISTRY: dict[str, type["BaseModel"]] = {}


class ModelFitError(UserError, RuntimeError):
    """A model could not be fitted, even after the fallbacks; the message says what to try.

    ``attempts`` lists every attempt made (penalizer, starting point, error).
    """

    def __init__(self, message: str, attempts: Sequence[dict[str, Any]] = ()):
        super().__init__(message)
        self.attempts = list(attempts)


class NotFittedError(InternalError, ValueError):
    """A fitted value was needed (predict, save) before ``fit`` or ``load``."""


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: register a model class under ``name`` (also sets ``cls.name``)."""

    def decorate(cls: type) -> type:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {MODEL_REGISTRY[name].__name__}")
        cls.name = name
        MODEL_REGISTRY[name] = cls
        return cls

    return decorate


def make_model(name: str, **hyperparameters: Any) -> "BaseModel":
    """A new, unfitted model by registry name, e.g. ``make_model("bgnbd", penalizer_coef=0.01)``."""
    try:
        cls = MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODEL_REGISTRY))}") from None
    return cls(**hyperparameters)


def load_model(path: str | Path) -> "BaseModel":
    """Load any registered model from a file written by ``save`` (dispatches on its ``model`` field)."""
    document = _read_document(path)
    name = document.get("model")
    if name not in MODEL_REGISTRY:
        raise ValueError(f"{path}: unknown model {name!r}; known models: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[name].from_dict(document, source=str(path))


def _read_document(path: str | Path) -> dict[str, Any]:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a model file (invalid JSON: {exc})") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a model file (expected a JSON object)")
    return document


class BaseModel(abc.ABC):
    """Hyper-parameters, fitted ``params_`` / ``fit_info_``, and JSON save/load with a version check."""

    name: ClassVar[str] = ""

    params_: dict[str, Any]
    fit_info_: dict[str, Any]

    # ---- hyper-parameters -------------------------------------------------------------------
    @classmethod
    def _hyperparameter_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p.name for p in signature.parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as given to the constructor (scikit-learn ``get_params``)."""
        return {name: getattr(self, name) for name in self._hyperparameter_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        state = "fitted" if self.is_fitted else "unfitted"
        return f"{type(self).__name__}({args}) [{state}]"

    # ---- fitted state -----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "params_", None) is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(...) or load(path) first")

    def _params_to_json(self) -> dict[str, Any]:
        """``params_`` as a JSON-able dict (override when params are not a flat dict of floats)."""
        return {k: float(v) for k, v in self.params_.items()}

    def _set_params_from_json(self, params: dict[str, Any]) -> None:
        """Restore the fitted state from ``params`` (override to rebuild backend objects)."""
        self.params_ = {k: float(v) for k, v in params.items()}

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The saved document (also handy to broadcast a fitted model to Spark executors)."""
        self._check_fitted()
        return {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "hyperparameters": _jsonable(self.get_params()),
            "params": _jsonable(self._params_to_json()),
            "fit_info": _jsonable(getattr(self, "fit_info_", None) or {}),
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any], source: str = "<dict>") -> "BaseModel":
        """Rebuild a fitted model from :meth:`to_dict` output; checks format version and model name."""
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: model file format_version is {version!r}, this code reads "
                             f"format_version {FORMAT_VERSION}; re-fit and save the model with this version")
        name = document.get("model")
        if name != cls.name:
            raise ValueError(f"{source}: file holds model {name!r}, not {cls.name!r}; "
                             f"load it with models.load_model(path) or {name!r}'s own class")
        missing = [key for key in ("hyperparameters", "params") if not isinstance(document.get(key), dict)]
        if missing:
            raise ValueError(f"{source}: model file lacks {', '.join(missing)}")
        known = set(cls._hyperparameter_names())
        unknown = sorted(set(document["hyperparameters"]) - known)
        if unknown:
            raise ValueError(f"{source}: unknown hyper-parameters for {cls.name!r}: {', '.join(unknown)}")
        model = cls(**document["hyperparameters"])
        model._set_params_from_json(document["params"])
        model.fit_info_ = dict(document.get("fit_info") or {})
        return model

    def save(self, path: str | Path) -> Path:
        """Write the fitted model as JSON to ``path``; returns the path."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BaseModel":
        """Read a model written by :meth:`save`; ValueError for another format version or model."""
        return cls.from_dict(_read_document(path), source=str(path))


def _jsonable(value: Any) -> Any:
    """Tuples to lists, numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ---- the two model kinds ----------------------------------------------------------------------
class PurchaseModel(BaseModel):
    """Number of future purchases ("buy till you die" models: BG/NBD, Pareto/NBD, MBG/NBD).

    Inputs are BTYD sufficient statistics in one time unit chosen by the caller (days or weeks):
    ``frequency`` = repeat purchases (orders after the first, one per time period), ``recency`` =
    age at the last purchase (0 when frequency is 0), ``T`` = age at the as-of date; ``weights`` =
    number of customers with that (frequency, recency, T). Predictions use the same unit for ``t``.
    """

    param_names: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def fit(self, frequency, recency, T, weights=None) -> "PurchaseModel":
        """Fit on distinct (frequency, recency, T) rows with counts ``weights``; returns ``self``."""

    @abc.abstractmethod
    def expected_purchases(self, t, frequency, recency, T) -> np.ndarray:
        """Conditional expected number of purchases in the next ``t`` time units (finite, >= 0)."""

    @abc.abstractmethod
    def p_alive(self, frequency, recency, T) -> np.ndarray:
        """Probability that the customer is still active at the as-of date (in [0, 1])."""

    def _set_params_from_json(self, params: dict[str, Any]) -> None:
        _check_param_names(type(self).__name__, params, self.param_names)
        super()._set_params_from_json(params)


class SpendModel(BaseModel):
    """Value per order (Gamma-Gamma): expected order value given past orders."""

    param_names: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def fit(self, frequency, monetary, weights=None) -> "SpendModel":
        """Fit on (frequency, mean order value of the repeat orders) rows with counts; returns ``self``."""

    @abc.abstractmethod
    def expected_order_value(self, frequency, monetary) -> np.ndarray:
        """Expected value of a future order; the population mean where ``frequency`` is 0."""

    @abc.abstractmethod
    def population_mean_order_value(self) -> float:
        """Expected order value of a customer with no repeat orders (the population mean)."""

    def _set_params_from_json(self, params: dict[str, Any]) -> None:
        _check_param_names(type(self).__name__, params, self.param_names)
        super()._set_params_from_json(params)


def _check_param_names(model: str, params: dict[str, Any], expected: Sequence[str]) -> None:
    if set(params) != set(expected):
        raise ValueError(f"{model}: params must be exactly {list(expected)}, got {sorted(params)}")
    bad = [k for k, v in params.items() if v is None or not math.isfinite(float(v)) or float(v) <= 0]
    if bad:
        raise ValueError(f"{model}: params {bad} must be finite and > 0")


# ---- input checks (shared by the implementations) ---------------------------------------------
def as_float_array(name: str, values: Any) -> np.ndarray:
    """1-d float array; ValueError naming ``name`` for NaN/inf or more than one dimension."""
    array = np.atleast_1d(np.asarray(values, dtype=float))
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(array)))} missing or infinite values")
    return array


def check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}")
    return next(iter(lengths.values()))


def check_rfm(frequency, recency, T, weights=None, *, for_fit: bool) -> tuple[np.ndarray, ...]:
    """Validated (frequency, recency, T, weights) arrays; ValueError saying what to fix.

    ``recency`` a hair above ``T`` (float noise, <= 1e-9 relative) is clipped to ``T``.
    For fitting, rows with weight 0 are dropped and at least one row must remain.
    """
    frequency = as_float_array("frequency", frequency)
    recency = as_float_array("recency", recency)
    T = as_float_array("T", T)
    weights = np.ones_like(frequency) if weights is None else as_float_array("weights", weights)
    check_same_length(frequency=frequency, recency=recency, T=T, weights=weights)
    if np.any(frequency < 0) or np.any(frequency != np.round(frequency)):
        raise ValueError("frequency must be a non-negative whole number (repeat purchases)")
    if np.any(recency < 0):
        raise ValueError("recency must be >= 0 (age of the customer at the last purchase)")
    if np.any(T < 0) or (for_fit and np.any(T <= 0)):
        raise ValueError("T (age at the as-of date) must be > 0 for fitting and >= 0 for prediction")
    too_recent = recency > T * (1 + 1e-9) + 1e-12
    if np.any(too_recent):
        raise ValueError(f"recency exceeds T in {int(too_recent.sum())} rows: recency is the age at the "
                         "last purchase and cannot exceed the age at the as-of date")
    recency = np.minimum(recency, T)
    if np.any((frequency == 0) & (recency != 0)):
        raise ValueError("recency must be 0 where frequency is 0 (no repeat purchase yet)")
    if np.any(weights < 0):
        raise ValueError("weights (customer counts) must be >= 0")
    if for_fit:
        keep = weights > 0
        frequency, recency, T, weights = frequency[keep], recency[keep], T[keep], weights[keep]
        if len(frequency) == 0:
            raise ValueError("nothing to fit: no rows with a positive weight")
    return frequency, recency, T, weights


# ---- the fallback ladder ----------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """One way of running a fit: an L2 penalizer and a named starting point."""

    penalizer: float
    start: str = "default"


def fallback_attempts(penalizer_coef: float, fallback_penalizers: Sequence[float],
                      starts: Sequence[str]) -> list[Attempt]:
    """The ladder: every start, and for each start the own penalizer then the larger fallbacks."""
    penalizers = [float(penalizer_coef)] + sorted(float(p) for p in fallback_penalizers if p > penalizer_coef)
    return [Attempt(p, s) for s in starts for p in penalizers]


def fit_with_fallback(model_label: str, attempts: Sequence[Attempt], fit_once: Callable[[Attempt], Any],
                      advice: str) -> tuple[Any, dict[str, Any]]:
    """Run ``fit_once`` for each attempt until one returns; log every failure.

    ``fit_once`` raises on failure (non-convergence, non-finite parameters, overflow); any
    exception counts as a failed attempt (inputs are validated before the ladder starts).
    Returns the first result and a ``fit_info`` dict naming the path taken; raises
    :class:`ModelFitError` (with ``advice``) when every attempt failed.
    """
    failures: list[dict[str, Any]] = []
    for number, attempt in enumerate(attempts):
        try:
            result = fit_once(attempt)
        except Exception as exc:  # noqa: BLE001 - any failure of the backend moves down the ladder
            reason = f"{type(exc).__name__}: {str(exc).strip()}"[:500]
            failures.append({"penalizer": attempt.penalizer, "start": attempt.start, "error": reason})
            logger.warning("%s fit attempt %d/%d (penalizer=%g, start=%s) failed: %s",
                           model_label, number + 1, len(attempts), attempt.penalizer, attempt.start, reason)
            continue
        info = {"converged": True, "penalizer": attempt.penalizer, "start": attempt.start,
                "fallback_used": number > 0, "failed_attempts": failures}
        if number > 0:
            logger.warning("%s fitted on fallback attempt %d/%d: penalizer=%g, start=%s%s", model_label,
                           number + 1, len(attempts), attempt.penalizer, attempt.start,
                           " (a penalizer shrinks the parameters towards 0; compare the log-likelihood)"
                           if attempt.penalizer > attempts[0].penalizer else "")
        else:
            logger.info("%s fitted (penalizer=%g)", model_label, attempt.penalizer)
        return result, info
    by_error: dict[str, list[str]] = {}
    for f in failures:
        by_error.setdefault(_first_line(f["error"]), []).append(f"penalizer={f['penalizer']:g}/{f['start']}")
    tried = "; ".join(f"{', '.join(where)}: {error}" for error, where in by_error.items())
    raise ModelFitError(f"{model_label} could not be fitted; all {len(failures)} attempts failed ({tried}). "
                        f"What to try: {advice}.", failures)


def _first_line(text: str, limit: int = 120) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."

