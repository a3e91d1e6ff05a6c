"""Per-customer value intervals: P10 / P50 / P90 of the 6-month net value, in closed form.

The realised value of a customer over the horizon ``t`` is ``V = (1 - c) * sum_{j<=N} Z_j``:

* ``N``, the number of future purchases, from the BG/NBD (or MBG/NBD) model given the
  customer's history (x, t_x, T): with probability ``1 - P(alive)`` the customer has dropped
  out (``N = 0``); given alive, the purchase rate is ``lambda ~ Gamma(r + x, alpha + T)`` and
  the dropout probability ``p ~ Beta(a, b + x)`` (MBG/NBD: ``b + x + 1``), independent, and
  ``N = min(M, G)`` with ``M ~ Poisson(lambda t)`` and ``G ~ Geometric(p)`` (dropping out after
  the G-th purchase). Hence, exactly,

      P(N >= k) = P(alive) * P(NB(r + x, (alpha+T)/(alpha+T+t)) >= k) * E[(1 - p)^(k-1)]

  with ``E[(1-p)^(k-1)] = prod_{j<k-1} (b+x+j) / (a+b+x+j)``; both factors follow a one-term
  recurrence in k, so ``P(N = 0)``, ``E[N]`` and ``E[N (N-1)]`` are series summed until ``P(N >= k)``
  falls below ``1e-7`` times the sum so far, the rest added as a geometric tail
  (``E[N]`` is the model's expected purchases: the tests check it against lifetimes' closed form);
* ``Z_j``, the order values, Gamma-Gamma: ``Z_j ~ Gamma(p, nu)`` with the customer's posterior
  ``nu ~ Gamma(p x + q, v + x m)`` (x repeat orders of mean value m), so that
  ``E[Z] = p (v + x m) / (p x + q - 1)`` (the expected order value) and, through the shared
  ``nu``, ``E[Z_1 Z_2] = p^2 E[nu^-2]``, ``E[Z^2] = p (p + 1) E[nu^-2]``;
* ``c``, the predicted cancellation rate, a fixed factor under the gross basis (each future
  order's value is net of the customer's posterior mean rate; 0 under the net basis). That
  ignores the randomness of which orders get cancelled (small next to the other two).

**Parameter uncertainty** (the fit's Fisher information): the purchase and the spend
parameters are normal in log-parameters with covariance = inverse Hessian of the negative
log-likelihood (stored by the fits in ``fit_info_["log_param_covariance"]``). The moments above
are averaged over d + 1 *sigma points* of each normal (the vertices of a regular simplex in
log-parameters, :func:`sigma_points`): 5 purchase and 4 spend parameter vectors pushed through
the closed forms, which reproduce the normal's mean and covariance exactly (the symmetric 2d
set would cost 8 series instead of 5 for the same two moments). Why not random draws: the
intervals are cheap only because the process part is summed in closed form; hundreds of
random parameter draws (or per-customer Monte Carlo, 200+ draws of N and of each order)
would cost 20-100x the scoring itself, and at the sample sizes the engine fits, the parameter
part is a small share of the width. Purchase and spend parameters are independent, so the
mixture moments factor exactly: ``E[V] = E[N] E[Z]``, ``E[V^2] = E[N] E[Z^2] + E[N(N-1)] E[Z_1 Z_2]``.
Nothing is random: no seed, the same numbers whatever the partitioning.

**Quantiles.** ``V`` has an atom at 0 (no purchase: ``P(V = 0) = P(N = 0)``, often above 50%)
and a continuous part. The continuous part ``V | N >= 1`` is moment-matched by a lognormal
(its first two moments are exact); the quantile at level u is 0 when ``u <= P(V = 0)``, else the
lognormal's quantile at ``(u - P(V=0)) / (1 - P(V=0))``. So P10 is 0 whenever at least 10% of
the mass is at 0, and P50 is 0 for a customer more likely than not to buy nothing: the median
of a zero-inflated value, not the predicted (mean) value.

**Coverage of a distribution with an atom.** With ``P(V = 0) = 0.5``, ``[P10, P90] = [0, q]``
holds 90% of the mass, not 80%, so the share of customers inside their closed interval
over-covers by design. :func:`interval_coverage` counts coverage by the randomised
probability-integral transform: a realised value ``y > 0`` is covered when ``P10 <= y <= P90``;
a realised 0 counts as the fraction of the atom ``[0, P(V=0)]`` (in probability) that lies inside
the levels ``[0.1, 0.9]``, i.e. ``(min(P0, 0.9) - 0.1)^+ / P0``. Under a correct model that is
80% in expectation whatever the atoms; the plain closed-interval share is reported beside it.

**Intervals of group totals** (a segment, a channel-month). Customers share the fitted
parameters, so the parameter part of their values does not average out over a group while the
process part does: ``Var(sum V_i) = sum_i E_theta Var(V_i | theta) + Var_theta(sum_i E[V_i | theta])``.
The first term adds up per customer (``process_var = sd^2 - param_sd^2``). For the second,
summing per sigma point would be exact but needs one column per (purchase point, spend point)
pair, 5 x 4 = 20 per customer; the bound ``(sum_i param_sd_i)^2`` (perfect correlation) needs one
column but is loose, because customers' values do not move together under every parameter
direction (a prior-driven newcomer and a long-time buyer react to ``a, b`` oppositely).
:func:`group_terms` uses that ``E[V | p, s] = c a_p b_s`` on the grid splits exactly into
orthogonal parts: ``c b̄ alpha_p`` and ``c ā beta_s`` (first order), written in the simplices'
own orthonormal coordinates, are ``(k_p - 1) + (k_s - 1) = 7`` numbers per customer, ``loadings``,
that add across customers *before* squaring (exact, as summing per sigma point); the remaining
interaction ``c alpha_p beta_s`` (second order: a product of two parameter effects) is bounded by
summing its sds. The total's P10 / P90 then come from the lognormal with the total's mean and
variance (:func:`total_quantiles`): totals are non-negative and skewed for small groups, where
a normal would put P10 below 0; for large groups the two agree. A group of a few rare buyers may
well bring nothing: the total has an atom at 0, ``P(total = 0) = prod_i P(V_i = 0)`` (customers
taken as independent there, which slightly understates it: they share the parameters), and the
lognormal is matched to the positive part, as for a customer. For such a group P90 can be below
the mean (most of the mean is in a rare large outcome); from a few dozen customers on the atom is
negligible. Loadings add only within one fit (one set of parameters); the group's customers must
be scored by the same bundle.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import special

#: Quantile levels of the interval and of its middle.
LEVELS = (0.1, 0.5, 0.9)
#: The count series stops where P(N >= k) <= SERIES_TOLERANCE x the sum so far and adds the rest as a geometric
#: tail (relative: E[N] to ~4e-9, E[N(N-1)] to ~4e-8, for a long-lapsed customer too, where an absolute 1e-10
#: left 1% on E[N] ~ 1e-8; and a quarter fewer terms than that did).
SERIES_TOLERANCE = 1e-7
#: Elements (customers x parameter rows) per pass of the count series (models.intervals.count_moments_by_point).
SERIES_CHUNK = 10_000
#: Hard cap on the series length (a customer with ~1,000+ expected purchases in the horizon).
MAX_TERMS = 20_000
#: E[nu^-2] needs p x + q > 2; below, the order values have no finite variance: clamp (documented).
MIN_SECOND_MOMENT_SHAPE = 2.05
#: Purchase models whose count moments this module has (BG/NBD family: series; Pareto/NBD: quadrature).
SUPPORTED_PURCHASE_MODELS = ("bgnbd", "mbgnbd", "paretonbd")
#: Gauss-Legendre nodes of the Pareto/NBD lifetime integrals (in log(1 + u/c): smooth integrands).
PARETO_NODES = 24


def log_param_covariance(hessian, total_weight: float, names: Sequence[str]) -> dict[str, Any] | None:
    """``{"names": [...], "matrix": [[...]]}``: covariance of the log-parameters from the Hessian of
    the *mean* negative log-likelihood per customer (lifetimes' and the fast fitter's objective):
    ``inv(H) / sum(w)``. None when the Hessian is missing, not finite or not positive definite
    (then the intervals carry the processes' variance only, and fit_info says so)."""
    if hessian is None or not total_weight > 0:
        return None
    h = np.asarray(hessian, dtype=float)
    if h.shape != (len(names), len(names)) or not np.all(np.isfinite(h)):
        return None
    h = 0.5 * (h + h.T)
    try:
        np.linalg.cholesky(h)
        covariance = np.linalg.inv(h) / float(total_weight)
        np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(covariance)):
        return None
    return {"names": list(names), "matrix": covariance.tolist()}


