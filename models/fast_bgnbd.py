"""Exact BG/NBD (and MBG/NBD) maximum likelihood in numpy/scipy, fast for millions of rows.

The BG/NBD model (Fader, Hardie & Lee 2005, section 7 and note 004): a customer with ``x``
repeat purchases, the last at age ``t_x``, observed up to age ``T``, has log-likelihood

    LL = A1 + A2 + ln(exp(A3) + [x > 0] exp(A4))
    A1 = lnG(r + x) - lnG(r) + r ln(alpha)
    A2 = lnG(a + b) + lnG(b + x) - lnG(b) - lnG(a + b + x)
    A3 = -(r + x) ln(alpha + T)
    A4 = ln(a) - ln(b + x - 1) - (r + x) ln(alpha + t_x)

(lnG = log-gamma). This is the formula of ``lifetimes.BetaGeoFitter._negative_log_likelihood``.

**Why it is fast.** Every transcendental term depends on ``x`` alone, ``T`` alone or ``t_x``
alone, and at day resolution those take a few hundred / a few thousand distinct values even
for millions of rows. :func:`compress` finds the distinct values once (``np.unique`` with
``return_inverse``, done by hashing with ``pandas.factorize``) and sums the weights per distinct
``x`` and per distinct ``T``, so per evaluation

* A1, A2 and their derivatives (gammaln, digamma) are computed per distinct ``x`` and summed
  with the per-``x`` weights; A3 (a log) per distinct ``T`` with the per-``T`` sums of ``w`` and
  ``w x``; no per-row work;
* only the log-sum-exp term needs rows, and only rows with ``x > 0``:
  ``ln(e^A3 + e^A4) = A3 + softplus(D)`` with ``D = A4 - A3 = ln a - ln(b+x-1) + (r+x) (ln(alpha+T)
  - ln(alpha+t_x))``, where both logs and ``ln(b+x-1)`` are gathered by integer index; per row
  that is a few gathers and multiply-adds, one ``exp`` and one ``log1p`` (and for the gradient a
  few more gathers and products, no transcendental function).

The gradient is analytic (with ``s = sigmoid(D)`` the share of the ``A4`` term), in
log-parameter space. Without day resolution (continuous recency) the distinct values are about
as many as the rows: still exact, just less compressed.

**Same objective as lifetimes.** :func:`minimize` minimises, over log-parameters, the mean
negative log-likelihood per customer ``-sum(w LL) / sum(w)`` plus ``penalizer_coef *
sum(params**2)`` on the parameters in the units of the rows it is given; :func:`fit_bgnbd`, like
lifetimes' ``fit``, first divides recency and T by ``max(T)`` (so the penalty acts on ``alpha /
max(T)``) and multiplies alpha back. Fits agree with lifetimes' (autograd + BFGS) to the
precision of lifetimes' optimiser (~1e-6 relative), with and without a penalizer.

**Optimiser and convergence.** L-BFGS-B on the log-parameters (bounded to +-``LOG_BOUND``
so ``exp`` cannot overflow), from a moment-based start (:func:`moment_start`) unless a start is
given, then up to a few Newton steps with the Hessian (forward differences of the analytic
gradient) to land on the optimum to ~1e-10. A fit counts as converged when

* the objective, gradient and Hessian are finite;
* without a penalizer, the smallest Hessian eigenvalue exceeds ``IDENTIFICATION_TOLERANCE`` times
  the largest: a unique interior maximum. A flat (or, to the precision of the forward-difference
  Hessian, slightly rising) direction means the likelihood keeps rising, ever more slowly,
  towards a limit model with some parameter at 0 or infinity (e.g. ``a -> 0`` and ``b -> inf``
  when no customer is seen to drop out); lifetimes' BFGS usually stops there with a
  precision-loss error, and the fallback ladder then tries a penalizer;
* the Hessian has no negative eigenvalue beyond ``CURVATURE_TOLERANCE`` (a minimum, not a
  point where the likelihood still rises);
* the gradient is small relative to the objective (``max |g| <= tolerance * max(1, |f|)``, the
  full gradient, also for a parameter at its bound): ``GRADIENT_RTOL`` when L-BFGS-B itself
  reports convergence, the strict ``STATIONARY_RTOL`` when it stopped for another reason.

The checks are ordered so that the cause, not a symptom, is reported, and the tolerances sit
orders of magnitude away from what fits produce: where the likelihood is flat, where L-BFGS-B
stops depends on the last bits of its sums (the BLAS kernel and thread count), the gradient
left over ranges over 1e-10..1e-5, and the decision must not. A well-posed fit ends with a
gradient of ~1e-10 after the Newton steps; a flat penalised one (a parameter at a limit, whose
further movement changes the likelihood by less than 1e-5 per customer) is accepted whichever
kernel ran it.

With a penalizer the identification check is skipped, as lifetimes (whose BFGS checks only the
gradient) accepts such fits: the penalised optimum may itself lie at a limit (a parameter near
0 or at its bound), whose predictions are those of the limit model (the standard error of that
parameter is meaningless). Otherwise :class:`ConvergenceFailure` is raised, which the fallback
ladder of :mod:`models.base` treats as a failed attempt.

**Scoring.** :func:`conditional_expected_purchases` is lifetimes' closed form for the expected
purchases (same operations, same numbers) with its hypergeometric term evaluated once per
distinct (x, T, t); the model (``models.btyd.BGNBDModel``) applies its guards on top.

**MBG/NBD** (Batislam et al. 2007, as ``lifetimes.ModifiedBetaGeoFitter``) differs only in
``A2 = lnG(a + b) + lnG(b + x + 1) - lnG(b) - lnG(a + b + x + 1)`` and ``A4 = ln(a) - ln(b + x) -
(r + x) ln(alpha + t_x)``, with the log-sum-exp term for every customer, x = 0 included (a
customer may drop out right after the first purchase). ``compress(..., modified=True)`` keeps
every row in the ``pos_*`` arrays and the same code evaluates both (tested against lifetimes'
objective to 1e-12 and against finite differences). At 2M customers (1.48M distinct rows) an
MBG/NBD fit takes 1.5 s instead of lifetimes' 13.0 s, parameters within ~1e-8.

No lifetimes here: numpy, scipy, pandas and :func:`models.base.check_rfm` only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, special

from core.errors import CvsegError
from models.base import check_rfm

#: Names of the parameters, in the order of every parameter vector here.
PARAM_NAMES = ("r", "alpha", "a", "b")
#: Log-parameters are kept within +-LOG_BOUND (parameters within ~[1e-13, 1e13]).
LOG_BOUND = 30.0
#: A fit that L-BFGS-B reports converged may keep a largest gradient component (of the mean
#: negative log-likelihood per customer, in log-parameters) of GRADIENT_RTOL * max(1, |objective|):
#: moving any parameter by a factor e then changes the mean log-likelihood by less than that.
#: Observed on flat penalised fits across OpenBLAS kernels: up to 2e-6 relative (50x margin).
GRADIENT_RTOL = 1e-4
#: The same bound when L-BFGS-B stopped for another reason (iterations, line search): only a
#: stationary point counts (lifetimes' BFGS stops at an absolute 1e-7, ``tol``).
STATIONARY_RTOL = 1e-7
#: Step of the forward differences of the analytic gradient that give the Hessian.
HESSIAN_STEP = 1e-6
#: A Hessian eigenvalue below -CURVATURE_TOLERANCE * max(1, largest eigenvalue) means the fit
#: did not stop at a minimum (the forward-difference Hessian is accurate to ~1e-6 relative).
CURVATURE_TOLERANCE = 1e-5
#: Without a penalizer, the smallest Hessian eigenvalue must exceed IDENTIFICATION_TOLERANCE
#: times the largest (a unique interior maximum; CDNOW: 6e-3; flat likelihoods: ~1e-10).
IDENTIFICATION_TOLERANCE = 1e-8
_LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-10, "gtol": 1e-9, "maxcor": 10}
_NEWTON_STEPS = 3
_NEWTON_TARGET = 1e-11


class ConvergenceFailure(CvsegError, ArithmeticError):
    """The optimiser did not reach an interior maximum of the likelihood (message says why)."""


@dataclass(frozen=True)
class CompressedRows:
    """(frequency, recency, T, weights) arranged for the likelihood: distinct values and indices.

    ``x``/``x_weight``: distinct frequencies and the weight (customers) of each; ``T``/
    ``T_weight``/``T_weight_x``: distinct ages with the sums of ``w`` and ``w x``; ``t``: distinct
    recencies among rows with ``x > 0``. The ``pos_*`` arrays describe the rows with ``x > 0``:
    their frequency, weight, and indices into ``x``, ``t`` and ``T``.
    """

    x: np.ndarray
    x_weight: np.ndarray
    T: np.ndarray
    T_weight: np.ndarray
    T_weight_x: np.ndarray
    t: np.ndarray
    pos_x: np.ndarray
    pos_weight: np.ndarray
    pos_x_index: np.ndarray
    pos_t_index: np.ndarray
    pos_T_index: np.ndarray
    total_weight: float
    n_rows: int
    modified: bool = False           # MBG/NBD: the pos_* arrays hold every row (see compress)


def compress(frequency, recency, T, weights, modified: bool = False) -> CompressedRows:
    """Distinct values of x, t_x and T with integer indices, and the per-value weight sums.

    Inputs are assumed valid (as :func:`models.base.check_rfm` returns them for fitting): whole
    ``frequency >= 0``, ``0 <= recency <= T``, ``T > 0``, ``weights > 0``. ``modified``: for the
    MBG/NBD likelihood, whose log-sum-exp term also applies to customers without repeat
    purchases, so the ``pos_*`` arrays describe every row.
    """
    frequency = np.asarray(frequency, dtype=float)
    recency = np.asarray(recency, dtype=float)
    T = np.asarray(T, dtype=float)
    weights = np.asarray(weights, dtype=float)
    x_index, x_values = _distinct(frequency)
    T_index, T_values = _distinct(T)
    positive = np.ones(frequency.shape, bool) if modified else frequency > 0
    pos_t_index, t_values = _distinct(recency[positive])
    return CompressedRows(
        x=x_values,
        x_weight=np.bincount(x_index, weights, minlength=len(x_values)),
        T=T_values,
        T_weight=np.bincount(T_index, weights, minlength=len(T_values)),
        T_weight_x=np.bincount(T_index, weights * frequency, minlength=len(T_values)),
        t=t_values,
        pos_x=frequency[positive],
        pos_weight=weights[positive],
        pos_x_index=x_index[positive],
        pos_t_index=pos_t_index,
        pos_T_index=T_index[positive],
        total_weight=float(weights.sum()),
        n_rows=int(len(frequency)),
        modified=modified,
    )


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each value, sorted distinct values): ``np.unique(return_inverse=True)`` by hashing.

    ``pandas.factorize`` gives the same result ~3x faster than numpy's sort for millions of rows.
    """
    index, distinct = pd.factorize(values, sort=True, use_na_sentinel=False)
    return index.astype(np.intp, copy=False), np.asarray(distinct, dtype=float)


