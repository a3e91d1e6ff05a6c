"""Pipeline glue of the channel-aware variants without Spark: pooled statistics from the per-channel ones,
the nightly refit decision and the MLflow parameters (pipelines/ltv.py, pipelines/nightly.py)."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from core.config import ByChannelConf
from pipelines.ltv import channel_run_params, pooled_stats
from core.tracking import ChampionInfo
from pipelines.ltv import refit_by_channel


def test_pooled_stats_are_the_rows_and_counts_of_grouping_without_the_channel():
    rng = np.random.default_rng(3)
    customers = pd.DataFrame({"channel": rng.choice(np.array(["web", "app", None], dtype=object), 5000),
                              "frequency": rng.integers(0, 4, 5000).astype(float),
                              "recency": rng.integers(0, 3, 5000).astype(float), "T": 10.0})
    by_channel = (customers.groupby(["channel", "frequency", "recency", "T"], dropna=False).size()
                  .rename("weight").reset_index().sample(frac=1.0, random_state=1))     # any arrival order
    expected = (customers.groupby(["frequency", "recency", "T"]).size().rename("weight").reset_index()
                .sort_values(["frequency", "recency", "T"]).reset_index(drop=True))
    pooled = pooled_stats(by_channel)
    pd.testing.assert_frame_equal(pooled, expected, check_dtype=False)
    assert int(pooled["weight"].sum()) == 5000                      # the null channel's customers too


def test_nightly_refits_channel_aware_only_after_a_channel_aware_champion():
    now = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)
    on = ByChannelConf(enabled=True)
    aware = ChampionInfo("2", dt.date(2026, 9, 28), now, by_channel=True)
    pooled = ChampionInfo("1", dt.date(2026, 9, 28), now)
    assert refit_by_channel(on, "bgnbd", aware)
    assert not refit_by_channel(on, "bgnbd", pooled)
    assert not refit_by_channel(on, "bgnbd", None)                   # no backtest yet: pooled
    assert not refit_by_channel(ByChannelConf(enabled=False), "bgnbd", aware)    # switched off since
    assert not refit_by_channel(on, "paretonbd", aware)              # no channel-aware Pareto/NBD


def test_channel_run_params_only_for_channel_aware_bundles():
    class Pooled:
        by_channel = None

    assert channel_run_params(Pooled()) == {}


def test_a_refit_keeps_the_champions_purchase_model():
    from pipelines.ltv import refit_purchase_model

    configured = ("bgnbd", "paretonbd", "mbgnbd")
    now = dt.datetime(2026, 9, 30, tzinfo=dt.timezone.utc)
    mbgnbd = ChampionInfo("4", dt.date(2026, 9, 1), now, purchase_model="mbgnbd")
    assert refit_purchase_model(configured, mbgnbd) == "mbgnbd"
    assert refit_purchase_model(configured, None) == "bgnbd"                          # no backtest yet
    assert refit_purchase_model(("bgnbd",), mbgnbd) == "bgnbd"                        # no longer configured
    assert refit_purchase_model(configured, ChampionInfo("1", None, now)) == "bgnbd"  # older runs: no param