def sigma_points(params: Mapping[str, float], covariance: Mapping[str, Any] | None,
                 names: Sequence[str]) -> np.ndarray:
    """Parameter vectors (rows, natural units, columns in ``names``) to average over: the d + 1 vertices of
    a regular simplex around the estimate in log-parameters, scaled so that, with equal weights, they
    have exactly the normal's mean and covariance (``theta_hat + sqrt(d+1) L h_i``, L the Cholesky
    factor, h_i the rows of the Helmert basis); only the estimate when there is no covariance."""
    centre = np.log([float(params[n]) for n in names])
    if not covariance:
        return np.exp(centre)[None, :]
    order = [list(covariance["names"]).index(n) for n in names]
    matrix = np.asarray(covariance["matrix"], dtype=float)[np.ix_(order, order)]
    d = len(names)
    offsets = math.sqrt(d + 1) * _simplex(d) @ np.linalg.cholesky(matrix).T
    return np.exp(centre[None, :] + offsets)


def _simplex(d: int) -> np.ndarray:
    """(d+1, d): an orthonormal basis of the sum-zero subspace (Helmert), one vertex per row:
    the rows sum to 0 and ``S.T @ S`` is the identity."""
    out = np.zeros((d + 1, d))
    for k in range(1, d + 1):
        out[:k, k - 1] = 1.0
        out[k, k - 1] = -float(k)
        out[:, k - 1] /= math.sqrt(k * (k + 1))
    return out