def total_log_likelihood(params: Sequence[float], rows: CompressedRows) -> float:
    """``sum(w LL)`` at ``params = (r, alpha, a, b)`` (natural parameters, units of ``rows``)."""
    value, _ = _log_likelihood_and_gradient(np.asarray(params, dtype=float), rows, gradient=False)
    return value


def negative_log_likelihood(log_params, rows: CompressedRows, penalizer_coef: float = 0.0
                            ) -> tuple[float, np.ndarray]:
    """Objective and its gradient in log-parameters: ``-sum(w LL) / sum(w) + penalizer * sum(params**2)``.

    Returns ``(inf, nan gradient)`` where the log-likelihood is not finite.
    """
    log_params = np.asarray(log_params, dtype=float)
    params = np.exp(log_params)
    value, gradient = _log_likelihood_and_gradient(params, rows, gradient=True)
    if not math.isfinite(value):
        return math.inf, np.full(4, np.nan)
    objective = -value / rows.total_weight + penalizer_coef * float(np.sum(params ** 2))
    grad_log = params * (-gradient / rows.total_weight + 2.0 * penalizer_coef * params)
    return float(objective), grad_log


def _dot(u: np.ndarray, v: np.ndarray) -> float:
    """Inner product of two 1-d arrays without BLAS (whose threads only contend on a busy driver)."""
    return float(np.einsum("i,i->", u, v))


