"""Naive baseline: the next six months repeat the last six months.

``predict(trailing_revenue)`` returns the revenue the caller measured over the trailing window
(of the same length as the horizon), times ``scale``, which is always 1: there is nothing to
estimate. The model exists so the backtest can compare every method through one interface
(fit, predict, save/load).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from models.base import BaseModel, as_float_array, register_model


@register_model("naive")
class NaiveRepeatModel(BaseModel):
    """Predicted revenue over the horizon = revenue over the trailing window of the same length."""

    def __init__(self):
        self.params_ = None
        self.fit_info_ = {}

    def fit(self, trailing_revenue=None, future_revenue=None) -> "NaiveRepeatModel":
        """Nothing to estimate; the arguments are accepted (and ignored) for a uniform backtest call."""
        self.params_ = {"scale": 1.0}
        self.fit_info_ = {"note": "naive baseline: no parameters are estimated"}
        return self

    def predict(self, trailing_revenue) -> np.ndarray:
        """``scale * trailing_revenue`` (0 for customers without orders in the trailing window)."""
        self._check_fitted()
        return self.params_["scale"] * as_float_array("trailing_revenue", trailing_revenue)

    def _set_params_from_json(self, params: dict[str, Any]) -> None:
        if set(params) != {"scale"} or float(params["scale"]) != 1.0:
            raise ValueError(f"naive model file: params must be {{'scale': 1.0}}, got {params}")
        self.params_ = {"scale": 1.0}


__all__ = ["NaiveRepeatModel"]
