"""Helpers shared by the model tests (independent of the code under test)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def unique_rows(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Distinct rows of ``columns`` with the number of customers in ``n`` (what Spark sends)."""
    return df.groupby(columns).size().rename("n").reset_index()


def simulate_bgnbd(n: int, r: float, alpha: float, a: float, b: float, T, seed: int) -> pd.DataFrame:
    """BG/NBD customers simulated in numpy (independent of lifetimes' generator).

    lambda ~ Gamma(r, rate alpha), p ~ Beta(a, b); after each repeat purchase the customer drops
    out with probability p, so the number of repeat purchases before dropout is K ~ Geometric(p)
    on {1, 2, ...}; purchases arrive as a Poisson process, N(T) ~ Poisson(lambda T) are the
    purchases that would occur in (0, T] if alive; observed x = min(K, N). Given N = m arrival
    times are uniform order statistics on (0, T), so the x-th one is T * Beta(x, m - x + 1).
    """
    rng = np.random.default_rng(seed)
    T = np.broadcast_to(np.asarray(T, dtype=float), (n,)).copy()
    lam = rng.gamma(r, 1.0 / alpha, n)
    p = rng.beta(a, b, n)
    k = rng.geometric(p)
    m = rng.poisson(lam * T)
    x = np.minimum(k, m)
    recency = np.where(x > 0, T * rng.beta(np.maximum(x, 1), np.maximum(m - x + 1, 1)), 0.0)
    return pd.DataFrame({"frequency": x.astype(float), "recency": recency, "T": T})


def simulate_bgnbd_gamma_gamma(n: int, purchase: dict, spend: dict, T, horizon: float, seed: int,
                               modified: bool = False) -> pd.DataFrame:
    """Customers of a BG/NBD (``modified``: MBG/NBD) + Gamma-Gamma world, with a holdout.

    Simulated forward in time, purchase by purchase (independent of the code under test):
    lambda ~ Gamma(r, rate alpha), p ~ Beta(a, b), nu ~ Gamma(q, rate v); the first purchase at
    age 0; gaps Exp(lambda); after each repeat purchase (MBG/NBD: also after the first) the
    customer drops out with probability p; every repeat order's value ~ Gamma(p_spend, rate nu).
    Returns the calibration statistics at age T (frequency, recency, T, monetary = mean value of
    the repeat orders, 0 without) and what happened in (T, T + horizon]: ``holdout_purchases``,
    ``holdout_value`` (sum of the order values).
    """
    rng = np.random.default_rng(seed)
    T = np.broadcast_to(np.asarray(T, dtype=float), (n,)).copy()
    lam = rng.gamma(purchase["r"], 1.0 / purchase["alpha"], n)
    drop = rng.beta(purchase["a"], purchase["b"], n)
    nu = rng.gamma(spend["q"], 1.0 / spend["v"], n)
    alive = rng.random(n) >= drop if modified else np.ones(n, dtype=bool)
    time = np.zeros(n)
    x = np.zeros(n)
    recency = np.zeros(n)
    cal_spend = np.zeros(n)
    hold_n = np.zeros(n)
    hold_value = np.zeros(n)
    end = T + horizon
    while alive.any():
        idx = np.flatnonzero(alive)
        time[idx] += rng.exponential(1.0 / lam[idx])
        gone = time[idx] > end[idx]
        alive[idx[gone]] = False
        idx = idx[~gone]
        value = rng.gamma(spend["p"], 1.0 / nu[idx])
        in_cal = time[idx] <= T[idx]
        cal, hold = idx[in_cal], idx[~in_cal]
        x[cal] += 1
        recency[cal] = time[cal]
        cal_spend[cal] += value[in_cal]
        hold_n[hold] += 1
        hold_value[hold] += value[~in_cal]
        alive[idx[rng.random(idx.size) < drop[idx]]] = False
    monetary = np.where(x > 0, cal_spend / np.maximum(x, 1), 0.0)
    return pd.DataFrame({"frequency": x, "recency": recency, "T": T, "monetary": monetary,
                         "holdout_purchases": hold_n, "holdout_value": hold_value})


def simulate_paretonbd_gamma_gamma(n: int, purchase: dict, spend: dict, T, horizon: float, seed: int
                                   ) -> pd.DataFrame:
    """Customers of a Pareto/NBD + Gamma-Gamma world, with a holdout (independent of the code under test).

    lambda ~ Gamma(r, rate alpha), mu ~ Gamma(s, rate beta), nu ~ Gamma(q, rate v); the first purchase
    at age 0, then a Poisson(lambda) process of repeat purchases for a lifetime tau ~ Exp(mu); each
    repeat order's value ~ Gamma(p_spend, rate nu). Calibration statistics at age T: x ~ Poisson(lambda
    min(tau, T)), recency = the last of x uniform times on (0, min(tau, T)), monetary = mean repeat
    value; holdout: Poisson(lambda * exposure in (T, T + horizon]) orders and their summed value.
    """
    rng = np.random.default_rng(seed)
    T = np.broadcast_to(np.asarray(T, dtype=float), (n,)).copy()
    lam = rng.gamma(purchase["r"], 1.0 / purchase["alpha"], n)
    mu = rng.gamma(purchase["s"], 1.0 / purchase["beta"], n)
    nu = rng.gamma(spend["q"], 1.0 / spend["v"], n)
    tau = rng.exponential(1.0 / mu)
    observed = np.minimum(tau, T)
    x = rng.poisson(lam * observed).astype(float)
    recency = np.where(x > 0, observed * rng.random(n) ** (1.0 / np.maximum(x, 1.0)), 0.0)
    cal_spend = np.where(x > 0, rng.gamma(np.maximum(spend["p"] * x, 1e-9), 1.0 / nu), 0.0)
    hold_n = rng.poisson(lam * np.clip(tau - T, 0.0, horizon)).astype(float)
    hold_value = np.where(hold_n > 0, rng.gamma(np.maximum(spend["p"] * hold_n, 1e-9), 1.0 / nu), 0.0)
    return pd.DataFrame({"frequency": x, "recency": recency, "T": T,
                         "monetary": np.where(x > 0, cal_spend / np.maximum(x, 1.0), 0.0),
                         "holdout_purchases": hold_n, "holdout_value": hold_value})