def _log_likelihood_and_gradient(params: np.ndarray, rows: CompressedRows, gradient: bool
                                 ) -> tuple[float, np.ndarray | None]:
    """``sum(w LL)`` and its gradient in the natural parameters (see the module docstring)."""
    r, alpha, a, b = (float(p) for p in params)
    x = rows.x
    # MBG/NBD: A2 = lnG(a+b) + lnG(b+x+1) - lnG(b) - lnG(a+b+x+1), A4 = ln a - ln(b+x) + ..., for every x
    shift = 1.0 if rows.modified else 0.0
    with np.errstate(all="ignore"):
        # per distinct x: A1 without r ln(alpha), and A2; ln(b + x - 1) (used where x > 0; MBG: ln(b + x))
        per_x = (special.gammaln(r + x) - special.gammaln(r) + special.gammaln(a + b)
                 + special.gammaln(b + x + shift) - special.gammaln(b) - special.gammaln(a + b + x + shift))
        log_b_x = np.log(b + x) if rows.modified else np.log(b + np.maximum(x, 1.0) - 1.0)
        # per distinct T: ln(alpha + T); per distinct t_x of the rows with x > 0: ln(alpha + t_x)
        log_T = np.log(alpha + rows.T)
        log_t = np.log(alpha + rows.t)
        sum_shape_T = r * rows.T_weight + rows.T_weight_x              # sum of w (r + x) per distinct T
        value = (_dot(rows.x_weight, per_x) + rows.total_weight * r * math.log(alpha)
                 - _dot(sum_shape_T, log_T))                           # sum of w (A1 + A2 + A3)
        # rows with x > 0: ln(e^A3 + e^A4) - A3 = softplus(D), D = A4 - A3
        gap = log_T.take(rows.pos_T_index)
        gap -= log_t.take(rows.pos_t_index)                            # ln(alpha+T) - ln(alpha+t_x) >= 0
        shape = rows.pos_x + r
        d = shape * gap
        d += (math.log(a) - log_b_x).take(rows.pos_x_index)
        e = np.abs(d)
        np.negative(e, out=e)
        np.exp(e, out=e)                                               # exp(-|D|), in (0, 1]
        softplus = np.log1p(e)
        softplus += np.maximum(d, 0.0)
        value += _dot(rows.pos_weight, softplus)
    if not gradient:
        return value, None
    with np.errstate(all="ignore"):
        ws = np.where(d >= 0.0, 1.0, e)
        ws /= 1.0 + e                                                  # sigmoid(D) = e^A4 / (e^A3 + e^A4)
        ws *= rows.pos_weight
        total_ws = float(ws.sum())
        inv_b_x = 1.0 / (b + x) if rows.modified else np.where(x > 0, 1.0 / (b + np.maximum(x, 1.0) - 1.0), 0.0)
        ws_b = _dot(ws, inv_b_x.take(rows.pos_x_index))                # sum of w s / (b + x - 1)
        ws_r = _dot(ws, gap)                                           # sum of w s dD/dr
        inv_T, inv_t = 1.0 / (alpha + rows.T), 1.0 / (alpha + rows.t)
        inv_gap = inv_T.take(rows.pos_T_index)
        inv_gap -= inv_t.take(rows.pos_t_index)                        # 1/(alpha+T) - 1/(alpha+t_x) <= 0
        ws *= shape
        ws_alpha = _dot(ws, inv_gap)                                   # sum of w s dD/dalpha
        psi_ab, psi_abx = special.digamma(a + b), special.digamma(a + b + x + shift)
        d_r = (_dot(rows.x_weight, special.digamma(r + x) - special.digamma(r))
               + rows.total_weight * math.log(alpha) - _dot(rows.T_weight, log_T) + ws_r)
        d_alpha = rows.total_weight * r / alpha - _dot(sum_shape_T, inv_T) + ws_alpha
        d_a = _dot(rows.x_weight, psi_ab - psi_abx) + total_ws / a
        d_b = _dot(rows.x_weight, psi_ab + special.digamma(b + x + shift) - special.digamma(b) - psi_abx) - ws_b
    return value, np.array([d_r, d_alpha, d_a, d_b])


