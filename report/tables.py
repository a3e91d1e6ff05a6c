"""What every report module reads tables through: whether a table is there, the "run this first"
note when it is not, and the guarded trip of a small grouped result to pandas."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import DataFrame

from core.storage import Storage
from core.tables import TABLES, producing_command


@dataclass(frozen=True)
class Missing:
    """A section's table is not in the warehouse yet."""

    tables: tuple[str, ...]
    command: str


def table_available(storage: Storage, name: str) -> bool:
    return name in TABLES and storage.exists(name)


def missing(as_of: dt.date, *tables: str) -> Missing:
    """Which tables a section lacks and the commands that write them (``TableSpec.produced_by``)."""
    commands = dict.fromkeys(producing_command(t, as_of) for t in tables)
    return Missing(tables=tables, command=" ; ".join(commands))


def require(storage: Storage, as_of: dt.date, *tables: str) -> Missing | None:
    absent = tuple(t for t in tables if not table_available(storage, t))
    return missing(as_of, *absent) if absent else None


def to_pandas(df: DataFrame, limit: int = 5000) -> pd.DataFrame:
    """A grouped result to pandas; the limit guards against a mistaken customer-level frame."""
    return df.limit(limit).toPandas()


#: customer_scores columns the segment totals' intervals add up (pipelines/value_totals.py), with their types
GROUP_TOTAL_COLUMNS = {"p_zero_value": "double", "predicted_net_value_sd": "double",
                       "predicted_net_value_param_sd": "double", "predicted_net_value_param_loadings": "array<double>"}
