"""Seeded synthetic order export: buy-till-you-die customers with known true parameters.

The export looks like a client's raw order file (text timestamps in Asia/Tokyo local time, amounts
as text, a status column, English column names mapped by ``conf/examples/synthetic.yaml``) so it
goes through ingest like real data, while the parameters that produced it are known and written to
``true_params.json``: the engine's BG/NBD and Gamma-Gamma fits can be checked against the truth.

How rows are made
-----------------
Customers are cut into blocks of ``block_size`` (default 10,000). ``spark.range`` yields one row per
block; ``mapInPandas`` simulates each block with numpy generators seeded by ``(seed, block_id)``, so
the rows of a block do not depend on partitioning or core count, and memory per task is one block.
Rows come out ordered by block, then customer, then time: reading the part files in name order
gives the same sequence whatever the number of partitions. Customer-sized data never reaches the
driver; the counts for the summary are collected with an :class:`~pyspark.sql.Observation` during
the write (one pass).

The process (time unit: days; the window is the ``history_days`` days ending with ``end_date``)

- first order at a uniform time in the window; the customer is alive at the first order;
- purchase rate ``lambda ~ Gamma(shape=r, rate=alpha)`` per day, orders form a Poisson process;
- after each *repeat* purchase the customer drops out with probability ``p ~ Beta(a, b)``
  (BG/NBD, Fader-Hardie-Lee 2005; lifetimes' ``BetaGeoFitter`` uses the same parametrisation);
- order value (gross yen): ``nu ~ Gamma(shape=q, rate=v)`` per customer, each order
  ``~ Gamma(shape=p, rate=nu)`` rounded to whole yen (Gamma-Gamma as in lifetimes'
  ``GammaGammaFitter``: its ``v`` is a rate, so the mean order value is ``p * v / (q - 1)``);
- cancellation marks are drawn independently of the purchase process: every order, cancelled or
  not, is a BG/NBD transaction with a Gamma-Gamma gross amount;
- the time of day is a monotone warp of the fractional day onto ``hour_weights``, so the day of
  each order and the order of a customer's orders are those of the continuous process.

Injected defects are *extra* rows (``dirty_share`` of the clean rows in expectation): removing
them (quarantine, de-duplication keeping the first row of an order id in file order) gives back
exactly the clean process.

Reproducibility: the same ``(n_customers, seed, end_date, params, dirty_share, block_size)`` and
the same numpy version give the same rows (numpy may change its distribution algorithms between
versions; the version is written to ``true_params.json``).
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from core.errors import UserError

GENERATOR_VERSION = 1
DEFAULT_BLOCK_SIZE = 10_000
# Order numbers are block_id * stride + row in block: unique without coordination between blocks.
ORDER_NO_STRIDE = 10_000_000
TIMESTAMP_FORMAT = "yyyy/MM/dd HH:mm:ss"
TIMEZONE = "Asia/Tokyo"
CURRENCY = "JPY"
EXPORT_COLUMNS = ("order_id", "customer_id", "order_datetime", "amount", "status", "cancelled_amount",
                  "channel", "category", "currency")
DEFECT_KINDS = (
    "missing_customer_id",          # customer_id null or empty text
    "unparsable_timestamp",         # order_datetime text that no date format reads
    "future_timestamp",             # order_datetime after end_date
    "negative_amount",              # amount < 0 on a completed order
    "non_numeric_amount",           # amount text that is not a number
    "conflicting_duplicate_order_id",  # same order_id as an earlier row, different amount or status
    "exact_duplicate_row",          # byte-identical copy of an earlier row
)
# Values a back-office export really contains when a field is broken.
BAD_TIMESTAMPS = ("不明", "#VALUE!", "0000/00/00 00:00:00", "2023/02/30 10:15:00", "2023/13/01 09:00:00",
                  "2023/1O/05 12:00:00")
BAD_AMOUNTS = ("#N/A", "不明", "N/A", "-", "1O80", "¥?")

# Japanese e-commerce: quiet at night, lunch peak, evening peak (relative weights per hour 0..23).
_HOUR_WEIGHTS = (2.0, 1.2, 0.7, 0.4, 0.3, 0.4, 0.8, 1.5, 2.5, 3.5, 4.5, 5.0,
                 6.0, 5.5, 5.0, 5.0, 4.5, 4.5, 5.0, 5.5, 6.5, 7.0, 6.5, 4.0)

_BLOCK_SCHEMA = ("cust long, cust_blank int, order_no long, day int, sec int, amount long, "
                 "bad_amount int, bad_ts int, is_cancelled boolean, cancelled_amount long, "
                 "channel int, category int, defect int")


#: How cancelled orders arise. ``independent`` (the default, generator version 1's output): every
#: order is a BG/NBD transaction and some are marked cancelled, so a cancellation is a purchase
#: occasion (gross basis is the true process). The other three keep every BG/NBD order completed
#: and add cancelled orders on top (~6.5% of all orders with the default propensity):
#: ``retry`` a cancelled order one or two days before a completed one (a payment or stock retry);
#: ``stray`` cancelled orders at uniform times between the first order and the window's end, also
#: after the customer has dropped out (noise: net basis is the true process); ``mixed`` half each.
CANCELLATION_PATTERNS = ("independent", "retry", "stray", "mixed")


class GeneratorError(UserError, ValueError):
    """The generator cannot run with these arguments; the message says what to change."""


@dataclass(frozen=True)
class GeneratorParams:
    """True parameters of the synthetic customer base (time unit: days, money: yen).

    Defaults give ~6.9 orders per customer (analytic BG/NBD expectation 6.86 with first orders
    uniform over 5 years), a mean order value of 7,000 yen, ~6.5% of orders cancelled in full and
    ~0.9% partially cancelled.
    """

    history_days: int = 1826        # window length (5 x 365.25 days) ending with end_date
    # BG/NBD: lambda ~ Gamma(shape=r, rate=alpha) per day; dropout p ~ Beta(a, b) after each repeat.
    r: float = 0.8
    alpha: float = 60.0
    a: float = 0.8
    b: float = 6.0
    # Gamma-Gamma: nu ~ Gamma(shape=spend_q, rate=spend_v); order value ~ Gamma(shape=spend_p, rate=nu).
    spend_p: float = 6.0
    spend_q: float = 4.0
    spend_v: float = 3500.0
    # Cancellation: per-customer propensity ~ Beta (mean 0.065); partial share of the other orders.
    cancel_a: float = 0.5
    cancel_b: float = 7.2
    partial_cancel_prob: float = 0.01
    partial_cancel_range: tuple[float, float] = (0.1, 0.9)   # cancelled share of a partial order
    # Acquisition channel of the first order; later orders keep it with probability channel_stickiness.
    channels: tuple[tuple[str, float], ...] = (
        ("web", 0.38), ("app", 0.17), ("LINE", 0.10), ("catalogue_dm", 0.25), ("store", 0.10))
    channel_stickiness: float = 0.85
    # Optional effects of the acquisition channel: (channel, purchase-rate multiplier, order-value
    # multiplier) for some channels. A customer's lambda is multiplied by the first (BG/NBD alpha of that
    # channel: alpha / m) and nu divided by the second (Gamma-Gamma v of that channel: v * m). Empty (the
    # default): every channel alike, and the same rows as without this field for the same seed.
    channel_effects: tuple[tuple[str, float, float], ...] = ()
    # Per-customer preferred category; each order is in it with probability category_stickiness.
    categories: tuple[tuple[str, float], ...] = (
        ("apparel", 0.30), ("cosmetics", 0.20), ("health_food", 0.20), ("home", 0.15), ("food_gift", 0.15))
    category_stickiness: float = 0.6
    hour_weights: tuple[float, ...] = field(default=_HOUR_WEIGHTS)
    # How cancelled orders relate to the purchase process (CANCELLATION_PATTERNS).
    cancellations: str = "independent"

    def __post_init__(self) -> None:
        positive = {k: getattr(self, k) for k in ("r", "alpha", "a", "b", "spend_p", "spend_q", "spend_v",
                                                  "cancel_a", "cancel_b")}
        for name, value in positive.items():
            if not value > 0:
                raise GeneratorError(f"GeneratorParams.{name} must be > 0 (got {value})")
        if self.history_days < 1:
            raise GeneratorError(f"GeneratorParams.history_days must be >= 1 (got {self.history_days})")
        for name in ("partial_cancel_prob", "channel_stickiness", "category_stickiness"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise GeneratorError(f"GeneratorParams.{name} must be in [0, 1] (got {value})")
        low, high = self.partial_cancel_range
        if not 0.0 < low <= high < 1.0:
            raise GeneratorError(f"GeneratorParams.partial_cancel_range must satisfy 0 < low <= high < 1 "
                                 f"(got {self.partial_cancel_range})")
        for name in ("channels", "categories"):
            shares = [s for _, s in getattr(self, name)]
            if not shares or any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-9:
                raise GeneratorError(f"GeneratorParams.{name}: shares must be >= 0 and sum to 1 (got {shares})")
        known_channels = {name for name, _ in self.channels}
        for effect in self.channel_effects:
            if len(effect) != 3 or effect[0] not in known_channels or not (effect[1] > 0 and effect[2] > 0):
                raise GeneratorError(f"GeneratorParams.channel_effects: each entry is (channel of `channels`, "
                                     f"rate multiplier > 0, value multiplier > 0) (got {effect!r})")
        if self.cancellations not in CANCELLATION_PATTERNS:
            raise GeneratorError(f"GeneratorParams.cancellations must be one of {list(CANCELLATION_PATTERNS)} "
                                 f"(got {self.cancellations!r})")
        if len(self.hour_weights) != 24 or any(not w > 0 for w in self.hour_weights):
            raise GeneratorError("GeneratorParams.hour_weights must be 24 positive weights (hours 0..23)")

    @property
    def mean_order_value(self) -> float:
        """Population mean gross order value in yen (infinite when spend_q <= 1)."""
        return self.spend_p * self.spend_v / (self.spend_q - 1) if self.spend_q > 1 else math.inf

    def channel_multipliers(self) -> tuple[np.ndarray, np.ndarray]:
        """(purchase-rate, order-value) multipliers by channel index (order of ``channels``); 1: no effect."""
        names = [name for name, _ in self.channels]
        rate, value = np.ones(len(names)), np.ones(len(names))
        for channel, rate_multiplier, value_multiplier in self.channel_effects:
            rate[names.index(channel)] = rate_multiplier
            value[names.index(channel)] = value_multiplier
        return rate, value

    @property
    def mean_cancel_propensity(self) -> float:
        return self.cancel_a / (self.cancel_a + self.cancel_b)

    def to_truth(self) -> dict:
        """The parameters as written to true_params.json, with their conventions and units."""
        truth = {
            "bg_nbd": {
                "r": self.r, "alpha": self.alpha, "a": self.a, "b": self.b, "time_unit": "days",
                "lambda": "Gamma(shape=r, rate=alpha), purchases per day",
                "dropout": "p ~ Beta(a, b); after each repeat purchase the customer drops out with "
                           "probability p (alive at the first purchase)",
                "applies_to": ("every clean order, cancelled ones included" if self.cancellations == "independent"
                               else "every completed clean order (the added cancelled orders are not "
                               "BG/NBD transactions)") + "; continuous time, the "
                              "export shows the local day and a warped time of day",
                "lifetimes": "BetaGeoFitter params_ r, alpha, a, b (fit with freq='D')",
            },
            "gamma_gamma": {
                "p": self.spend_p, "q": self.spend_q, "v": self.spend_v, "currency": CURRENCY,
                "nu": "Gamma(shape=q, rate=v) per customer",
                "order_value": "Gamma(shape=p, rate=nu), gross yen rounded to whole yen (min 1)",
                "mean_order_value": self.mean_order_value,
                "applies_to": ("gross amount of every clean order, cancelled ones included"
                               if self.cancellations == "independent" else
                               "gross amount of every completed clean order and of stray cancelled orders "
                               "(a retry repeats its completed order's amount)"),
                "lifetimes": "GammaGammaFitter params_ p, q, v",
            },
            "cancellation": {
                "pattern": self.cancellations,
                "propensity": (f"Beta({self.cancel_a}, {self.cancel_b}) per customer; each order is "
                               "cancelled in full (status cancelled, cancelled_amount = amount) with it"
                               if self.cancellations == "independent" else
                               f"Beta({self.cancel_a}, {self.cancel_b}) per customer c; every BG/NBD order "
                               "is completed and c/(1-c) cancelled orders per completed order are added "
                               "(retry: one or two days before a completed order, same amount; stray: at "
                               "uniform times from the first order to the window's end, also after dropout, "
                               "Gamma-Gamma amount; mixed: half each)"),
                "mean_propensity": self.mean_cancel_propensity,
                "partial_cancel_prob": self.partial_cancel_prob,
                "partial": "status completed, 0 < cancelled_amount < amount, share of the amount "
                           f"uniform in {list(self.partial_cancel_range)}; only orders not cancelled in full",
            },
            "channels": dict(self.channels),
            "channel_stickiness": self.channel_stickiness,
            "categories": dict(self.categories),
            "category_stickiness": self.category_stickiness,
            "hour_weights": list(self.hour_weights),
        }
        if self.channel_effects:          # only then, so files of generations without effects stay as they were
            truth["channel_effects"] = {
                channel: {"purchase_rate_multiplier": rate, "order_value_multiplier": value,
                          "bg_nbd_alpha": self.alpha / rate, "gamma_gamma_v": self.spend_v * value}
                for channel, rate, value in self.channel_effects}
        return truth


# --------------------------------------------------------------------------------------------
# One block, numpy only (no Spark): testable and identical on any executor.
# --------------------------------------------------------------------------------------------

def _hour_warp(frac: np.ndarray, hour_weights: tuple[float, ...]) -> np.ndarray:
    """Map fractions of a day (uniform) to seconds of day following hour_weights; monotone."""
    weights = np.asarray(hour_weights, dtype=float)
    edges = np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    hour = np.clip(np.searchsorted(edges, frac, side="right") - 1, 0, 23)
    within = (frac - edges[hour]) / (edges[hour + 1] - edges[hour])
    sec = hour * 3600 + np.floor(np.clip(within, 0.0, 1.0) * 3600).astype(np.int64)
    return np.minimum(sec, 86_399)


def simulate_block(block_id: int, n_customers: int, seed: int, params: GeneratorParams,
                   dirty_share: float, block_size: int = DEFAULT_BLOCK_SIZE) -> pd.DataFrame:
    """Rows of one block (customers ``block_id * block_size`` ..), in the internal integer layout.

    Long on purpose: one vectorised simulation whose steps (customers, orders, cancellations,
    defects) share a dozen per-customer arrays and three random streams whose draw order fixes the
    output for a seed; split, every part would take and return most of them."""
    first = block_id * block_size
    n = min(block_size, n_customers - first)
    # Separate streams so that, e.g., changing dirty_share leaves the clean rows unchanged.
    cust_rng, order_rng, defect_rng = (np.random.default_rng(s)
                                       for s in np.random.SeedSequence([seed, block_id]).spawn(3))
    window = float(params.history_days)

    # Customer level.
    t0 = cust_rng.uniform(0.0, window, n)
    lam = cust_rng.gamma(params.r, 1.0 / params.alpha, n)
    # A Beta draw can underflow to 0 for tiny a; geometric() needs p > 0 (p ~ 1e-12: never drops).
    p_drop = np.clip(cust_rng.beta(params.a, params.b, n), 1e-12, 1.0)
    nu = cust_rng.gamma(params.spend_q, 1.0 / params.spend_v, n)
    cancel_prop = cust_rng.beta(params.cancel_a, params.cancel_b, n)
    ch_names, ch_shares = zip(*params.channels)
    cat_names, cat_shares = zip(*params.categories)
    acq_channel = cust_rng.choice(len(ch_names), n, p=np.asarray(ch_shares))
    pref_category = cust_rng.choice(len(cat_names), n, p=np.asarray(cat_shares))
    if params.channel_effects:            # only then: the default draws and arithmetic stay exactly as they were
        rate_multiplier, value_multiplier = params.channel_multipliers()
        lam = lam * rate_multiplier[acq_channel]
        nu = nu / value_multiplier[acq_channel]
    horizon = window - t0
    n_events = cust_rng.poisson(lam * horizon)            # purchases of a never-dying customer
    n_until_drop = cust_rng.geometric(p_drop)             # repeat purchase after which it drops
    repeats = np.minimum(n_events, n_until_drop)

    # Repeat times: the first m of n uniform order statistics on (0, horizon), from exponential
    # spacings (S_k / S_{n+1}) with the unused n+1-m spacings summed as one Gamma draw.
    total_rep = int(repeats.sum())
    spacing = order_rng.standard_exponential(total_rep)
    rest = order_rng.standard_gamma((n_events - repeats + 1).astype(float))
    csum = np.cumsum(spacing)
    ends = np.cumsum(repeats)
    starts = ends - repeats
    before = np.where(starts > 0, csum[np.maximum(starts - 1, 0)] if total_rep else 0.0, 0.0)
    s_k = csum - np.repeat(before, repeats)
    s_m = np.where(repeats > 0, csum[np.maximum(ends - 1, 0)] - before if total_rep else 0.0, 0.0)
    rep_time = s_k * np.repeat(horizon / (s_m + rest), repeats)

    # Orders: first order (relative time 0) then the repeats, customer-major, time ascending.
    n_orders_c = repeats + 1
    n_orders = int(n_orders_c.sum())
    cust = np.repeat(np.arange(n), n_orders_c)
    order_start = np.cumsum(n_orders_c) - n_orders_c
    is_first = np.zeros(n_orders, dtype=bool)
    is_first[order_start] = True
    rel = np.zeros(n_orders)
    rel[~is_first] = rep_time                              # both customer-major, time ascending
    t_abs = t0[cust] + rel
    day = np.minimum(np.floor(t_abs), window - 1).astype(np.int64)
    sec = _hour_warp(t_abs - np.floor(t_abs), params.hour_weights)

    amount = np.maximum(np.rint(order_rng.gamma(params.spend_p, 1.0 / nu[cust])), 1).astype(np.int64)
    is_cancelled = order_rng.random(n_orders) < cancel_prop[cust]
    partial_draw = order_rng.random(n_orders)
    partial_share = order_rng.uniform(*params.partial_cancel_range, n_orders)
    is_partial = ~is_cancelled & (partial_draw < params.partial_cancel_prob) & (amount >= 2)
    cancelled_amount = np.where(is_cancelled, amount, 0)
    partial_amount = np.clip(np.rint(amount * partial_share), 1, amount - 1).astype(np.int64)
    cancelled_amount = np.where(is_partial, partial_amount, cancelled_amount)
    keep_channel = order_rng.random(n_orders) < params.channel_stickiness
    other_channel = order_rng.choice(len(ch_names), n_orders, p=np.asarray(ch_shares))
    channel = np.where(is_first | keep_channel, acq_channel[cust], other_channel)
    keep_category = order_rng.random(n_orders) < params.category_stickiness
    other_category = order_rng.choice(len(cat_names), n_orders, p=np.asarray(cat_shares))
    category = np.where(keep_category, pref_category[cust], other_category)

    if params.cancellations != "independent":
        # The draws above stay (same streams as the default); only the marks are replaced.
        is_cancelled = np.zeros(n_orders, dtype=bool)
        cancelled_amount = np.where(is_partial, partial_amount, 0)
    rows = {
        "cust": (first + cust).astype(np.int64),
        "cust_blank": np.zeros(n_orders, dtype=np.int32),
        "order_no": block_id * ORDER_NO_STRIDE + np.arange(n_orders, dtype=np.int64),
        "day": day.astype(np.int32),
        "sec": sec.astype(np.int32),
        "amount": amount,
        "bad_amount": np.zeros(n_orders, dtype=np.int32),   # 1-based index into BAD_AMOUNTS
        "bad_ts": np.zeros(n_orders, dtype=np.int32),       # 1-based index into BAD_TIMESTAMPS
        "is_cancelled": is_cancelled,
        "cancelled_amount": cancelled_amount.astype(np.int64),
        "channel": channel.astype(np.int32),
        "category": category.astype(np.int32),
        "defect": np.zeros(n_orders, dtype=np.int32),
    }
    if params.cancellations != "independent":
        pattern_rng = np.random.SeedSequence([seed, block_id]).spawn(4)[3]
        rows = _with_added_cancellations(rows, np.random.default_rng(pattern_rng), params, t0,
                                         cancel_prop, nu, acq_channel, pref_category, first, window, block_id)
    extra = _defect_rows(rows, defect_rng, dirty_share, block_id, window)
    if extra is not None:
        rows = {k: np.concatenate([v, extra[k]]) for k, v in rows.items()}
        # Defect rows sit among their customer's rows; an original precedes its copies.
        order = np.lexsort((rows["defect"], rows["order_no"], rows["sec"], rows["day"], rows["cust"]))
        rows = {k: v[order] for k, v in rows.items()}
    return pd.DataFrame(rows)


def _with_added_cancellations(rows: dict[str, np.ndarray], rng: np.random.Generator, params: GeneratorParams,
                              t0: np.ndarray, cancel_prop: np.ndarray, nu: np.ndarray, acq_channel: np.ndarray,
                              pref_category: np.ndarray, first: int, window: float,
                              block_id: int) -> dict[str, np.ndarray]:
    """The completed BG/NBD orders plus cancelled orders added by ``params.cancellations``.

    A customer with propensity c gets c / (1 - mean c) cancelled orders per completed order in
    expectation, so the mean propensity (6.5%) is the expected share of cancelled orders overall
    (at most one retry per completed order).
    """
    local = rows["cust"] - first
    n_orders = len(local)
    per_completed = cancel_prop / (1.0 - params.mean_cancel_propensity)
    retry_share, stray_share = {"retry": (1.0, 0.0), "stray": (0.0, 1.0), "mixed": (0.5, 0.5)}[params.cancellations]

    # Retry: a cancelled copy of a completed order one or two days earlier (dropped before the window).
    has_retry = rng.random(n_orders) < np.minimum(retry_share * per_completed[local], 1.0)
    retry_day = rows["day"][has_retry] - rng.integers(1, 3, int(has_retry.sum()))
    retry_sec = _hour_warp(rng.random(len(retry_day)), params.hour_weights)
    inside = retry_day >= 0
    retry = {"cust": rows["cust"][has_retry][inside], "day": retry_day[inside], "sec": retry_sec[inside],
             "amount": rows["amount"][has_retry][inside], "channel": rows["channel"][has_retry][inside],
             "category": rows["category"][has_retry][inside]}

    # Stray: uniform times between the first order and the window's end, dropout or not.
    completed_per_customer = np.bincount(local, minlength=len(t0))
    n_stray = rng.poisson(stray_share * per_completed * completed_per_customer)
    stray_cust = np.repeat(np.arange(len(t0)), n_stray)
    t_stray = t0[stray_cust] + rng.random(len(stray_cust)) * (window - t0[stray_cust])
    stray = {"cust": (first + stray_cust).astype(np.int64),
             "day": np.minimum(np.floor(t_stray), window - 1).astype(np.int64),
             "sec": _hour_warp(t_stray - np.floor(t_stray), params.hour_weights),
             "amount": np.maximum(np.rint(rng.gamma(params.spend_p, 1.0 / nu[stray_cust])), 1).astype(np.int64),
             "channel": acq_channel[stray_cust], "category": pref_category[stray_cust]}

    added = {k: np.concatenate([retry[k], stray[k]]) for k in retry}
    n_added = len(added["cust"])
    zeros = np.zeros(n_added, dtype=np.int32)
    added_rows = {
        "cust": added["cust"].astype(np.int64), "cust_blank": zeros,
        "order_no": block_id * ORDER_NO_STRIDE + n_orders + np.arange(n_added, dtype=np.int64),
        "day": added["day"].astype(np.int32), "sec": added["sec"].astype(np.int32),
        "amount": added["amount"].astype(np.int64), "bad_amount": zeros, "bad_ts": zeros,
        "is_cancelled": np.ones(n_added, dtype=bool), "cancelled_amount": added["amount"].astype(np.int64),
        "channel": added["channel"].astype(np.int32), "category": added["category"].astype(np.int32),
        "defect": zeros,
    }
    rows = {k: np.concatenate([v, added_rows[k]]) for k, v in rows.items()}
    order = np.lexsort((rows["order_no"], rows["sec"], rows["day"], rows["cust"]))   # customer, then time
    return {k: v[order] for k, v in rows.items()}


def _defect_rows(rows: dict[str, np.ndarray], rng: np.random.Generator, dirty_share: float, block_id: int,
                 window: float) -> dict[str, np.ndarray] | None:
    """Extra defective rows, each a modified copy of a random clean row of the block."""
    n_clean = len(rows["cust"])
    n_defects = int(rng.binomial(n_clean, dirty_share)) if dirty_share > 0 else 0
    if n_clean + n_defects >= ORDER_NO_STRIDE:
        raise GeneratorError(f"block {block_id} has {n_clean + n_defects:,} rows, too many for the order id "
                             f"layout ({ORDER_NO_STRIDE:,} per block); use a smaller block_size")
    if n_defects == 0:
        return None
    # Kinds in rotation from a random start: every kind gets n/7 (+1) rows, even in small blocks.
    kinds = (rng.integers(len(DEFECT_KINDS)) + np.arange(n_defects)) % len(DEFECT_KINDS) + 1
    source = rng.integers(n_clean, size=n_defects)
    choice = rng.integers(1 << 30, size=n_defects)        # one draw per row for its variant
    extra = {k: v[source].copy() for k, v in rows.items()}
    extra["defect"] = kinds.astype(np.int32)
    code = {name: i + 1 for i, name in enumerate(DEFECT_KINDS)}

    # Kinds 1-5 are new orders (fresh order numbers); the duplicates keep their source's order_id.
    is_new = kinds < code["conflicting_duplicate_order_id"]
    extra["order_no"][is_new] = block_id * ORDER_NO_STRIDE + n_clean + np.flatnonzero(is_new)
    m = kinds == code["missing_customer_id"]
    extra["cust_blank"][m] = 1 + choice[m] % 2           # 1: null, 2: empty text
    m = kinds == code["unparsable_timestamp"]
    extra["bad_ts"][m] = 1 + choice[m] % len(BAD_TIMESTAMPS)
    m = kinds == code["future_timestamp"]
    extra["day"][m] = int(window) + choice[m] % 90      # 1..90 days after end_date
    m = kinds == code["negative_amount"]
    extra["amount"][m] = -extra["amount"][m]
    extra["is_cancelled"][m] = False
    extra["cancelled_amount"][m] = 0
    m = kinds == code["non_numeric_amount"]
    extra["bad_amount"][m] = 1 + choice[m] % len(BAD_AMOUNTS)
    m = kinds == code["conflicting_duplicate_order_id"]
    # Half re-priced (+100..3,000 yen), half with the status flipped: an order exported twice.
    was_cancelled = extra["is_cancelled"].copy()
    reprice = m & (choice % 2 == 0)
    flip = m & (choice % 2 == 1)
    extra["amount"][reprice] += 100 + choice[reprice] % 2901
    extra["cancelled_amount"][reprice & was_cancelled] = extra["amount"][reprice & was_cancelled]
    extra["is_cancelled"][flip] = ~was_cancelled[flip]
    extra["cancelled_amount"][flip] = np.where(was_cancelled[flip], 0, extra["amount"][flip])
    # exact_duplicate_row: the copy as is.
    return extra


# --------------------------------------------------------------------------------------------
# Spark
# --------------------------------------------------------------------------------------------

def _check_args(n_customers: int, seed: int, end_date: dt.date, dirty_share: float, block_size: int) -> None:
    if not isinstance(n_customers, int) or n_customers < 1:
        raise GeneratorError(f"n_customers must be a positive integer (got {n_customers!r})")
    if not isinstance(seed, int) or seed < 0:
        raise GeneratorError(f"seed must be a non-negative integer (got {seed!r})")
    if not isinstance(end_date, dt.date) or isinstance(end_date, dt.datetime):
        raise GeneratorError(f"end_date must be a datetime.date (got {end_date!r})")
    if not 0.0 <= dirty_share <= 0.5:
        raise GeneratorError(f"dirty_share must be in [0, 0.5] (got {dirty_share})")
    if not isinstance(block_size, int) or not 1 <= block_size <= 200_000:
        raise GeneratorError(f"block_size must be an integer in 1..200000 (got {block_size!r})")


def _pick(names: tuple[str, ...], index: Column) -> Column:
    """Name for a 0-based index (a literal array lookup: no join, no UDF)."""
    return F.element_at(F.array(*[F.lit(n) for n in names]), index + 1)


def _two_digits(value: Column) -> Column:
    return F.lpad(value.cast("string"), 2, "0")


def _export_columns(n_customers: int, n_blocks: int, start_date: dt.date, params: GeneratorParams) -> list[Column]:
    cust_width = max(8, len(str(n_customers)))
    order_width = max(12, len(str(n_blocks * ORDER_NO_STRIDE)))
    customer_id = (F.when(F.col("cust_blank") == 1, F.lit(None).cast("string"))
                   .when(F.col("cust_blank") == 2, F.lit(""))
                   .otherwise(F.concat(F.lit("C"), F.lpad((F.col("cust") + 1).cast("string"), cust_width, "0"))))
    # Local wall-clock text built from the local day and second of day: independent of the
    # session time zone (a DateType formats to the same calendar day in any zone).
    local_day = F.date_format(F.date_add(F.lit(start_date), F.col("day")), "yyyy/MM/dd")
    local_time = F.concat_ws(":", _two_digits((F.col("sec") / 3600).cast("int")),
                             _two_digits(((F.col("sec") % 3600) / 60).cast("int")),
                             _two_digits(F.col("sec") % 60))
    return [
        F.concat(F.lit("O"), F.lpad((F.col("order_no") + 1).cast("string"), order_width, "0")).alias("order_id"),
        customer_id.alias("customer_id"),
        F.when(F.col("bad_ts") > 0, _pick(BAD_TIMESTAMPS, F.col("bad_ts") - 1))
        .otherwise(F.concat_ws(" ", local_day, local_time)).alias("order_datetime"),
        F.when(F.col("bad_amount") > 0, _pick(BAD_AMOUNTS, F.col("bad_amount") - 1))
        .otherwise(F.col("amount").cast("string")).alias("amount"),
        F.when(F.col("is_cancelled"), F.lit("cancelled")).otherwise(F.lit("completed")).alias("status"),
        F.col("cancelled_amount"),
        _pick(tuple(n for n, _ in params.channels), F.col("channel")).alias("channel"),
        _pick(tuple(n for n, _ in params.categories), F.col("category")).alias("category"),
        F.lit(CURRENCY).alias("currency"),
    ]


def _default_partitions(n_blocks: int) -> int:
    # ~10 blocks (~700k rows) per output file, but at least a few tasks to use the cores.
    return max(1, min(n_blocks, max(8, math.ceil(n_blocks / 10))))


def _internal_orders(spark: SparkSession, n_customers: int, seed: int, end_date: dt.date,
                     params: GeneratorParams, dirty_share: float, block_size: int,
                     num_partitions: int | None) -> DataFrame:
    """Export columns plus the internal ``defect`` code (0 = clean row)."""
    _check_args(n_customers, seed, end_date, dirty_share, block_size)
    n_blocks = math.ceil(n_customers / block_size)
    start_date = end_date - dt.timedelta(days=params.history_days - 1)

    def blocks(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for block_id in batch["id"].tolist():
                yield simulate_block(int(block_id), n_customers, seed, params, dirty_share, block_size)

    blocks_df = spark.range(0, n_blocks, 1, num_partitions or _default_partitions(n_blocks))
    rows_df = blocks_df.mapInPandas(blocks, schema=_BLOCK_SCHEMA)
    return rows_df.select(*_export_columns(n_customers, n_blocks, start_date, params), F.col("defect"))


def generate_orders(spark: SparkSession, n_customers: int, seed: int, end_date: dt.date,
                    params: GeneratorParams = GeneratorParams(), dirty_share: float = 0.001, *,
                    block_size: int = DEFAULT_BLOCK_SIZE, num_partitions: int | None = None,
                    include_defect_kind: bool = False) -> DataFrame:
    """The raw export rows, as a client would deliver them (lazy; nothing is computed here).

    Columns: order_id, customer_id, order_datetime (text ``yyyy/MM/dd HH:mm:ss``, Asia/Tokyo),
    amount (text: gross integer yen, text so that non-numeric defects exist in parquet too),
    status (completed | cancelled), cancelled_amount (long), channel, category, currency (JPY).
    ``include_defect_kind`` adds ``injected_defect`` (null on clean rows) for tests of ingest.
    ``num_partitions`` changes only the number of part files, never the rows or their order.
    """
    internal_df = _internal_orders(spark, n_customers, seed, end_date, params, dirty_share, block_size,
                                   num_partitions)
    if not include_defect_kind:
        return internal_df.drop("defect")
    kind = F.when(F.col("defect") > 0, _pick(DEFECT_KINDS, F.col("defect") - 1))
    return internal_df.withColumn("injected_defect", kind).drop("defect")


def write_export(orders_df: DataFrame, out_dir: str, fmt: str = "csv") -> str:
    """Write the export as part files under ``out_dir/orders/`` (replacing it); returns that path."""
    if fmt not in ("csv", "parquet"):
        raise GeneratorError(f"fmt must be 'csv' or 'parquet' (got {fmt!r})")
    path = os.path.join(str(out_dir), "orders")
    writer = orders_df.write.mode("overwrite")
    if fmt == "csv":
        writer.option("header", True).option("encoding", "UTF-8").csv(path)
    else:
        writer.parquet(path)
    return path


def _metrics() -> list[Column]:
    clean = F.col("defect") == 0
    metrics = [
        F.count(F.lit(1)).alias("n_rows"),
        F.sum(clean.cast("long")).alias("n_clean_orders"),
        F.sum((clean & (F.col("status") == "cancelled")).cast("long")).alias("n_cancelled"),
        F.sum((clean & (F.col("status") == "completed") & (F.col("cancelled_amount") > 0)).cast("long"))
        .alias("n_partially_cancelled"),
        F.sum(F.when(clean, F.col("amount").try_cast("long")).otherwise(F.lit(0))).alias("gross_amount"),
    ]
    metrics += [F.sum((F.col("defect") == i + 1).cast("long")).alias(kind) for i, kind in enumerate(DEFECT_KINDS)]
    return metrics


def generate(spark: SparkSession, n_customers: int, seed: int, end_date: dt.date, out_dir: str,
             fmt: str = "csv", params: GeneratorParams = GeneratorParams(), dirty_share: float = 0.001, *,
             block_size: int = DEFAULT_BLOCK_SIZE, num_partitions: int | None = None) -> dict:
    """Write ``out_dir/orders/`` and ``out_dir/true_params.json``; return a summary.

    Counts are gathered while writing (one pass over the data). ``out_dir`` must be a local
    folder: true_params.json is written with plain file I/O.
    """
    if fmt not in ("csv", "parquet"):
        raise GeneratorError(f"fmt must be 'csv' or 'parquet' (got {fmt!r})")
    if "://" in str(out_dir) and not str(out_dir).startswith("file://"):
        raise GeneratorError(f"out_dir must be a local folder (got {out_dir!r})")
    out_dir = str(out_dir).removeprefix("file://")
    internal_df = _internal_orders(spark, n_customers, seed, end_date, params, dirty_share, block_size,
                                   num_partitions)
    observation = Observation("synthetic_export")
    export_df = internal_df.observe(observation, *_metrics()).drop("defect")
    orders_path = write_export(export_df, out_dir, fmt)
    counts = {k: int(v or 0) for k, v in observation.get.items()}

    defects = {kind: counts[kind] for kind in DEFECT_KINDS}
    start_date = end_date - dt.timedelta(days=params.history_days - 1)
    observed = {
        "n_rows": counts["n_rows"],
        "n_clean_orders": counts["n_clean_orders"],
        "orders_per_customer": counts["n_clean_orders"] / n_customers,
        "n_cancelled": counts["n_cancelled"],
        "n_partially_cancelled": counts["n_partially_cancelled"],
        "gross_amount": counts["gross_amount"],
    }
    truth = {
        "generator": "datagen.generate",
        "generator_version": GENERATOR_VERSION,
        "numpy_version": np.__version__,
        "seed": seed,
        "n_customers": n_customers,
        "end_date": end_date.isoformat(),
        "start_date": start_date.isoformat(),
        "history_days": params.history_days,
        "timezone": TIMEZONE,
        "block_size": block_size,
        "dirty_share": dirty_share,
        "export": {
            "format": fmt, "path": orders_path, "columns": list(EXPORT_COLUMNS),
            "timestamp_format": TIMESTAMP_FORMAT, "timestamp_timezone": TIMEZONE,
            "customer_id": "C + zero-padded (customer index + 1)",
            "amount": "gross integer yen as text", "currency": CURRENCY,
        },
        **params.to_truth(),
        "observed": observed,
        "injected_defects": defects,
        "defect_notes": "defects are extra rows, each a modified copy of a clean row; the clean process "
                        "is what remains after quarantining them and keeping the first row of each "
                        "order_id in file order. An ingest that quarantines every row of a conflicting "
                        "order_id accepts n_clean_orders - conflicting_duplicate_order_id orders.",
    }
    true_params_path = os.path.join(out_dir, "true_params.json")
    with open(true_params_path, "w", encoding="utf-8") as fh:
        json.dump(truth, fh, indent=2, ensure_ascii=False)
    return {
        "out_dir": out_dir, "orders_path": orders_path, "true_params_path": true_params_path,
        "format": fmt, "seed": seed, "end_date": end_date.isoformat(), "n_customers": n_customers,
        "n_rows": counts["n_rows"], "n_clean_orders": counts["n_clean_orders"],
        "injected_defects": defects, "params": _summary_params(params),
    }


def _summary_params(params: GeneratorParams) -> dict:
    """``asdict(params)`` without ``channel_effects`` when there are none (the summary as it was before)."""
    out = asdict(params)
    if not params.channel_effects:
        del out["channel_effects"]
    return out


# --------------------------------------------------------------------------------------------
# Several sources (an EC shop and store POS): `cvseg generate --sources ec,store --overlap 0.2`
# --------------------------------------------------------------------------------------------
def source_customer_id(name: str, index: int, customer: Column) -> Column:
    """Source ``index``'s own id of generated customer ``customer`` (0-based): each source numbers
    its customers in its own scheme (prefix, multiplier), so the ids never agree across sources."""
    prefix = re.sub(r"[^A-Z0-9]", "", name.upper())[:3] or f"S{index}"
    return F.concat(F.lit(f"{prefix}-"), F.lpad(((customer + 1) * (2 * index + 3)).cast("string"), 10, "0"))


def _written_keys(index: int, customer: Column) -> tuple[Column, Column]:
    """(email, phone) of a customer as source ``index`` writes them: the first source lower-case and
    a national phone with hyphens, the others upper-case, full-width digits and +81: the same
    person once normalised (NFKC, case, digits with the country code)."""
    number = F.lpad((customer + 1).cast("string"), 8, "0")
    email = F.concat(F.lit("customer"), (customer + 1).cast("string"), F.lit("@example.jp"))
    if index == 0:
        return email, F.concat(F.lit("090-"), F.substring(number, 1, 4), F.lit("-"), F.substring(number, 5, 4))
    full_width = F.translate(number, "0123456789", "０１２３４５６７８９")
    return F.upper(email), F.concat(F.lit("+81 ９０ "), full_width)


def generate_sources(spark: SparkSession, n_customers: int, seed: int, end_date: dt.date, out_dir: str,
                     sources: Sequence[str] = ("ec", "store"), overlap: float = 0.2, fmt: str = "csv",
                     params: GeneratorParams = GeneratorParams(), dirty_share: float = 0.0, *,
                     block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """The generated customers split over several sources: ``out_dir/<source>/orders/`` per source.

    A share ``overlap`` of the customers has an account in every source and orders spread over
    them (by a hash of the order id); every other customer buys in one source only. Each source
    has its own customer ids (:func:`source_customer_id`) and writes e-mail and phone its own
    way (:func:`_written_keys`); the first source keeps a channel column, the others have none
    (their channel is the source's, e.g. ``sources[].channel: store``). Also written:
    ``identity_map/`` (the overlapping customers' ids in every source -> the generator's customer
    id: a file for ``identity.map``), ``identity_truth/`` (every source id -> the generator's id,
    for tests) and ``sources.yaml`` (a conf for ``cvseg ingest``).
    """
    names = list(sources)
    if len(names) < 2 or len(set(names)) != len(names) or not all(re.fullmatch(r"[a-z][a-z0-9_]{0,31}", n) for n in names):
        raise GeneratorError(f"--sources needs two or more distinct names such as ec,store (got {names})")
    if not 0.0 <= overlap <= 1.0:
        raise GeneratorError(f"--overlap is a share of customers in [0, 1] (got {overlap})")
    out_dir = str(out_dir).removeprefix("file://")
    internal_df = _internal_orders(spark, n_customers, seed, end_date, params, dirty_share, block_size, None)
    customer = F.regexp_extract(F.col("customer_id"), r"^C0*(\d+)$", 1).try_cast("bigint") - 1
    spread = F.pmod(F.xxhash64(F.lit(seed), F.lit("overlap"), customer), F.lit(1_000_000))
    is_shared = spread < F.lit(int(round(overlap * 1_000_000)))
    home = F.pmod(F.xxhash64(F.lit(seed), F.lit("home"), customer), F.lit(len(names)))
    by_order = F.pmod(F.xxhash64(F.lit(seed), F.col("order_id")), F.lit(len(names)))
    placed_df = (internal_df.drop("defect")
                 .withColumn("_customer", customer)
                 .withColumn("_shared", F.coalesce(is_shared, F.lit(False)))
                 .withColumn("_source", F.when(F.col("_shared"), by_order).otherwise(F.coalesce(home, F.lit(0))))
                 .cache())
    try:
        paths = {}
        for index, name in enumerate(names):
            email, phone = _written_keys(index, F.col("_customer"))
            own_id = F.when(F.col("_customer").isNotNull(), source_customer_id(name, index, F.col("_customer"))) \
                .otherwise(F.col("customer_id"))   # a defect row's blank id stays blank
            columns = [c if c != "customer_id" else own_id.alias("customer_id") for c in EXPORT_COLUMNS
                       if index == 0 or c != "channel"]
            part_df = (placed_df.where(F.col("_source") == index)
                       .select(*[F.col(c) if isinstance(c, str) else c for c in columns],
                               email.alias("email"), phone.alias("phone")))
            paths[name] = write_export(part_df, os.path.join(out_dir, name), fmt)
        customers_df = placed_df.where(F.col("_customer").isNotNull()).select("_customer", "_shared").distinct()
        truth_df = customers_df.select(
            "_shared", F.explode(F.array(*[F.struct(F.lit(n).alias("source_name"),
                                                    source_customer_id(n, i, F.col("_customer")).alias("source_customer_id"))
                                           for i, n in enumerate(names)])).alias("_s"),
            F.concat(F.lit("C"), F.lpad((F.col("_customer") + 1).cast("string"), max(8, len(str(n_customers))), "0"))
            .alias("customer_id")).select("_s.source_name", "_s.source_customer_id", "customer_id", "_shared")
        truth_df = truth_df.cache()
        truth_df.drop("_shared").coalesce(1).write.mode("overwrite").option("header", True).csv(
            os.path.join(out_dir, "identity_truth"))
        (truth_df.where(F.col("_shared")).drop("_shared").coalesce(1).write.mode("overwrite")
         .option("header", True).csv(os.path.join(out_dir, "identity_map")))
        counts = placed_df.groupBy("_source").agg(F.count(F.lit(1)).alias("rows"),
                                                  F.count_distinct("_customer").alias("customers")).collect()
        shared = customers_df.where(F.col("_shared")).count()
        truth_df.unpersist()
    finally:
        placed_df.unpersist()
    conf_path = os.path.join(out_dir, "sources.yaml")
    with open(conf_path, "w", encoding="utf-8") as fh:
        fh.write(_sources_conf(out_dir, names, paths, fmt))
    per_source = {names[int(r["_source"])]: {"rows": int(r["rows"]), "customers": int(r["customers"])} for r in counts}
    return {"out_dir": out_dir, "sources": names, "paths": paths, "overlap": overlap,
            "shared_customers": shared, "per_source": per_source, "conf_path": conf_path,
            "identity_map_path": os.path.join(out_dir, "identity_map"),
            "identity_truth_path": os.path.join(out_dir, "identity_truth")}


def _sources_conf(out_dir: str, names: list[str], paths: dict[str, str], fmt: str) -> str:
    """A conf layering conf/examples/synthetic.yaml's mapping over each generated source."""
    lines = ["# written by `cvseg generate --sources`: cvseg ingest --conf <this file> (complete on its own)",
             "client: synthetic_sources", "source:", f"  format: {fmt}",
             "  columns: {order_id: order_id, customer_id: customer_id, order_ts: order_datetime, gross_amount: amount,",
             "            status: status, cancelled_amount: cancelled_amount, category: category, currency: currency,",
             "            email: email, phone: phone}",
             '  timestamp_format: "yyyy/MM/dd HH:mm:ss"', "  source_timezone: Asia/Tokyo",
             "  cancellation: {style: status, cancelled_values: [cancelled], live_values: [completed]}", "  allowed_currencies: [JPY]",
             "sources:"]
    for index, name in enumerate(names):
        channel = "columns: {channel: channel}" if index == 0 else f"channel: {name}"
        lines.append(f"  - {{name: {name}, path: {paths[name]}, {channel}}}")
    lines += ["identity:", "  match_on: [email, phone]",
              f"  # map: {os.path.join(out_dir, 'identity_map')}   # or the overlapping customers' ids, as a CRM keeps them",
              ""]
    return "\n".join(lines)