# ---- optimiser -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Optimum:
    """Where :func:`minimize` stopped (log-parameters in the units of the rows it was given)."""

    log_params: np.ndarray
    objective: float                 # penalised mean negative log-likelihood per customer
    log_likelihood: float            # sum(w LL) there, unpenalised (units of the rows)
    gradient: np.ndarray             # of the objective, in log-parameters
    hessian: np.ndarray              # of the objective, in log-parameters (forward differences)
    n_evaluations: int               # objective + gradient evaluations, Hessians included
    message: str


def moment_start(rows: CompressedRows) -> np.ndarray:
    """A data-based starting point (log-parameters), from the moments of the purchase counts.

    Ignoring dropout, ``x | T`` is negative binomial with mean ``m T`` and variance ``m T + m^2
    T^2 / r`` (``m = r / alpha``); ``m`` is the mean purchase rate and ``1 / r`` follows from the
    excess variance. ``a = 1, b = 3`` (mean dropout probability 1/4) is a neutral start.
    """
    sum_wT = float(rows.T_weight @ rows.T)
    sum_wT2 = float(rows.T_weight @ rows.T ** 2)
    sum_wx = float(rows.x_weight @ rows.x)
    rate = max(sum_wx / sum_wT, 1e-6)
    # sum w (x - m T)^2 = sum w x^2 - 2 m sum w x T + m^2 sum w T^2
    sum_wx2 = float(rows.x_weight @ rows.x ** 2)
    sum_wxT = float(rows.T_weight_x @ rows.T)
    excess = sum_wx2 - 2 * rate * sum_wxT + rate ** 2 * sum_wT2 - rate * sum_wT
    inverse_r = excess / (rate ** 2 * sum_wT2) if excess > 0 else 1.0
    r = float(np.clip(1.0 / inverse_r, 0.05, 20.0)) if inverse_r > 0 else 1.0
    return np.log([r, r / rate, 1.0, 3.0])


