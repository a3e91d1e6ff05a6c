"""Spend model through lifetimes: Gamma-Gamma (Fader, Hardie & Lee 2005; Hardie note 025).

**What it is fitted on.** Only customers with at least one repeat order (``frequency > 0``)
and a positive mean repeat-order value (``monetary > 0``): the model describes the mean value
of repeat orders, and customers without repeat orders carry no information about it. Rows
that do not qualify are left out of the fit (their count is in ``fit_info_["n_excluded"]``),
not rejected, so the caller can pass the same table it gives the purchase model.

**Predictions.** ``expected_order_value(frequency, monetary)`` is the posterior mean
``(1 - w) * p v / (q - 1) + w * monetary`` with ``w = p x / (p x + q - 1)``. For
``frequency == 0`` it is exactly the population mean ``p v / (q - 1)`` (lifetimes' formula
gives the same because w = 0 there; it is made explicit so that a missing or zero
``monetary`` for those customers is ignored).

**Money unit.** lifetimes does not rescale money, and its penalizer acts on the raw
parameters, so in yen a penalizer of 0.001 on ``v`` (around 10^4) would swamp the likelihood.
The fit therefore divides ``monetary`` by ``monetary_scale`` (default: the weighted median of
the fitted values) and multiplies ``v`` back; ``p`` and ``q`` do not depend on the money unit.
Unpenalised fits are unchanged by this (the likelihood is scale-equivariant). The fallback
ladder is the one of the purchase models (larger penalizers, then a restart from p=1, q=2,
v=1 in scaled units); a fit with ``q <= 1`` (infinite population mean: very heavy-tailed order
values) counts as failed.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from models._lifetimes_compat import LIFETIMES_VERSION, GammaGammaFitter, quiet
from models.base import (Attempt, SpendModel, as_float_array, check_same_length, fallback_attempts,
                         fit_with_fallback, register_model)
from models.intervals import log_param_covariance


class _GammaGammaFitter(GammaGammaFitter):
    def _compute_variance_matrix(self):
        try:
            return super()._compute_variance_matrix()
        except (np.linalg.LinAlgError, ValueError):
            names = self.params_.index
            return pd.DataFrame(np.nan, index=names, columns=names)


@register_model("gamma_gamma")
class GammaGammaModel(SpendModel):
    """Gamma-Gamma spend model through ``lifetimes.GammaGammaFitter``; params ``p``, ``q``, ``v``."""

    label = "Gamma-Gamma"
    param_names = ("p", "q", "v")
    advice = ("cap extreme order values (e.g. winsorise monetary at the 99.9th percentile) and remove "
              "test/B2B accounts; check monetary is the mean value of the repeat orders, > 0; "
              "a larger penalizer_coef (e.g. 0.1) only if q stays above 1")

    def __init__(self, penalizer_coef: float = 0.0, fallback_penalizers: Sequence[float] = (0.001, 0.01),
                 fallback_restart: bool = True, monetary_scale: float | None = None):
        if not (penalizer_coef >= 0 and math.isfinite(penalizer_coef)):
            raise ValueError(f"penalizer_coef must be a finite number >= 0, got {penalizer_coef!r}")
        if any(not (p > 0 and math.isfinite(p)) for p in fallback_penalizers):
            raise ValueError(f"fallback_penalizers must be finite numbers > 0, got {fallback_penalizers!r}")
        if monetary_scale is not None and not (monetary_scale > 0 and math.isfinite(monetary_scale)):
            raise ValueError(f"monetary_scale must be None (auto) or a finite number > 0, got {monetary_scale!r}")
        self.penalizer_coef = float(penalizer_coef)
        self.fallback_penalizers = tuple(float(p) for p in fallback_penalizers)
        self.fallback_restart = bool(fallback_restart)
        self.monetary_scale = None if monetary_scale is None else float(monetary_scale)
        self.params_ = None
        self.fit_info_ = {}

    def fit(self, frequency, monetary, weights=None):
        """Fit on (frequency, mean repeat-order value) rows with customer counts ``weights``.

        Rows with ``frequency == 0`` or ``monetary <= 0`` are excluded (see the module docstring).
        """
        frequency = as_float_array("frequency", frequency)
        monetary = np.atleast_1d(np.asarray(monetary, dtype=float))
        weights = np.ones_like(frequency) if weights is None else as_float_array("weights", weights)
        check_same_length(frequency=frequency, monetary=monetary, weights=weights)
        if np.any(frequency < 0) or np.any(frequency != np.round(frequency)):
            raise ValueError("frequency must be a non-negative whole number (repeat purchases)")
        if np.any(weights < 0):
            raise ValueError("weights (customer counts) must be >= 0")
        if np.any(np.isinf(monetary)) or np.any(np.isnan(monetary) & (frequency > 0)):
            raise ValueError("monetary must be finite where frequency > 0")
        keep = (frequency > 0) & (np.nan_to_num(monetary) > 0) & (weights > 0)
        n_excluded = float(weights[~keep].sum())
        frequency, monetary, weights = frequency[keep], monetary[keep], weights[keep]
        if len(frequency) == 0:
            raise ValueError("nothing to fit: no rows with frequency > 0, monetary > 0 and a positive weight")
        scale = self.monetary_scale or _weighted_median(monetary, weights)
        scaled = monetary / scale
        starts = ("default", "restart") if self.fallback_restart else ("default",)
        attempts = fallback_attempts(self.penalizer_coef, self.fallback_penalizers, starts)

        def fit_once(attempt: Attempt):
            fitter = _GammaGammaFitter(penalizer_coef=attempt.penalizer)
            initial = None if attempt.start == "default" else np.log([1.0, 2.0, 1.0])
            with quiet(self.label):
                fitter.fit(frequency, scaled, weights=weights, initial_params=initial)
            p, q, v = (float(fitter.params_[k]) for k in ("p", "q", "v"))
            params = {"p": p, "q": q, "v": v * scale}
            if not all(math.isfinite(x) and x > 0 for x in params.values()):
                raise FloatingPointError(f"non-finite or non-positive parameters: {params}")
            if q <= 1.0:
                raise FloatingPointError(f"q = {q:.4g} <= 1: the population mean order value would be infinite")
            log_likelihood = _log_likelihood(params, frequency, monetary, weights)
            if not math.isfinite(log_likelihood):
                raise FloatingPointError(f"log-likelihood is not finite at {params}")
            errors = getattr(fitter, "standard_errors_", None)
            if errors is not None:
                errors = {k: (float(errors[k]) * (scale if k == "v" else 1.0) if np.isfinite(errors[k]) else None)
                          for k in ("p", "q", "v")}
            # log v differs from the fitted log(v / scale) by a constant: the same covariance
            covariance = log_param_covariance(getattr(fitter, "_hessian_", None), float(weights.sum()),
                                              self.param_names)
            return params, log_likelihood, errors, covariance

        (params, log_likelihood, errors, covariance), info = fit_with_fallback(self.label, attempts, fit_once,
                                                                               self.advice)
        self.params_ = params
        info.update(log_likelihood=log_likelihood, n_customers=float(weights.sum()), n_rows=int(len(weights)),
                    n_excluded=n_excluded, monetary_scale=float(scale), standard_errors=errors,
                    backend=f"lifetimes {LIFETIMES_VERSION}",
                    log_param_covariance=covariance)   # for the value intervals (models.intervals)
        self.fit_info_ = info
        return self

    def population_mean_order_value(self) -> float:
        """``p v / (q - 1)``: expected order value of a customer with no repeat orders yet."""
        self._check_fitted()
        p, q, v = (self.params_[k] for k in self.param_names)
        return p * v / (q - 1.0)

    def expected_order_value(self, frequency, monetary) -> np.ndarray:
        """Posterior mean order value; the population mean where ``frequency`` is 0."""
        self._check_fitted()
        frequency = as_float_array("frequency", frequency)
        monetary = np.atleast_1d(np.asarray(monetary, dtype=float))
        check_same_length(frequency=frequency, monetary=monetary)
        if np.any(frequency < 0):
            raise ValueError("frequency must be >= 0")
        repeat = frequency > 0
        if np.any(~np.isfinite(monetary[repeat])) or np.any(monetary[repeat] < 0):
            raise ValueError("monetary must be finite and >= 0 where frequency > 0")
        p, q, v = (self.params_[k] for k in self.param_names)
        population_mean = self.population_mean_order_value()
        values = np.full(frequency.shape, population_mean)
        if repeat.any():
            fitter = _GammaGammaFitter(penalizer_coef=self.penalizer_coef)
            fitter.params_ = pd.Series({"p": p, "q": q, "v": v})
            with quiet(self.label):
                values[repeat] = np.asarray(
                    fitter.conditional_expected_average_profit(frequency[repeat], monetary[repeat]), float)
        return values


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def _log_likelihood(params: dict[str, Any], frequency, monetary, weights) -> float:
    """Total log-likelihood (unpenalised, in the caller's money unit)."""
    log_params = np.log([params["p"], params["q"], params["v"]])
    with quiet("Gamma-Gamma"):
        mean_nll = GammaGammaFitter._negative_log_likelihood(log_params, frequency, monetary, weights, 0.0)
    return float(-mean_nll * weights.sum())


__all__ = ["GammaGammaModel"]
