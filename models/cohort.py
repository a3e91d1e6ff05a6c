"""The empirical six-month cohort method, as a model on small aggregated inputs.

The classic mail-order estimate of a customer's 6-month value: take the customers who were
in the same state (cell) six months before the cutoff and measure what they actually spent
in the six months since; the cell mean is the expected 6-month revenue of anyone in that
cell today.

* :func:`assign_cells` puts customers in cells: a band for frequency, recency and tenure
  (edges in :data:`DEFAULT_BANDS`, a plain dict of lists so the Spark side can build the same
  bands with column expressions), optionally with the acquisition channel.
* :class:`CohortModel` ``fit(cells_df)`` takes one row per cell as it was six months before the
  cutoff: the key columns, ``n_customers``, ``revenue_sum`` (actual net revenue of those
  customers in the following six months) and optionally ``revenue_sq_sum`` (sum of squared
  per-customer revenue, for the spread). ``predict(cells_df)`` returns the expected 6-month
  revenue per row and the level it came from.

**Back-off.** A cell with fewer than ``min_cell_size`` customers is too noisy; its rows get the
mean of the coarser cell obtained by dropping key columns from the end of ``backoff_order``
(default: the key columns in the order given), one at a time, down to the population mean
(level ``len(key_columns)``), which is always used as the last resort. Cells never seen in
the fit back off the same way.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from models.base import BaseModel, register_model

#: Band edges, ``edges[i] <= value < edges[i+1]`` is band ``i``, the last band is open-ended.
#: * ``frequency``: repeat purchases at the as-of date (orders after the first; BTYD frequency),
#: * ``recency_days``: days from the customer's last order to the as-of date (RFM recency;
#:   ``T - recency`` in BTYD terms, NOT the BTYD recency),
#: * ``tenure_days``: days from the first order to the as-of date (BTYD ``T`` in days).
DEFAULT_BANDS: dict[str, list[float]] = {
    "frequency": [0, 1, 2, 3, 5, 10, 20],
    "recency_days": [0, 30, 60, 90, 180, 365, 730],
    "tenure_days": [0, 90, 180, 365, 730, 1095, 1825],
}

#: Output column of :func:`assign_cells` for each key of the bands dict.
BAND_COLUMNS: dict[str, str] = {"frequency": "frequency_band", "recency_days": "recency_band",
                                "tenure_days": "tenure_band"}

#: The default cell key columns (add ``"channel"`` when cells are split by acquisition channel).
CELL_COLUMNS: tuple[str, ...] = ("frequency_band", "recency_band", "tenure_band")


def band_index(values, edges: Sequence[float], name: str = "value") -> np.ndarray:
    """Band number of each value: the largest ``i`` with ``edges[i] <= value`` (int64).

    Spark equivalent: ``F.when(c >= edges[-1], n-1).when(c >= edges[-2], n-2) ... .otherwise(0)``
    after checking ``c >= edges[0]``.
    """
    edges = np.asarray(edges, dtype=float)
    if edges.ndim != 1 or len(edges) == 0 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"band edges for {name} must be a non-empty, strictly increasing list, got {edges.tolist()}")
    values = np.atleast_1d(np.asarray(values, dtype=float))
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} has missing or infinite values")
    if np.any(values < edges[0]):
        raise ValueError(f"{name} has values below the first band edge {edges[0]:g}")
    return np.searchsorted(edges, values, side="right").astype(np.int64) - 1


def assign_cells(frequency, recency_days, tenure_days, channel=None,
                 bands: Mapping[str, Sequence[float]] | None = None) -> pd.DataFrame:
    """Cell keys for each customer: ``frequency_band``, ``recency_band``, ``tenure_band`` (ints).

    ``frequency`` = repeat purchases, ``recency_days`` = days since the last order,
    ``tenure_days`` = days since the first order (see :data:`DEFAULT_BANDS`); ``channel``
    (optional) is copied as a ``channel`` column. ``bands`` defaults to :data:`DEFAULT_BANDS`.
    """
    bands = DEFAULT_BANDS if bands is None else bands
    missing = [key for key in BAND_COLUMNS if key not in bands]
    if missing:
        raise ValueError(f"bands lacks edges for {missing}; expected keys {list(BAND_COLUMNS)}")
    inputs = {"frequency": frequency, "recency_days": recency_days, "tenure_days": tenure_days}
    columns = {BAND_COLUMNS[key]: band_index(values, bands[key], key) for key, values in inputs.items()}
    lengths = {len(v) for v in columns.values()}
    if channel is not None:
        channel = np.atleast_1d(np.asarray(channel, dtype=object))
        lengths.add(len(channel))
        columns["channel"] = channel
    if len(lengths) > 1:
        raise ValueError("frequency, recency_days, tenure_days (and channel) differ in length")
    return pd.DataFrame(columns)


@register_model("cohort")
class CohortModel(BaseModel):
    """Empirical 6-month revenue per cell with back-off for sparse cells."""

    def __init__(self, key_columns: Sequence[str] = CELL_COLUMNS, min_cell_size: int = 30,
                 backoff_order: Sequence[str] | None = None):
        key_columns = tuple(key_columns)
        if len(set(key_columns)) != len(key_columns):
            raise ValueError(f"key_columns has duplicates: {list(key_columns)}")
        reserved = {"n_customers", "revenue_sum", "revenue_sq_sum"} & set(key_columns)
        if reserved:
            raise ValueError(f"key_columns cannot be value columns: {sorted(reserved)}")
        backoff_order = key_columns if backoff_order is None else tuple(backoff_order)
        if sorted(backoff_order) != sorted(key_columns):
            raise ValueError(f"backoff_order {list(backoff_order)} must list exactly the key columns "
                             f"{list(key_columns)} (the last one is dropped first)")
        if int(min_cell_size) < 1:
            raise ValueError("min_cell_size must be >= 1")
        self.key_columns = key_columns
        self.min_cell_size = int(min_cell_size)
        self.backoff_order = backoff_order
        self.params_ = None
        self.fit_info_ = {}
        self._cells = None

    @property
    def levels(self) -> list[tuple[str, ...]]:
        """Key columns used at each level: level 0 = all, ..., level len(keys) = () (population)."""
        order = self.backoff_order
        return [tuple(order[:len(order) - drop]) for drop in range(len(order) + 1)]

    def fit(self, cells_df: pd.DataFrame) -> "CohortModel":
        """Store the cells (one row per cell, as of six months before the cutoff)."""
        cells = self._validate_cells(cells_df)
        self._cells = cells
        total = cells["n_customers"].sum()
        self.params_ = {"cells": cells, "population_mean": float(cells["revenue_sum"].sum() / total)}
        small = cells["n_customers"] < self.min_cell_size
        self.fit_info_ = {"n_cells": int(len(cells)), "n_customers": float(total),
                          "n_sparse_cells": int(small.sum()),
                          "customers_in_sparse_cells": float(cells.loc[small, "n_customers"].sum()),
                          "has_revenue_sq_sum": "revenue_sq_sum" in cells.columns,
                          "population_below_min_cell_size": bool(total < self.min_cell_size)}
        return self

    def _validate_cells(self, cells_df: pd.DataFrame) -> pd.DataFrame:
        if not isinstance(cells_df, pd.DataFrame):
            raise ValueError("cells_df must be a pandas DataFrame")
        required = [*self.key_columns, "n_customers", "revenue_sum"]
        missing = [c for c in required if c not in cells_df.columns]
        if missing:
            raise ValueError(f"cells_df lacks columns {missing}; it needs the key columns "
                             f"{list(self.key_columns)}, n_customers, revenue_sum (and optionally revenue_sq_sum)")
        value_columns = ["n_customers", "revenue_sum"] + (["revenue_sq_sum"] if "revenue_sq_sum" in cells_df else [])
        cells = cells_df[[*self.key_columns, *value_columns]].copy()
        for column in value_columns:
            values = pd.to_numeric(cells[column], errors="coerce").astype(float)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{column} has missing, non-numeric or infinite values")
            cells[column] = values
        if (cells["n_customers"] < 0).any() or (cells["n_customers"] != cells["n_customers"].round()).any():
            raise ValueError("n_customers must be a whole number >= 0")
        if "revenue_sq_sum" in cells and (cells["revenue_sq_sum"] < 0).any():
            raise ValueError("revenue_sq_sum must be >= 0")
        if (cells["n_customers"] == 0).any() and (cells.loc[cells["n_customers"] == 0, "revenue_sum"] != 0).any():
            raise ValueError("a cell with n_customers = 0 has non-zero revenue_sum")
        null_keys = cells[list(self.key_columns)].isna().any(axis=1)
        if null_keys.any():
            raise ValueError(f"{int(null_keys.sum())} cells have a missing key; fill it with an explicit value "
                             "(e.g. channel 'unknown') so those customers form their own cell")
        duplicated = cells.duplicated(subset=list(self.key_columns), keep=False)
        if duplicated.any():
            raise ValueError(f"cells_df must have one row per cell: {int(duplicated.sum())} rows share their "
                             f"keys {list(self.key_columns)}")
        if cells["n_customers"].sum() <= 0:
            raise ValueError("cells_df has no customers (n_customers sums to 0)")
        return cells.reset_index(drop=True)

    def predict(self, cells_df: pd.DataFrame) -> pd.DataFrame:
        """Expected 6-month revenue per row of ``cells_df`` (which needs the key columns).

        Returns a DataFrame on the same index with ``expected_revenue``, ``level`` (0 = the full
        cell, ``len(key_columns)`` = population), ``level_keys`` (comma-separated key columns
        used, ``""`` for the population), ``cell_n_customers`` and, when the fit had
        ``revenue_sq_sum``, ``revenue_sd`` (spread of per-customer revenue in that cell).
        """
        self._check_fitted()
        missing = [c for c in self.key_columns if c not in cells_df.columns]
        if missing:
            raise ValueError(f"cells_df lacks key columns {missing}")
        has_sq = "revenue_sq_sum" in self._cells.columns
        rows = cells_df[list(self.key_columns)].reset_index(drop=True)
        if rows.isna().any(axis=None):
            raise ValueError("cells_df has missing key values; fill them as in the fit (e.g. channel 'unknown')")
        result = pd.DataFrame({"expected_revenue": np.nan, "level": -1, "level_keys": "",
                               "cell_n_customers": np.nan}, index=rows.index)
        if has_sq:
            result["revenue_sd"] = np.nan
        pending = np.ones(len(rows), dtype=bool)
        for level, keys in enumerate(self.levels):
            if not pending.any():
                break
            table = self._level_table(keys)
            if keys:
                table = table[table["n_customers"] >= self.min_cell_size]
                matched = rows.loc[pending, list(keys)].reset_index().merge(table, on=list(keys), how="inner")
                positions = matched["index"].to_numpy()
            else:   # the population: always used for whatever is left
                positions = np.flatnonzero(pending)
                matched = table.loc[np.zeros(len(positions), dtype=int)].reset_index(drop=True)
            if len(positions) == 0:
                continue
            n = matched["n_customers"].to_numpy()
            mean = matched["revenue_sum"].to_numpy() / n
            result.loc[positions, "expected_revenue"] = mean
            result.loc[positions, "level"] = level
            result.loc[positions, "level_keys"] = ",".join(keys)
            result.loc[positions, "cell_n_customers"] = n
            if has_sq:
                variance = np.maximum(matched["revenue_sq_sum"].to_numpy() / n - mean ** 2, 0.0)
                result.loc[positions, "revenue_sd"] = np.sqrt(variance)
            pending[positions] = False
        result.index = cells_df.index
        return result

    def _level_table(self, keys: tuple[str, ...]) -> pd.DataFrame:
        value_columns = [c for c in ("n_customers", "revenue_sum", "revenue_sq_sum") if c in self._cells.columns]
        if not keys:
            return self._cells[value_columns].sum().to_frame().T
        return self._cells.groupby(list(keys), dropna=False, as_index=False)[value_columns].sum()

    # ---- persistence: the cells table is the fitted state
    def _params_to_json(self) -> dict[str, Any]:
        return {"cells": self._cells.to_dict(orient="records"), "population_mean": self.params_["population_mean"]}

    def _set_params_from_json(self, params: dict[str, Any]) -> None:
        if not isinstance(params.get("cells"), list):
            raise ValueError("cohort model file: params.cells must be a list of cell records")
        cells = pd.DataFrame.from_records(params["cells"])
        self.fit(cells)


__all__ = ["CohortModel", "assign_cells", "band_index", "DEFAULT_BANDS", "BAND_COLUMNS", "CELL_COLUMNS"]