def minimize(rows: CompressedRows, penalizer_coef: float = 0.0, initial_log_params=None) -> Optimum:
    """Minimise :func:`negative_log_likelihood` over log-parameters; :class:`ConvergenceFailure` if it cannot.

    L-BFGS-B from ``initial_log_params`` (default :func:`moment_start`), then up to
    ``_NEWTON_STEPS`` Newton steps with the Hessian at the L-BFGS-B point (forward differences
    of the analytic gradient, computed once: the steps are tiny); the convergence checks are in
    the module docstring.
    """
    count = [0]
    last: dict[bytes, tuple[float, np.ndarray]] = {}

    def objective(log_params):
        key = np.asarray(log_params, dtype=float).tobytes()
        if key not in last:                             # L-BFGS-B re-evaluates the start we checked
            count[0] += 1
            last.clear()
            last[key] = negative_log_likelihood(log_params, rows, penalizer_coef)
        value, gradient = last[key]
        return value, gradient.copy()

    x0 = moment_start(rows) if initial_log_params is None else np.asarray(initial_log_params, dtype=float)
    x0 = np.clip(x0, -LOG_BOUND + 1, LOG_BOUND - 1)
    label = "MBG/NBD" if rows.modified else "BG/NBD"
    if not math.isfinite(objective(x0)[0]):
        raise ConvergenceFailure(f"{label} log-likelihood is not finite at the start {np.exp(x0).tolist()}")
    result = optimize.minimize(objective, x0, jac=True, method="L-BFGS-B",
                               bounds=[(-LOG_BOUND, LOG_BOUND)] * 4, options=dict(_LBFGS_OPTIONS))
    x, f, g = np.asarray(result.x, dtype=float), float(result.fun), np.asarray(result.jac, dtype=float)
    if not (math.isfinite(f) and np.all(np.isfinite(g))):
        raise ConvergenceFailure(f"L-BFGS-B ended at a non-finite objective: {result.message}")
    hessian = hessian_from_gradient(objective, x, g)
    for _ in range(_NEWTON_STEPS):
        if np.max(np.abs(g)) <= _NEWTON_TARGET:
            break
        try:
            step = -np.linalg.solve(hessian, g)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)) or g @ step >= 0:
            break                                       # not a descent direction: Hessian not positive
        candidate = np.clip(x + step, -LOG_BOUND, LOG_BOUND)
        f_new, g_new = objective(candidate)
        if not (math.isfinite(f_new) and f_new <= f + 1e-14 * abs(f)
                and np.max(np.abs(g_new)) < np.max(np.abs(g))):
            break
        x, f, g = candidate, f_new, g_new
    _check_converged(x, f, g, hessian, str(result.message), penalizer_coef, label,
                     optimizer_converged=bool(result.success))
    penalty = penalizer_coef * float(np.sum(np.exp(2.0 * x)))
    return Optimum(log_params=x, objective=f, log_likelihood=-(f - penalty) * rows.total_weight,
                   gradient=g, hessian=hessian, n_evaluations=count[0],
                   message=f"{result.message}; {result.nit} L-BFGS-B iterations")