@dataclass(frozen=True)
class CountMoments:
    """Per customer, averaged over the purchase parameter vectors: P(N = 0), E[N], E[N(N-1)]."""

    p_zero: np.ndarray
    mean: np.ndarray
    factorial2: np.ndarray

    def averaged(self) -> "CountMoments":
        """Per-point moments (:func:`count_moments_by_point`) averaged over the parameter rows."""
        return CountMoments(*(v.mean(axis=0) for v in (self.p_zero, self.mean, self.factorial2)))


def count_moments(param_rows: np.ndarray, t: float, x, t_x, T, modified: bool = False) -> CountMoments:
    """Moments of the BG/NBD (``modified``: MBG/NBD) purchase count over the next ``t`` (see the module
    docstring) under each row of ``param_rows`` (r, alpha, a, b), averaged over the rows.

    Every (parameter row, customer) pair is one element of flat arrays, so the series loop runs once
    for all parameter vectors (Python overhead per step, not per vector)."""
    return count_moments_by_point(param_rows, t, x, t_x, T, modified).averaged()


def count_moments_by_point(param_rows: np.ndarray, t: float, x, t_x, T, modified: bool = False,
                           compiled: bool | None = None) -> CountMoments:
    """:func:`count_moments` before averaging: (parameter rows x customers) arrays. Group totals need
    ``E[N | theta]`` per parameter vector (:func:`group_terms`).

    The series runs in numba's compiled loop (:func:`_compiled_series`: each element's terms in
    registers, ~8x the numpy loop's speed) when numba imports, else in numpy
    (:func:`_count_moments_flat`); both stop at the same tolerance (each within 1e-7 of the series
    summed to the last bits).
    ``compiled``: True / False forces one (tests), None takes the compiled one when available."""
    x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
    rows = np.asarray(param_rows, dtype=float)
    k_rows, n = len(rows), x.shape[0]
    kernel = _compiled_series() if compiled is not False else None
    if compiled and kernel is None:
        raise RuntimeError("the compiled count series needs numba, which does not import here")
    out = [np.empty((k_rows, n)) for _ in range(3)]
    if kernel is not None:
        kernel(rows, x, t_x, T, float(t), bool(modified), SERIES_TOLERANCE, MAX_TERMS, *out)
        return CountMoments(*out)
    # customers in chunks of ~SERIES_CHUNK elements: the loop's dozen state arrays then stay in the
    # CPU cache (about a quarter faster than one pass over a 10,000-row Arrow batch x 5 rows)
    step = max(1, SERIES_CHUNK // k_rows)
    for start in range(0, n, step):
        part = slice(start, min(n, start + step))
        size = part.stop - part.start
        r, alpha, a, b = (np.repeat(rows[:, j], size) for j in range(4))
        moments = _count_moments_flat(r, alpha, a, b, t, np.tile(x[part], k_rows), np.tile(t_x[part], k_rows),
                                      np.tile(T[part], k_rows), modified)
        for target, values in zip(out, moments):
            target[:, part] = values.reshape(k_rows, size)
    return CountMoments(*out)


def bg_family_p_alive(r, alpha, a, b, x, t_x, T, modified: bool) -> np.ndarray:
    """P(alive) of BG/NBD (MBG/NBD: ``modified``) in log-odds form (no overflow); BG/NBD: 1 when x = 0.
    Also the purchase models' own P(alive) (models/btyd.py)."""
    x = np.asarray(x, float)
    with np.errstate(all="ignore"):
        log_ratio = (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
        if modified:
            log_odds_dead = np.log(a) - np.log(b + x) + log_ratio
        else:
            log_odds_dead = np.where(x > 0, np.log(a) - np.log(b + np.maximum(x, 1.0) - 1.0) + log_ratio, -np.inf)
    return special.expit(-log_odds_dead)


def _count_moments_flat(r, alpha, a, b, t, x, t_x, T, modified):
    """(P(N = 0), E[N], E[N(N-1)]) per element; every argument but ``t`` an array of one length.

    Eleven array passes per term (the cost of the intervals is this loop): ``P(alive)`` rides in the
    beta factor, the NB ratio is ``q + shape q / k``, and ``E[N(N-1)] = 2 sum_k (k-1) P(N >= k)`` is
    kept as ``2 (K C_K - sum_{j<=K} C_j)`` with ``C_j`` the running sum of ``P(N >= k)``, so one
    accumulation per term instead of a product and a sum."""
    alive = bg_family_p_alive(r, alpha, a, b, x, t_x, T, modified)
    shape = r + x
    q = t / (alpha + T + t)                                    # NB(shape, 1 - q): P(M = k+1) / P(M = k)
    b_post = b + x + (1.0 if modified else 0.0)                # p | alive ~ Beta(a, b_post)
    pmf = np.exp(shape * np.log1p(-q))                         # P(M = 0)
    p_zero = 1.0 - alive * (1.0 - pmf)
    n = x.shape[0]
    mean = np.zeros(n)
    factorial2 = np.zeros(n)
    # the state of the elements whose series has not converged, compacted now and then; the sums
    # are kept compacted too and written back when an element leaves (no scatter per step)
    idx = np.arange(n)
    surv = 1.0 - pmf                                           # P(M >= 1)
    alive_beta = np.array(alive, dtype=float)                  # P(alive) E[(1-p)^(k-1)] at k = 1
    c_q, c_shape_q = q, (shape - 1.0) * q
    c_bpost, c_abpost = b_post - 1.0, a + b_post - 1.0
    c_mean, c_cumsum = np.zeros(n), np.zeros(n)                # C_k and sum_{j<=k} C_j
    tail = np.empty(n)
    scratch = np.empty(n)
    scratch2 = np.empty(n)

    def write_back(positions, k_done, running, cumulative, last, following):
        # the terms after k_done as a geometric tail with the last ratio (P(N >= k) falls about
        # geometrically by then): E[N] to ~4e-9 with a fifth fewer terms than summing on to that
        ratio = np.minimum(np.divide(following, last, out=np.zeros_like(last), where=last > 0), 0.999)
        mean[positions] = running + following / (1.0 - ratio)
        factorial2[positions] = 2.0 * (k_done * running - cumulative
                                       + following * (k_done / (1.0 - ratio) + ratio / (1.0 - ratio) ** 2))

    k = 1
    while idx.size and k <= MAX_TERMS:
        np.multiply(surv, alive_beta, out=tail)                # P(N >= k)
        c_mean += tail
        c_cumsum += c_mean
        # next k: P(M = k) = P(M = k-1) (q + (shape - 1) q / k); P(M >= k+1) = P(M >= k) - P(M = k)
        np.multiply(c_shape_q, 1.0 / k, out=scratch)
        scratch += c_q
        pmf *= scratch
        surv -= pmf
        # E[(1-p)^k] = E[(1-p)^(k-1)] (b' + k - 1) / (a + b' + k - 1)
        np.add(c_bpost, k, out=scratch)
        np.add(c_abpost, k, out=scratch2)
        scratch /= scratch2
        alive_beta *= scratch
        if k % 4 == 0 or idx.size < 64:
            # P(N >= k) does not increase with k: once small next to the sum, the rest is negligible.
            # Compacted when half the elements are done: gathering the state arrays costs several
            # terms, and a done element's further terms are below the tolerance (at worst, half the
            # elements run on as long as the other half: twice the work)
            done = tail <= SERIES_TOLERANCE * c_mean
            finished = int(np.count_nonzero(done))
            if finished and finished * 2 >= idx.size:
                write_back(idx[done], k, c_mean[done], c_cumsum[done], tail[done], surv[done] * alive_beta[done])
                keep = ~done
                idx, pmf, surv, alive_beta, c_mean, c_cumsum = (
                    v[keep] for v in (idx, pmf, surv, alive_beta, c_mean, c_cumsum))
                c_q, c_shape_q, c_bpost, c_abpost = (v[keep] for v in (c_q, c_shape_q, c_bpost, c_abpost))
                tail, scratch, scratch2 = np.empty(idx.size), np.empty(idx.size), np.empty(idx.size)
        k += 1
    write_back(idx, k - 1, c_mean, c_cumsum, tail, surv * alive_beta)
    return p_zero, mean, factorial2


def _series_elements(rows, x, t_x, T, t, modified, tolerance, max_terms, p_zero, mean, factorial2):  # pragma: no cover
    """:func:`bg_family_p_alive` and the count series of :func:`_count_moments_flat` for every (parameter
    row, customer), one element at a time (numba compiles it: no temporary arrays, each element's terms
    in registers); the same recurrences and geometric tail, each element stopping at the first term
    below the tolerance."""
    for j in range(rows.shape[0]):
        r, alpha, a, b = rows[j, 0], rows[j, 1], rows[j, 2], rows[j, 3]
        for i in range(x.shape[0]):
            x_i = x[i]
            log_ratio = (r + x_i) * (math.log(alpha + T[i]) - math.log(alpha + t_x[i]))
            if modified:
                log_odds_dead = math.log(a) - math.log(b + x_i) + log_ratio
            elif x_i > 0:
                log_odds_dead = math.log(a) - math.log(b + max(x_i, 1.0) - 1.0) + log_ratio
            else:
                log_odds_dead = -math.inf
            if log_odds_dead > 0:                                   # expit(-log_odds_dead), no overflow
                odds = math.exp(-log_odds_dead)
                alive = odds / (1.0 + odds)
            else:
                alive = 1.0 / (1.0 + math.exp(log_odds_dead))
            shape = r + x_i
            q = t / (alpha + T[i] + t)                              # NB: P(M = k+1) / P(M = k) -> q
            b_post = b + x_i + (1.0 if modified else 0.0)
            pmf = math.exp(shape * math.log1p(-q))                  # P(M = 0)
            p_zero[j, i] = 1.0 - alive * (1.0 - pmf)
            surv, alive_beta = 1.0 - pmf, alive                     # P(M >= 1), P(alive) E[(1-p)^0]
            shape_q, b_less, ab_less = (shape - 1.0) * q, b_post - 1.0, a + b_post - 1.0
            running = cumulative = tail = 0.0
            k = 1
            while True:
                tail = surv * alive_beta                            # P(N >= k)
                running += tail
                cumulative += running
                pmf *= shape_q / k + q
                surv -= pmf
                alive_beta *= (b_less + k) / (ab_less + k)
                if tail <= tolerance * running or k >= max_terms:
                    break
                k += 1
            following = surv * alive_beta
            ratio = min(following / tail, 0.999) if tail > 0 else 0.0
            mean[j, i] = running + following / (1.0 - ratio)
            factorial2[j, i] = 2.0 * (k * running - cumulative
                                      + following * (k / (1.0 - ratio) + ratio / (1.0 - ratio) ** 2))


@functools.lru_cache(maxsize=None)
def _compiled_series():
    """:func:`_series_elements` compiled by numba (once per process, cached on disk where the code
    is a file: ~1.4 s to compile, then ~0.1 s to load), or None without numba."""
    try:
        import numba
    except ImportError:     # the numpy series then (slower, same numbers to ~1e-8)
        return None
    try:
        return numba.njit(nogil=True, cache=True)(_series_elements)
    except RuntimeError:    # no writable cache location (a read-only install and home): compile each time
        return numba.njit(nogil=True)(_series_elements)


def pareto_count_moments(param_rows: np.ndarray, t: float, x, t_x, T, alive: np.ndarray) -> CountMoments:
    """:func:`pareto_count_moments_by_point` averaged over the parameter rows."""
    return pareto_count_moments_by_point(param_rows, t, x, t_x, T, alive).averaged()


def pareto_count_moments_by_point(param_rows: np.ndarray, t: float, x, t_x, T, alive: np.ndarray) -> CountMoments:
    """Moments of the Pareto/NBD purchase count over the next ``t`` under each row of ``param_rows``
    (r, alpha, s, beta), as (parameter rows x customers) arrays; ``alive`` (rows x customers) is P(alive) at each row
    (``models.btyd.pareto_p_alive``: the stable 2F1 form lives with the likelihood).

    Given alive at T the rates are independent, ``lambda ~ Gamma(r + x, alpha + T)`` and
    ``mu ~ Gamma(s, beta + T)``; the customer stays for ``tau ~ Exp(mu)``, so the exposure in the
    horizon is ``L = min(tau, t)`` with ``P(tau > u) = S(u) = (b / (b + u))^s``, b = beta + T, and
    ``N | L ~ NB(r + x, (alpha+T) / (alpha+T+L))``. Hence, with A = alpha + T,

        E[N | alive] = (r+x)/A E[L],  E[N(N-1) | alive] = (r+x)(r+x+1)/A^2 E[L^2],
        P(N = 0 | alive) = S(t) (A/(A+t))^(r+x) + int_0^t f_tau(u) (A/(A+u))^(r+x) du,

    ``E[L] = int_0^t S``, ``E[L^2] = int_0^t 2u S``: one-dimensional integrals, by Gauss-Legendre in
    ``w = log(1 + u/c)``, c = min(alpha + T, beta + T): the two curves, S(u) and (A/(A+u))^(r+x),
    fall on the scales b and A, and both are smooth in w when c is the shorter one (a grid on the
    longer scale misses the faster fall: P(N = 0) off by 3e-3 at alpha + T = 5, beta + T = 300).
    ``E[N]`` is the model's expected purchases (the tests check it against the closed form)."""
    x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
    rows = np.asarray(param_rows, dtype=float)
    alive = np.asarray(alive, dtype=float).reshape(len(rows), x.shape[0])
    nodes, weights = np.polynomial.legendre.leggauss(PARETO_NODES)
    p_zero, mean, factorial2 = (np.zeros((len(rows), x.shape[0])) for _ in range(3))
    for k, ((r, alpha, s, beta), alive_row) in enumerate(zip(rows, alive)):
        shape, a_post, b_post = r + x, alpha + T, beta + T
        scale = np.minimum(a_post, b_post)[:, None]
        span = np.log1p(t / scale)                                      # w runs over [0, log(1 + t/c)]
        w = 0.5 * span * (nodes[None, :] + 1.0)
        du = 0.5 * span * weights[None, :] * scale * np.exp(w)          # du = (c + u) dw
        u = scale * np.expm1(w)
        survival = np.exp(-s * np.log1p(u / b_post[:, None]))           # S(u)
        none_bought = np.exp(-shape[:, None] * np.log1p(u / a_post[:, None]))   # P(N = 0 | L = u)
        exposure = (du * survival).sum(axis=1)                          # E[L]
        exposure2 = (du * 2.0 * u * survival).sum(axis=1)               # E[L^2]
        # tau's density s S(u) / (b + u) over [0, t), then the atom L = t
        p_zero_alive = ((du * s * survival / (b_post[:, None] + u) * none_bought).sum(axis=1)
                        + np.exp(-s * np.log1p(t / b_post) - shape * np.log1p(t / a_post)))
        p_zero[k] = 1.0 - alive_row * (1.0 - p_zero_alive)
        mean[k] = alive_row * shape / a_post * exposure
        factorial2[k] = alive_row * shape * (shape + 1.0) / a_post ** 2 * exposure2
    return CountMoments(p_zero, mean, factorial2)


@dataclass(frozen=True)
class SpendMoments:
    """Per customer, averaged over the spend parameter vectors: E[Z], E[Z^2], E[Z_1 Z_2]."""

    mean: np.ndarray
    second: np.ndarray
    cross: np.ndarray


def spend_moments(param_rows: np.ndarray, x, m) -> SpendMoments:
    """Gamma-Gamma order-value moments given x repeat orders of mean value m (m ignored where x = 0)."""
    x = np.asarray(x, dtype=float)
    m = np.where(x > 0, np.nan_to_num(np.asarray(m, dtype=float)), 0.0)
    mean = np.zeros(x.shape)
    second = np.zeros(x.shape)
    cross = np.zeros(x.shape)
    for p, q, v in np.asarray(param_rows, dtype=float):
        shape = p * x + q
        rate = v + x * m
        mean += p * rate / (shape - 1.0)
        inv_nu2 = rate ** 2 / ((np.maximum(shape, MIN_SECOND_MOMENT_SHAPE) - 1.0)
                               * (np.maximum(shape, MIN_SECOND_MOMENT_SHAPE) - 2.0))
        second += p * (p + 1.0) * inv_nu2
        cross += p * p * inv_nu2
    k = len(param_rows)
    return SpendMoments(mean / k, second / k, cross / k)


@dataclass(frozen=True)
class ValueDistribution:
    """The 6-month net value's distribution per customer: atom at 0 and moments."""

    p_zero: np.ndarray
    mean: np.ndarray
    second: np.ndarray

    def quantiles(self, levels: Sequence[float] = LEVELS) -> np.ndarray:
        """(customers x levels) quantiles: 0 inside the atom, else the lognormal of ``V | V > 0``."""
        positive = np.clip(1.0 - self.p_zero, 0.0, 1.0)
        out = np.zeros((len(self.mean), len(levels)))
        ok = (positive > 1e-15) & (self.mean > 0)
        if not ok.any():
            return out
        mass = positive[ok]
        m1 = self.mean[ok] / mass
        m2 = self.second[ok] / mass
        sigma2 = np.log(np.maximum(m2 / (m1 * m1), 1.0))       # lognormal: E = m1, E^2 = m2
        mu = np.log(m1) - 0.5 * sigma2
        sigma = np.sqrt(sigma2)
        p0 = 1.0 - mass
        for j, level in enumerate(levels):
            inside = level > p0
            u = np.where(inside, (level - p0) / np.where(mass > 0, mass, 1.0), 0.5)
            value = np.exp(mu + sigma * special.ndtri(np.clip(u, 1e-12, 1 - 1e-12)))
            out[ok, j] = np.where(inside, value, 0.0)
        return out


def value_distribution(counts: CountMoments, spend: SpendMoments, net_factor) -> ValueDistribution:
    """``V = net_factor * sum_{j<=N} Z_j``: atom and first two moments (purchase and spend independent)."""
    factor = np.asarray(net_factor, dtype=float)
    mean = counts.mean * spend.mean * factor
    second = (counts.mean * spend.second + counts.factorial2 * spend.cross) * factor * factor
    return ValueDistribution(p_zero=counts.p_zero, mean=mean, second=second)


def interval_coverage(actual, p10, p50, p90, p_zero) -> dict[str, float]:
    """Coverage of the 80% intervals over customers (see the module docstring).

    ``coverage``: randomised-PIT share (a realised 0 counts as the share of the predicted atom at 0
    that lies within the levels [0.1, 0.9]); ``closed_coverage``: share with P10 <= actual <= P90;
    ``below`` / ``above``: shares under P10 / over P90; ``median_below``: share under P50
    (a calibrated P50 has it near 0.5 counting zeros the same way). NaN for no customers.
    """
    actual, p10, p50, p90, p_zero = (np.asarray(v, dtype=float) for v in (actual, p10, p50, p90, p_zero))
    if actual.size == 0:
        return {k: math.nan for k in ("coverage", "closed_coverage", "below", "above", "customers")}
    covered = pit_covered(actual, p10, p90, p_zero)
    return {"coverage": float(covered.mean()),
            "closed_coverage": float(np.mean((actual >= p10) & (actual <= p90))),
            "below": float(np.mean(actual < p10)), "above": float(np.mean(actual > p90)),
            "customers": float(actual.size)}


def pit_covered(actual, p10, p90, p_zero, lower: float = LEVELS[0], upper: float = LEVELS[-1]) -> np.ndarray:
    """Per customer, the (expected randomised-PIT) indicator of being inside the interval, in [0, 1]."""
    actual, p10, p90, p_zero = (np.asarray(v, dtype=float) for v in (actual, p10, p90, p_zero))
    at_zero = actual <= 0.0
    atom = np.clip(p_zero, 0.0, 1.0)
    zero_share = np.where(atom > 0, np.clip(np.minimum(atom, upper) - lower, 0.0, None) / np.where(atom > 0, atom, 1),
                          (p10 <= 0).astype(float))
    positive = ((actual >= p10) & (actual <= p90)).astype(float)
    return np.where(at_zero, zero_share, positive)


# --------------------------------------------------------------------------------------------
# Group totals (module docstring, "Intervals of group totals")
# --------------------------------------------------------------------------------------------
def spend_means_by_point(param_rows: np.ndarray, x, m) -> np.ndarray:
    """(spend parameter rows x customers): ``E[Z | theta_s]``, the expected order value under each row."""
    x = np.asarray(x, dtype=float)
    m = np.where(x > 0, np.nan_to_num(np.asarray(m, dtype=float)), 0.0)
    rows = np.asarray(param_rows, dtype=float)
    p, q, v = (rows[:, j, None] for j in range(3))
    return p * (v + x * m) / (p * x + q - 1.0)


@dataclass(frozen=True)
class GroupTerms:
    """Per customer, what the interval of a group total needs: ``sd`` of the value (process and
    parameters), ``param_sd`` = sd over the parameters of ``E[V | theta]``, and ``loadings``
    (customers x (k_p - 1) + (k_s - 1)): the first-order part of ``E[V | theta]`` in whitened
    parameter coordinates, the same coordinates for every customer of one fit, so they add up."""

    sd: np.ndarray
    param_sd: np.ndarray
    loadings: np.ndarray

    @property
    def process_var(self) -> np.ndarray:
        """``E_theta Var(V | theta)``: independent between customers given the parameters."""
        return np.maximum(self.sd ** 2 - self.param_sd ** 2, 0.0)

    @property
    def interaction_sd(self) -> np.ndarray:
        """sd of the purchase x spend interaction term of ``E[V | theta]`` (second order, small)."""
        return np.sqrt(np.maximum(self.param_sd ** 2 - np.sum(self.loadings ** 2, axis=1), 0.0))


def group_terms(counts_by_point: CountMoments, spend_means: np.ndarray, distribution: ValueDistribution,
                net_factor) -> GroupTerms:
    """:class:`GroupTerms` from ``E[N | theta_p]`` (:func:`count_moments_by_point`) and ``E[Z | theta_s]``
    (:func:`spend_means_by_point`) at the sigma points, and the customer's mixture distribution."""
    a = np.asarray(counts_by_point.mean, dtype=float)            # (k_p, n)
    b = np.asarray(spend_means, dtype=float)                      # (k_s, n)
    c = np.broadcast_to(np.asarray(net_factor, dtype=float), a.shape[1:])
    alpha, beta = a - a.mean(axis=0), b - b.mean(axis=0)
    # E[V | p, s] = c a_p b_s over the k_p x k_s grid (equal weights) = mean + c b̄ alpha_p + c ā beta_s
    # + c alpha_p beta_s; the three varying terms are orthogonal over the grid. The first two, written in
    # the Helmert basis of each simplex (sum-zero, orthonormal), are exact linear coordinates
    loadings = np.concatenate([
        (_simplex(len(a) - 1).T @ alpha * (c * b.mean(axis=0)) / math.sqrt(len(a))).T,
        (_simplex(len(b) - 1).T @ beta * (c * a.mean(axis=0)) / math.sqrt(len(b))).T], axis=1)
    interaction_var = (c * c) * np.mean(alpha ** 2, axis=0) * np.mean(beta ** 2, axis=0)
    param_var = np.sum(loadings ** 2, axis=1) + interaction_var
    total_var = np.maximum(distribution.second - distribution.mean ** 2, 0.0)
    # the grid's E[V | theta] has its own mean and variance inside the mixture: param_var <= total_var
    # up to rounding; clipped so a sd is never below its parameter part
    return GroupTerms(sd=np.sqrt(np.maximum(total_var, param_var)), param_sd=np.sqrt(param_var), loadings=loadings)


def group_total_variance(process_var_sum, loading_sums, interaction_sd_sum) -> np.ndarray:
    """Variance of a group total from per-group sums of the customers' terms: the process parts add
    (independent given theta), the loadings add *before* squaring (exact for the first-order parameter
    part), the interaction sds add (a conservative bound for a term of second order)."""
    loading_sums = np.atleast_2d(np.asarray(loading_sums, dtype=float))
    return (np.asarray(process_var_sum, dtype=float) + np.sum(loading_sums ** 2, axis=-1)
            + np.asarray(interaction_sd_sum, dtype=float) ** 2)


def total_quantiles(total_mean, total_var, p_zero=0.0,
                    levels: Sequence[float] = (LEVELS[0], LEVELS[-1])) -> np.ndarray:
    """(groups x levels) quantiles of a non-negative total with this mean, variance and probability of
    being 0: as a customer's value (:meth:`ValueDistribution.quantiles`), an atom at 0 and a lognormal
    with the two moments of the positive part (a normal would give negative P10s for small or skewed
    groups; for large groups the atom vanishes and the lognormal is nearly normal). 0 for a total of
    mean 0."""
    mean = np.atleast_1d(np.asarray(total_mean, dtype=float))
    var = np.maximum(np.atleast_1d(np.asarray(total_var, dtype=float)), 0.0)
    atom = np.broadcast_to(np.clip(np.asarray(p_zero, dtype=float), 0.0, 1.0), mean.shape)
    return ValueDistribution(p_zero=atom, mean=mean, second=var + mean * mean).quantiles(levels)


__all__ = ["LEVELS", "SUPPORTED_PURCHASE_MODELS", "log_param_covariance", "sigma_points", "CountMoments",
           "count_moments", "SpendMoments", "spend_moments", "ValueDistribution", "value_distribution",
           "interval_coverage", "pit_covered", "count_moments_by_point", "spend_means_by_point", "GroupTerms",
           "group_terms", "group_total_variance", "total_quantiles"]
