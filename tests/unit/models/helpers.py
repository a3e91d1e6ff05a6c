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
