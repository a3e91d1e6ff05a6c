"""Channel-aware BTYD parameters: one BG/NBD (or MBG/NBD) and Gamma-Gamma fit per acquisition channel,
shrunk towards the pooled fit.

**What is fitted.** The pooled models are fitted as always, on every customer. Then, for each
acquisition channel with at least ``min_customers`` customers in a component's fit, that component's
parameters are re-estimated on the channel's own sufficient statistics by maximising a penalised
log-likelihood in log-parameters ``theta``::

    LL_channel(theta) - 1/2 (theta - theta_pool)' P (theta - theta_pool),   P = k * I_1

``I_1`` is the pooled fit's Fisher information *per customer* (the Hessian of the mean negative
log-likelihood at the pooled optimum; the pooled fits store ``fit_info_["log_param_covariance"] =
inv(I_1) / N_pool``, so ``I_1 = inv(covariance) / N_pool``) and ``k = prior_customers``: the prior is
worth ``k`` customers that behave like the pooled population. A channel of ``n`` customers gets about
``n / (n + k)`` of the way from the pooled parameters to its own maximum-likelihood ones (exactly so
when the channel's information per customer equals the pool's): with k = 1,000 a 30-customer channel
moves 3% of the way, a 50,000-customer channel 98%. This is a Gaussian prior centred on the pooled
fit, i.e. a MAP estimate; the channel's covariance is the inverse Hessian of the penalised objective
(the Laplace approximation of the posterior), stored as ``fit_info_["log_param_covariance"]`` in the
same form as the pooled fits', so :mod:`models.intervals` works per channel unchanged.

**Why a fixed k, not k estimated from the spread between channels (empirical Bayes).** With five to
ten channels the between-channel covariance of four parameters is estimated from five to ten points:
its estimate swings from night to night and often collapses to zero (then every channel gets the
pooled fit) or explodes (no shrinkage). A fixed ``prior_customers`` is transparent ("a channel needs
about k customers before its own data dominate"), does not depend on the last bits of an inner
optimisation, and the backtest already judges the channel-aware model against the pooled one.

**Why the pooled fit is reused as the prior's centre.** The channel data are part of the pooled
data, so the prior counts them twice (once in ``theta_pool``). For a channel that is a small share of
the pool the effect is negligible; for a channel that is most of the pool its own likelihood
dominates the prior anyway (n >> k), so the double count does not change the estimate materially.

**Inputs.** Sufficient statistics per channel (distinct (frequency, recency, T) rows with customer
counts for the purchase model, (frequency, monetary) rows of repeat customers for Gamma-Gamma), as
:mod:`pipelines.ltv` brings them from Spark grouped by channel: never customer-sized data.
Customers with a null channel, channels below ``min_customers`` and channels unseen at fit time are
scored with the pooled components (:meth:`ChannelComponents.purchase_for`). A channel whose penalised
fit fails (it should not: the prior makes the objective strictly convex near the pooled estimate) is
also left to the pooled parameters and named in ``fit_info["fallbacks"]``.

**Pareto/NBD** has no channel variant: its likelihood has no analytic gradient here (its fit now
stores a covariance, so the prior could be built; the penalised fit would need a numeric gradient).

**Group totals** (segments, ``ltv_by_channel``): each customer's parameter loadings sit in its own
fit's block of the loadings array (pooled first, then the channels in ``channels`` order,
:meth:`models.bundle.ScoringBundle.loading_blocks`), so a total adds one fit's coordinates and takes
the channels' fits as independent of each other (they are shrunk towards one pooled fit, so somewhat
correlated in truth: the totals' parameter part is then slightly understated).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from scipy import optimize, special

from core.errors import CvsegError
from models import fast_bgnbd
from models.base import MODEL_REGISTRY, PurchaseModel, SpendModel
from models.intervals import log_param_covariance

logger = logging.getLogger(__name__)

#: Purchase models with a channel-aware variant (an analytic likelihood gradient and value intervals).
SHRUNK_PURCHASE_MODELS = ("bgnbd", "mbgnbd")
#: Suffix of the channel-aware variants' model names in backtests and the registry (``bgnbd_channel``).
CHANNEL_SUFFIX = "_channel"
#: Acceptance of the penalised optimum: max |gradient| of the objective per (customer + prior customer).
#: A well-posed fit ends ~1e-10 after the Newton steps; this sits orders of magnitude above so the
#: decision does not depend on BLAS kernels or thread counts.
GRADIENT_TOLERANCE = 1e-5
_NEWTON_STEPS = 6
_LOG_BOUND = 30.0


class ChannelFitFailure(CvsegError, ArithmeticError):
    """A penalised channel fit did not reach a minimum (the channel then scores with the pooled fit)."""


# ---- the prior from the pooled fit ---------------------------------------------------------------
@dataclass(frozen=True)
class PooledPrior:
    """Centre (pooled log-parameters, natural units) and precision ``k * I_1`` of the shrinkage prior."""

    names: tuple[str, ...]
    centre: np.ndarray
    precision: np.ndarray
    prior_customers: float


def pooled_prior(model: PurchaseModel | SpendModel, prior_customers: float) -> PooledPrior | None:
    """The prior of a pooled fit, or None when the fit stored no usable covariance (then no channel
    fit is possible: the Fisher information is what says how much the parameters may move)."""
    info = model.fit_info_ or {}
    covariance = info.get("log_param_covariance")
    n_pool = float(info.get("n_customers") or 0.0)
    if not covariance or n_pool <= 0:
        return None
    names = tuple(model.param_names)
    order = [list(covariance["names"]).index(n) for n in names]
    matrix = np.asarray(covariance["matrix"], dtype=float)[np.ix_(order, order)]
    try:
        information_per_customer = np.linalg.inv(matrix) / n_pool
    except np.linalg.LinAlgError:
        return None
    precision = float(prior_customers) * 0.5 * (information_per_customer + information_per_customer.T)
    if not np.all(np.isfinite(precision)):
        return None
    centre = np.log([float(model.params_[n]) for n in names])
    return PooledPrior(names=names, centre=centre, precision=precision, prior_customers=float(prior_customers))


# ---- the penalised optimisation (shared by both model kinds) ----------------------------------------
@dataclass(frozen=True)
class PenalisedOptimum:
    log_params: np.ndarray           # natural units of the caller's objective
    covariance: np.ndarray           # inverse Hessian of the total penalised negative log-likelihood
    log_likelihood: float            # the channel's own log-likelihood there (unpenalised)


def penalised_fit(negative_log_likelihood: Callable[[np.ndarray], tuple[float, np.ndarray]],
                  centre: np.ndarray, precision: np.ndarray, n_customers: float,
                  prior_customers: float) -> PenalisedOptimum:
    """Minimise ``NLL(theta) + 1/2 (theta - centre)' precision (theta - centre)`` over log-parameters.

    ``negative_log_likelihood`` returns the *total* negative log-likelihood and its gradient in
    log-parameters. The objective is divided by (``n_customers`` + ``prior_customers``) so
    the optimiser's tolerances do not depend on the data size. L-BFGS-B from the pooled estimate, then
    Newton steps with a forward-difference Hessian of the analytic gradient.
    """
    scale = 1.0 / (float(n_customers) + float(prior_customers))

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient = negative_log_likelihood(theta)
        if not math.isfinite(value):
            return math.inf, np.full(len(theta), np.nan)
        gap = theta - centre
        pull = precision @ gap
        return (value + 0.5 * float(gap @ pull)) * scale, (gradient + pull) * scale

    x0 = np.asarray(centre, dtype=float)
    if not math.isfinite(objective(x0)[0]):
        raise ChannelFitFailure("the channel's log-likelihood is not finite at the pooled parameters")
    result = optimize.minimize(objective, x0, jac=True, method="L-BFGS-B",
                               bounds=[(-_LOG_BOUND, _LOG_BOUND)] * len(x0),
                               options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    x = np.asarray(result.x, dtype=float)
    f, g = objective(x)
    hessian = fast_bgnbd.hessian_from_gradient(objective, x, g)
    for _ in range(_NEWTON_STEPS):
        if not np.all(np.isfinite(g)) or np.max(np.abs(g)) <= 1e-12:
            break
        try:
            step = -np.linalg.solve(hessian, g)
        except np.linalg.LinAlgError:
            break
        candidate = np.clip(x + step, -_LOG_BOUND, _LOG_BOUND)
        f_new, g_new = objective(candidate)
        if not (math.isfinite(f_new) and np.max(np.abs(g_new)) < np.max(np.abs(g))):
            break
        x, f, g = candidate, f_new, g_new
        hessian = fast_bgnbd.hessian_from_gradient(objective, x, g)
    if not (math.isfinite(f) and np.all(np.isfinite(g)) and np.all(np.isfinite(hessian))):
        raise ChannelFitFailure(f"penalised fit ended at a non-finite objective ({result.message})")
    if np.max(np.abs(g)) > GRADIENT_TOLERANCE * max(1.0, abs(f)):
        raise ChannelFitFailure(f"penalised fit stopped with gradient {np.max(np.abs(g)):.2e} ({result.message})")
    # the Hessian of the total penalised objective: the channel posterior's precision (Laplace)
    covariance = log_param_covariance(hessian, 1.0 / scale, [str(i) for i in range(len(x))])
    if covariance is None:
        raise ChannelFitFailure("the penalised Hessian is not positive definite at the optimum")
    own_nll, _ = negative_log_likelihood(x)
    return PenalisedOptimum(log_params=x, covariance=np.asarray(covariance["matrix"]), log_likelihood=-own_nll)


# ---- the two likelihoods -----------------------------------------------------------------------------
def bg_family_negative_log_likelihood(frequency, recency, T, weights, modified: bool, time_scale: float
                                      ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """Total negative log-likelihood of BG/NBD (``modified``: MBG/NBD) and its gradient in log-parameters
    (r, alpha, a, b), alpha in the caller's unit. Evaluated by :mod:`models.fast_bgnbd` on the distinct
    values, with time divided by ``time_scale`` (as lifetimes and the pooled fit do, for conditioning);
    the total log-likelihood differs from the caller-unit one by a constant, which moves no optimum."""
    rows = fast_bgnbd.compress(np.asarray(frequency, float), np.asarray(recency, float) / time_scale,
                               np.asarray(T, float) / time_scale, np.asarray(weights, float), modified=modified)
    shift = np.array([0.0, math.log(time_scale), 0.0, 0.0])

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        mean, gradient = fast_bgnbd.negative_log_likelihood(np.asarray(theta) - shift, rows, 0.0)
        return mean * rows.total_weight, gradient * rows.total_weight

    return nll


def gamma_gamma_negative_log_likelihood(frequency, monetary, weights
                                        ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """Total negative log-likelihood of Gamma-Gamma (Hardie note 025, eq. 1a; lifetimes' formula) and its
    analytic gradient in log-parameters (p, q, v)."""
    x = np.asarray(frequency, float)
    m = np.asarray(monetary, float)
    w = np.asarray(weights, float)
    log_xm = np.log(x * m)
    constant = -float(w @ np.log(m))        # the -log(m) of (p x - 1) log(m): no parameter in it

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        p, q, v = np.exp(theta)
        px = p * x
        with np.errstate(all="ignore"):
            log_rate = np.log(x * m + v)
            per_row = (special.gammaln(px + q) - special.gammaln(px) - special.gammaln(q) + q * math.log(v)
                       + px * log_xm - (px + q) * log_rate)
            value = float(w @ per_row) + constant
            psi_sum = special.digamma(px + q)
            d_p = float(w @ (x * (psi_sum - special.digamma(px) + log_xm - log_rate)))
            d_q = float(w @ (psi_sum - special.digamma(q) + math.log(v) - log_rate))
            d_v = float(w @ (q / v - (px + q) / (x * m + v)))
        if not math.isfinite(value):
            return math.inf, np.full(3, np.nan)
        return -value, -np.array([d_p * p, d_q * q, d_v * v])

    return nll


# ---- per-channel fits --------------------------------------------------------------------------------
def _channel_model(pooled, params: dict[str, float], info: dict[str, Any]):
    """A fitted model of the pooled model's class and hyper-parameters with the channel's parameters."""
    document = pooled.to_dict()
    document["params"] = params
    document["fit_info"] = info
    return type(pooled).from_dict(document, source="channel fit")


def _shrinkage_info(prior: PooledPrior, optimum: PenalisedOptimum, n_customers: float, n_rows: int
                    ) -> dict[str, Any]:
    return {"fit": "shrunk towards the pooled fit", "prior_customers": prior.prior_customers,
            "n_customers": float(n_customers), "n_rows": int(n_rows),
            "log_likelihood": float(optimum.log_likelihood),
            "pooled_params": dict(zip(prior.names, np.exp(prior.centre).tolist())),
            "log_param_covariance": {"names": list(prior.names), "matrix": optimum.covariance.tolist()}}


def fit_purchase_by_channel(pooled: PurchaseModel, rfm_by_channel: pd.DataFrame, prior_customers: float,
                            min_customers: int) -> tuple[dict[str, PurchaseModel], dict[str, str]]:
    """Per channel, the pooled purchase model's parameters shrunk towards the pooled ones.

    ``rfm_by_channel``: columns ``channel``, ``frequency``, ``recency``, ``T``, ``weight`` (distinct
    rows per channel, T > 0). Returns (models by channel, fallbacks: channel -> why it scores pooled).
    """
    if pooled.name not in SHRUNK_PURCHASE_MODELS:
        raise ValueError(f"no channel-aware variant of {pooled.name!r}; channel fits exist for "
                         f"{', '.join(SHRUNK_PURCHASE_MODELS)}")

    def likelihood(rows: pd.DataFrame):
        return bg_family_negative_log_likelihood(rows["frequency"], rows["recency"], rows["T"], rows["weight"],
                                                 modified=pooled.name == "mbgnbd", time_scale=float(rows["T"].max()))

    return _fit_each_channel(pooled, rfm_by_channel, prior_customers, min_customers, likelihood, "customers")


def fit_spend_by_channel(pooled: SpendModel, spend_by_channel: pd.DataFrame, prior_customers: float,
                         min_customers: int) -> tuple[dict[str, SpendModel], dict[str, str]]:
    """Per channel, the pooled Gamma-Gamma parameters shrunk towards the pooled ones.

    ``spend_by_channel``: columns ``channel``, ``frequency``, ``monetary_value``, ``weight`` (repeat
    customers with positive spend). ``min_customers`` counts these repeat customers.
    """
    spend_by_channel = spend_by_channel[(spend_by_channel["frequency"] > 0) & (spend_by_channel["monetary_value"] > 0)]
    # money in the pooled fit's scale (v near 1): the optimum is scale-equivariant, the conditioning is not
    scale = float((pooled.fit_info_ or {}).get("monetary_scale") or 1.0)
    shift = np.array([0.0, 0.0, math.log(scale)])

    def likelihood(rows: pd.DataFrame):
        nll = gamma_gamma_negative_log_likelihood(rows["frequency"], rows["monetary_value"] / scale, rows["weight"])
        return lambda theta: nll(theta - shift)

    def infinite_mean(params: dict[str, float]) -> str | None:
        return f"q = {params['q']:.4g} <= 1 (infinite mean order value)" if params["q"] <= 1.0 else None

    return _fit_each_channel(pooled, spend_by_channel, prior_customers, min_customers, likelihood,
                             "repeat customers", infinite_mean)


def _fit_each_channel(pooled, stats: pd.DataFrame, prior_customers: float, min_customers: int,
                      likelihood: Callable[[pd.DataFrame], Callable], counted: str,
                      reject: Callable[[dict[str, float]], str | None] = lambda params: None
                      ) -> tuple[dict[str, Any], dict[str, str]]:
    """The penalised fit of every channel with enough ``counted`` (customers) in ``stats``; the others,
    failed fits and fits ``reject`` names a reason for, go to the fallbacks (scored with the pooled model)."""
    prior = pooled_prior(pooled, prior_customers)
    fitted: dict[str, Any] = {}
    fallbacks: dict[str, str] = {}
    for channel, rows in _by_channel(stats):
        n_customers = float(rows["weight"].sum())
        if n_customers < min_customers:
            fallbacks[channel] = f"{n_customers:.0f} {counted} < min_customers {min_customers}"
            continue
        if prior is None:
            fallbacks[channel] = "the pooled fit has no covariance (singular Hessian)"
            continue
        try:
            optimum = penalised_fit(likelihood(rows), prior.centre, prior.precision, n_customers, prior_customers)
        except ChannelFitFailure as exc:
            logger.warning("%s channel %r: %s; it scores with the pooled parameters", pooled.name, channel, exc)
            fallbacks[channel] = str(exc)
            continue
        params = dict(zip(prior.names, np.exp(optimum.log_params).tolist()))
        reason = reject(params)
        if reason:
            fallbacks[channel] = reason
            continue
        fitted[channel] = _channel_model(pooled, params, _shrinkage_info(prior, optimum, n_customers, len(rows)))
    return fitted, fallbacks


def _by_channel(stats: pd.DataFrame):
    """(channel, rows) in channel order; rows with a null channel are left out (they score pooled)."""
    known = stats[stats["channel"].notna()]
    for channel in sorted(known["channel"].unique()):
        yield str(channel), known[known["channel"] == channel]


# ---- the result, as the scoring bundle holds it ---------------------------------------------------
@dataclass
class ChannelComponents:
    """Channel-specific purchase and spend models; any channel not in them scores with the pooled ones."""

    purchase: dict[str, PurchaseModel]
    spend: dict[str, SpendModel]
    prior_customers: float
    min_customers: int
    fallbacks: dict[str, dict[str, str]] = field(default_factory=dict)   # component -> channel -> why

    @property
    def channels(self) -> list[str]:
        """Channels with at least one own component, sorted."""
        return sorted(set(self.purchase) | set(self.spend))

    def to_dict(self) -> dict[str, Any]:
        return {"prior_customers": self.prior_customers, "min_customers": self.min_customers,
                "purchase": {c: m.to_dict() for c, m in sorted(self.purchase.items())},
                "spend": {c: m.to_dict() for c, m in sorted(self.spend.items())},
                "fallbacks": self.fallbacks}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "ChannelComponents":
        def models(role: str) -> dict[str, Any]:
            return {c: MODEL_REGISTRY[doc["model"]].from_dict(doc, source=f"channel {c!r} {role}")
                    for c, doc in document[role].items()}

        return cls(purchase=models("purchase"), spend=models("spend"),
                   prior_customers=float(document["prior_customers"]), min_customers=int(document["min_customers"]),
                   fallbacks=dict(document.get("fallbacks") or {}))

    def describe(self) -> dict[str, Any]:
        """Compact per-channel parameters (for MLflow): ``{channel: {"purchase": {...}, "spend": {...}}}``."""
        out: dict[str, Any] = {}
        for channel in self.channels:
            entry: dict[str, Any] = {}
            for role, models in (("purchase", self.purchase), ("spend", self.spend)):
                model = models.get(channel)
                entry[role] = None if model is None else {k: float(v) for k, v in model.params_.items()}
                if model is not None:
                    entry[f"{role}_customers"] = float(model.fit_info_.get("n_customers", 0.0))
            out[channel] = entry
        return out


def fit_channel_components(pooled_purchase: PurchaseModel, pooled_spend: SpendModel, rfm_by_channel: pd.DataFrame,
                           spend_by_channel: pd.DataFrame, prior_customers: float,
                           min_customers: int) -> ChannelComponents:
    """Both components per channel (see the module docstring)."""
    if not prior_customers > 0:
        raise ValueError(f"prior_customers must be > 0, got {prior_customers!r}")
    purchase, purchase_fallbacks = fit_purchase_by_channel(pooled_purchase, rfm_by_channel, prior_customers,
                                                           min_customers)
    spend, spend_fallbacks = fit_spend_by_channel(pooled_spend, spend_by_channel, prior_customers, min_customers)
    return ChannelComponents(purchase=purchase, spend=spend, prior_customers=float(prior_customers),
                             min_customers=int(min_customers),
                             fallbacks={"purchase": purchase_fallbacks, "spend": spend_fallbacks})


__all__ = ["SHRUNK_PURCHASE_MODELS", "CHANNEL_SUFFIX", "ChannelComponents", "ChannelFitFailure", "PooledPrior",
           "pooled_prior", "penalised_fit", "fit_purchase_by_channel", "fit_spend_by_channel",
           "fit_channel_components", "bg_family_negative_log_likelihood", "gamma_gamma_negative_log_likelihood"]