def hessian_from_gradient(objective, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Forward differences of the analytic gradient (one evaluation per parameter), symmetrised; ~1e-6
    relative. ``objective(x)`` returns (value, gradient); ``g`` is the gradient at ``x``. Also used by
    the channel fits (:mod:`models.channels`)."""
    columns = []
    for k in range(len(x)):
        step = np.zeros_like(x)
        step[k] = HESSIAN_STEP
        columns.append((objective(x + step)[1] - g) / HESSIAN_STEP)
    hessian = np.column_stack(columns)
    return 0.5 * (hessian + hessian.T)


def _check_converged(x, f, g, hessian, message: str, penalizer_coef: float, label: str = "BG/NBD",
                     optimizer_converged: bool = True) -> None:
    """Raise :class:`ConvergenceFailure` naming the cause (see the module docstring for the order)."""
    params = dict(zip(PARAM_NAMES, np.exp(x).tolist()))
    if not (math.isfinite(f) and np.all(np.isfinite(g)) and np.all(np.isfinite(hessian))):
        raise ConvergenceFailure(f"{label} fit ended at a non-finite objective or gradient ({message}); "
                                 f"params {params}")
    eigenvalues = np.linalg.eigvalsh(hessian)
    if penalizer_coef == 0 and eigenvalues[0] <= IDENTIFICATION_TOLERANCE * eigenvalues[-1]:
        raise ConvergenceFailure(f"{label} likelihood has no unique maximum: it is flat (or still rising) along "
                                 f"some direction (Hessian eigenvalues {eigenvalues.tolist()}), parameters drift "
                                 f"towards 0 or infinity; params {params}")
    if eigenvalues[0] < -CURVATURE_TOLERANCE * max(1.0, eigenvalues[-1]):
        raise ConvergenceFailure(f"{label} fit stopped where the likelihood still rises along some direction "
                                 f"(Hessian eigenvalues {eigenvalues.tolist()}); params {params}")
    tolerance = (GRADIENT_RTOL if optimizer_converged else STATIONARY_RTOL) * max(1.0, abs(f))
    largest = float(np.max(np.abs(g)))              # the full gradient: also at a bound
    if largest > tolerance:
        raise ConvergenceFailure(f"{label} fit stopped with gradient {largest:.2e} > {tolerance:.2e} "
                                 f"({message}); params {params}")


# ---- the whole fit, lifetimes-equivalent -----------------------------------------------------------
@dataclass(frozen=True)
class FastFit:
    """Result of :func:`fit_bgnbd`: parameters in the caller's time unit and the optimiser's result."""

    params: dict[str, float]
    log_likelihood: float            # total, unpenalised, in the caller's time unit
    optimum: Optimum                 # in lifetimes' internal unit (time / max(T))
    time_scale: float                # max(T): internal time = caller's time / time_scale


def fit_bgnbd(frequency, recency, T, weights=None, penalizer_coef: float = 0.0,
              initial_log_params=None) -> FastFit:
    """Fit BG/NBD exactly as ``lifetimes.BetaGeoFitter(penalizer_coef).fit`` does, without lifetimes.

    Time is divided by ``max(T)`` before optimising (``initial_log_params``, if given, are in that
    internal unit, like lifetimes' ``initial_params``) and alpha is multiplied back.
    """
    if not (penalizer_coef >= 0 and math.isfinite(penalizer_coef)):
        raise ValueError(f"penalizer_coef must be a finite number >= 0, got {penalizer_coef!r}")
    frequency, recency, T, weights = check_rfm(frequency, recency, T, weights, for_fit=True)
    time_scale = float(T.max())
    rows = compress(frequency, recency / time_scale, T / time_scale, weights)
    optimum = minimize(rows, penalizer_coef, initial_log_params)
    params = dict(zip(PARAM_NAMES, np.exp(optimum.log_params).tolist()))
    params["alpha"] *= time_scale
    return FastFit(params=params, optimum=optimum, time_scale=time_scale,
                   log_likelihood=internal_to_caller_log_likelihood(optimum.log_likelihood, rows, time_scale))


def internal_to_caller_log_likelihood(value: float, rows: CompressedRows, time_scale: float) -> float:
    """``sum(w LL)`` with times divided by ``time_scale`` -> the same in the caller's unit.

    Dividing every time and alpha by ``c`` adds ``x ln c`` to each row's LL (the density of the
    purchase times is per unit of time), so the caller's value is the internal one minus
    ``sum(w x) ln(time_scale)``.
    """
    return float(value - float(rows.x_weight @ rows.x) * math.log(time_scale))


def log_likelihood(params, frequency, recency, T, weights=None, modified: bool = False) -> float:
    """Total unpenalised ``sum(w LL)`` at ``params`` (dict or ``(r, alpha, a, b)``), caller's unit;
    ``modified``: of MBG/NBD."""
    if isinstance(params, dict):
        params = [params[name] for name in PARAM_NAMES]
    frequency, recency, T, weights = check_rfm(frequency, recency, T, weights, for_fit=True)
    return total_log_likelihood(params, compress(frequency, recency, T, weights, modified))


# ---- scoring ------------------------------------------------------------------------------------------
def conditional_expected_purchases(params, t, frequency, recency, T) -> np.ndarray:
    """lifetimes' ``conditional_expected_number_of_purchases_up_to_time`` (FHL 2005 eq. 10), faster.

    The same formula, operation for operation (so the same numbers), but its costly part, the
    Gaussian hypergeometric term ``2F1(r+x, b+x; a+b+x-1; t/(alpha+T+t))`` and what depends only
    on (x, T, t), is evaluated once per distinct (x, T, t) (2M customers at day resolution:
    ~120k) and gathered; lifetimes evaluates ``hyp2f1`` twice on every row, here the
    transformed form (``2F1(c-a, c-b; c; z) (1-z)^(c-a-b)``) only where the direct one is
    infinite. ``params = (r, alpha, a, b)``. Values may be NaN, inf or slightly negative where
    the closed form fails, as lifetimes'; the caller applies the guards. One deliberate
    difference: for ``x = 0`` lifetimes still computes the unused factor ``a / (b - 1)``, whose
    ``0 * inf`` gives NaN when ``b == 1``; here that factor is skipped (the value is exact).
    """
    r, alpha, a, b = (float(p) for p in params)
    columns = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (t, frequency, recency, T)))
    shape = columns[0].shape
    t, x, recency, T = (np.ravel(c) for c in columns)
    index, (x_d, T_d, t_d) = _distinct_combinations(x, T, t)
    with np.errstate(all="ignore"):
        a_, b_, c_ = r + x_d, b + x_d, a + b + x_d - 1
        z = t_d / (alpha + T_d + t_d)
        ln_hyp = np.log(special.hyp2f1(a_, b_, c_, z))
        infinite = np.isinf(ln_hyp)
        if infinite.any():
            ai, bi, ci, zi = a_[infinite], b_[infinite], c_[infinite], z[infinite]
            ln_hyp[infinite] = np.log(special.hyp2f1(ci - ai, ci - bi, ci, zi)) + (ci - ai - bi) * np.log(1 - zi)
        first_term = (a + b + x_d - 1) / (a - 1)
        second_term = 1 - np.exp(ln_hyp + (r + x_d) * np.log((alpha + T_d) / (alpha + t_d + T_d)))
        numerator = (first_term * second_term)[index]
        odds = np.where(x > 0, (a / (b + np.maximum(x, 1.0) - 1)) * ((alpha + T) / (alpha + recency)) ** (r + x),
                        0.0)
        return (numerator / (1 + odds)).reshape(shape)


def _distinct_combinations(*columns: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(index of each row's combination, the distinct combinations column by column).

    Each column is numbered by ``pandas.factorize`` (constant columns are skipped) and the
    numbers are combined into one integer key; while the key range is small (up to ``4 n``) it
    is renumbered with a dense table instead of another hash pass.
    """
    n = len(columns[0])
    dense_limit = max(4 * n, 1 << 20)
    key, size = np.zeros(n, dtype=np.int64), 1
    for column in columns:
        if n == 0 or np.all(column == column[0]):
            continue
        codes, distinct = pd.factorize(column, use_na_sentinel=False)
        if size * len(distinct) > dense_limit:                      # keep the key range bounded
            key, uniques = pd.factorize(key)
            size = len(uniques)
        key = key * len(distinct) + codes
        size *= len(distinct)
    if size <= dense_limit:
        present = np.zeros(size, dtype=bool)
        present[key] = True
        index = (np.cumsum(present) - 1)[key]
        n_distinct = int(present.sum())
    else:
        index, uniques = pd.factorize(key)
        n_distinct = len(uniques)
    first = np.empty(n_distinct, dtype=np.intp)
    first[index[::-1]] = np.arange(n - 1, -1, -1)                 # first row of each combination
    return index, [column[first] for column in columns]


__all__ = ["PARAM_NAMES", "ConvergenceFailure", "CompressedRows", "compress", "negative_log_likelihood",
           "total_log_likelihood", "moment_start", "minimize", "Optimum", "fit_bgnbd", "FastFit",
           "log_likelihood", "internal_to_caller_log_likelihood", "conditional_expected_purchases"]
