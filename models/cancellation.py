"""Cancellation rate per customer: beta-binomial empirical Bayes.

Each customer ``i`` cancels each order with an unknown probability ``p_i``; across customers
``p ~ Beta(alpha, beta)``. Given ``n`` orders with ``k`` cancelled, the posterior mean is

    (alpha + k) / (alpha + beta + n)

which shrinks the customer's own rate ``k / n`` towards the population rate
``alpha / (alpha + beta)``, the more the fewer orders the customer has (``alpha + beta`` acts as
a number of prior orders).

**Fit.** Maximum likelihood of the beta-binomial marginal on distinct ``(n_orders,
n_cancelled)`` rows with customer counts ``weights`` (L-BFGS-B on log-parameters, analytic
gradient, Nelder-Mead if it stops abnormally; ``alpha + beta`` is capped at
``max_prior_strength``, reached when the data show no spread beyond binomial noise: then
everyone gets the pooled rate; ``fit_info_["prior_strength_at_cap"]`` says so).

**Fallback** (``fit_info_["method"] == "pooled"``): when there is nothing to estimate a spread
from — no cancellations at all, everything cancelled, or fewer than ``min_customers`` customers
with at least two orders — or the optimiser fails, the prior is the pooled rate
``(K + 0.5) / (N + 1)`` over all orders (K cancelled of N; the 0.5 keeps it off 0 and 1)
with the fixed strength ``alpha + beta = fallback_prior_strength``.

**By amount.** ``predict`` accepts a fractional ``n_cancelled``: pass ``n_orders *
cancelled_amount / gross_amount`` ("effective cancelled orders") to shrink an amount-based
rate with the same prior; this assumes the amount share behaves like the count share.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

from models.base import BaseModel, as_float_array, check_same_length, register_model


@register_model("cancellation")
class CancellationRateModel(BaseModel):
    """Beta-binomial empirical-Bayes cancellation rate; params ``alpha``, ``beta``."""

    param_names = ("alpha", "beta")

    def __init__(self, min_customers: int = 30, fallback_prior_strength: float = 10.0,
                 max_prior_strength: float = 1e6):
        if min_customers < 1:
            raise ValueError("min_customers must be >= 1")
        if not (0 < fallback_prior_strength < math.inf):
            raise ValueError("fallback_prior_strength must be a finite number > 0")
        if not (fallback_prior_strength <= max_prior_strength < math.inf):
            raise ValueError("max_prior_strength must be finite and >= fallback_prior_strength")
        self.min_customers = int(min_customers)
        self.fallback_prior_strength = float(fallback_prior_strength)
        self.max_prior_strength = float(max_prior_strength)
        self.params_ = None
        self.fit_info_ = {}

    def fit(self, n_orders, n_cancelled, weights=None) -> "CancellationRateModel":
        """Fit on distinct (n_orders, n_cancelled) rows; ``weights`` = number of customers per row."""
        n, k = _check_counts(n_orders, n_cancelled, whole=True)
        weights = np.ones_like(n) if weights is None else as_float_array("weights", weights)
        check_same_length(n_orders=n, n_cancelled=k, weights=weights)
        if np.any(weights < 0):
            raise ValueError("weights (customer counts) must be >= 0")
        keep = (n > 0) & (weights > 0)
        n, k, weights = n[keep], k[keep], weights[keep]
        if len(n) == 0:
            raise ValueError("nothing to fit: no rows with n_orders > 0 and a positive weight")
        total_orders, total_cancelled = float(np.sum(weights * n)), float(np.sum(weights * k))
        pooled = total_cancelled / total_orders
        info = {"n_customers": float(weights.sum()), "n_rows": int(len(n)), "pooled_rate": pooled,
                "customers_with_2plus_orders": float(weights[n >= 2].sum())}

        reason = None
        if total_cancelled == 0:
            reason = "no cancellations in the data"
        elif total_cancelled == total_orders:
            reason = "every order is cancelled"
        elif info["customers_with_2plus_orders"] < self.min_customers:
            reason = (f"only {info['customers_with_2plus_orders']:g} customers with 2+ orders "
                      f"(< min_customers={self.min_customers})")
        if reason is None:
            fitted = self._maximum_likelihood(n, k, weights, pooled)
            if isinstance(fitted, str):
                reason = fitted
            else:
                alpha, beta, log_likelihood, at_cap = fitted
                self.params_ = {"alpha": alpha, "beta": beta}
                info.update(method="mle", log_likelihood=log_likelihood, prior_strength=alpha + beta,
                            prior_strength_at_cap=at_cap)
        if reason is not None:
            rate = (total_cancelled + 0.5) / (total_orders + 1.0)
            strength = self.fallback_prior_strength
            self.params_ = {"alpha": rate * strength, "beta": (1.0 - rate) * strength}
            info.update(method="pooled", reason=reason, prior_strength=strength)
        self.fit_info_ = info
        return self

    def _maximum_likelihood(self, n, k, weights, pooled):
        """(alpha, beta, log-likelihood, at_cap) or a string saying why it failed.

        Parameterised as (logit of the mean rate, log of the strength alpha + beta), the strength
        clipped at ``max_prior_strength``. L-BFGS-B with the analytic gradient; when it stops
        abnormally (typically the flat likelihood of data with no extra-binomial spread, where the
        strength runs to the cap) Nelder-Mead continues from its point.
        """
        total = weights.sum()
        cap = math.log(self.max_prior_strength)

        def unpack(theta):
            mean = special.expit(theta[0])
            strength = math.exp(min(theta[1], cap))
            return float(mean * strength), float((1.0 - mean) * strength), float(mean), strength

        def objective(theta):
            a, b, mean, strength = unpack(theta)
            ll = special.betaln(k + a, n - k + b) - special.betaln(a, b)
            d_a = np.sum(weights * (special.digamma(k + a) - special.digamma(n + a + b)
                                    - special.digamma(a) + special.digamma(a + b)))
            d_b = np.sum(weights * (special.digamma(n - k + b) - special.digamma(n + a + b)
                                    - special.digamma(b) + special.digamma(a + b)))
            gradient = np.array([(d_a - d_b) * strength * mean * (1.0 - mean),
                                 (d_a * mean + d_b * (1.0 - mean)) * strength * (theta[1] < cap)])
            return -np.sum(weights * ll) / total, -gradient / total

        start = np.array([special.logit(pooled), math.log(10.0)])
        with np.errstate(all="ignore"):
            result = optimize.minimize(objective, start, jac=True, method="L-BFGS-B",
                                       bounds=[(-30.0, 30.0), (-10.0, cap)],
                                       options={"ftol": 1e-13, "gtol": 1e-9, "maxiter": 1000})
            if not (result.success and np.isfinite(result.fun)):
                result = optimize.minimize(lambda theta: objective(theta)[0],
                                           result.x if np.isfinite(result.fun) else start, method="Nelder-Mead",
                                           options={"xatol": 1e-9, "fatol": 1e-14, "maxiter": 4000})
        alpha, beta, _, strength = unpack(result.x)
        if not (result.success and np.isfinite(result.fun) and alpha > 0 and beta > 0):
            return f"optimiser failed: {result.message}"
        at_cap = bool(result.x[1] >= cap - 1e-6)
        log_likelihood = float(-result.fun * total + np.sum(weights * _log_binomial(n, k)))
        return alpha, beta, log_likelihood, at_cap

    @property
    def prior_mean(self) -> float:
        """Population cancellation rate ``alpha / (alpha + beta)``."""
        self._check_fitted()
        return self.params_["alpha"] / (self.params_["alpha"] + self.params_["beta"])

    def predict(self, n_orders, n_cancelled) -> np.ndarray:
        """Posterior mean cancellation rate ``(alpha + k) / (alpha + beta + n)`` per customer.

        ``n_cancelled`` may be fractional (effective cancelled orders, see the module docstring);
        ``n_orders == 0`` gives the population rate.
        """
        self._check_fitted()
        n, k = _check_counts(n_orders, n_cancelled, whole=False)
        alpha, beta = self.params_["alpha"], self.params_["beta"]
        return (alpha + k) / (alpha + beta + n)


def _check_counts(n_orders, n_cancelled, whole: bool):
    n = as_float_array("n_orders", n_orders)
    k = as_float_array("n_cancelled", n_cancelled)
    check_same_length(n_orders=n, n_cancelled=k)
    if np.any(n < 0) or np.any(k < 0):
        raise ValueError("n_orders and n_cancelled must be >= 0")
    if np.any(k > n * (1 + 1e-12)):
        raise ValueError("n_cancelled cannot exceed n_orders")
    if whole and (np.any(n != np.round(n)) or np.any(k != np.round(k))):
        raise ValueError("fit needs whole numbers of orders and cancelled orders")
    return n, np.minimum(k, n)


def _log_binomial(n, k):
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


__all__ = ["CancellationRateModel"]
