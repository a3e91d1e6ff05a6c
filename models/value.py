"""Predicted customer value over a horizon: purchases x order value x (1 - cancellation rate).

Pure numpy on top of the model interfaces:

* ``expected_purchases`` from a :class:`~models.base.PurchaseModel` over the horizon ``t`` (in
  the purchase model's time unit, e.g. 182.5 days for six months);
* ``expected_order_value`` from a :class:`~models.base.SpendModel` fitted on gross order values
  (before cancellation); for customers with ``frequency == 0`` it is the population mean of the
  spend model, explicitly (their ``monetary`` is ignored, may be 0 or NaN);
* ``gross_value = expected_purchases * expected_order_value``;
* ``net_value = gross_value * (1 - cancellation_rate)``, where ``cancellation_rate`` is the
  predicted cancellation rate by amount, e.g. from
  :meth:`models.cancellation.CancellationRateModel.predict` (a number or one per customer).

No discounting: the horizon is short (six months).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.base import PurchaseModel, SpendModel, as_float_array


@dataclass(frozen=True)
class ValuePrediction:
    """Per-customer arrays, all of the same length."""

    expected_purchases: np.ndarray
    expected_order_value: np.ndarray
    gross_value: np.ndarray
    cancellation_rate: np.ndarray
    net_value: np.ndarray

    def to_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def predict_value(purchase_model: PurchaseModel, spend_model: SpendModel, t, frequency, recency, T, monetary,
                  cancellation_rate=0.0) -> ValuePrediction:
    """Gross and net value over the horizon ``t`` for each customer (see the module docstring)."""
    purchases = purchase_model.expected_purchases(t, frequency, recency, T)
    order_value = spend_model.expected_order_value(frequency, monetary)
    rate = np.broadcast_to(as_float_array("cancellation_rate", cancellation_rate), purchases.shape).astype(float)
    if np.any(rate < 0) or np.any(rate > 1):
        raise ValueError("cancellation_rate must be within [0, 1]")
    gross = purchases * order_value
    return ValuePrediction(expected_purchases=purchases, expected_order_value=order_value, gross_value=gross,
                           cancellation_rate=rate, net_value=gross * (1.0 - rate))


__all__ = ["ValuePrediction", "predict_value"]
