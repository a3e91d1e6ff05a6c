"""Fixtures for the model tests: the CDNOW sample from lifetimes' package folder."""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture(scope="session")
def cdnow() -> pd.DataFrame:
    """CDNOW sample (2357 customers) summarised in weeks as in Fader, Hardie & Lee (2005).

    Built from the raw transactions ``CDNOW_sample.txt`` with lifetimes' own summariser:
    calibration period ends 1997-09-30, days / 7, monetary value = mean value of the repeat
    purchases (same-day orders summed).
    """
    import lifetimes

    # the file in lifetimes' package folder (its load_dataset needs pkg_resources, gone from setuptools)
    sample = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_sample.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lifetimes.utils import summary_data_from_transaction_data

        transactions = pd.read_csv(sample, header=None, sep=r"\s+",
                                   names=["customer_id", "customer_index", "date", "quantity", "amount"])
        transactions["date"] = pd.to_datetime(transactions["date"].astype(str), format="%Y%m%d")
        summary = summary_data_from_transaction_data(transactions, "customer_index", "date",
                                                     monetary_value_col="amount", observation_period_end="1997-09-30",
                                                     freq="D", freq_multiplier=7)
    assert len(summary) == 2357
    return summary.sort_index()
