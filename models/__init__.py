"""LTV models on small pandas/numpy inputs: no Spark, no tables, usable in a notebook.

* purchase models (``PurchaseModel``): ``BGNBDModel`` ("bgnbd"), ``ParetoNBDModel`` ("paretonbd"),
  ``MBGNBDModel`` ("mbgnbd"), through lifetimes (BG/NBD and MBG/NBD fitted by default by ``models.fast_bgnbd``,
  an exact numpy likelihood on distinct values: seconds for millions of customers);
* spend model (``SpendModel``): ``GammaGammaModel`` ("gamma_gamma"), through lifetimes;
* ``CancellationRateModel`` ("cancellation"): beta-binomial empirical Bayes;
* ``CohortModel`` ("cohort") and ``assign_cells``: the empirical six-month cohort method;
* ``NaiveRepeatModel`` ("naive"): the next six months repeat the last six;
* ``predict_value``: purchases x order value x (1 - cancellation rate);
* ``models.metrics``: backtest metrics (MAE, RMSE, total error, Spearman, normalised Gini, top-share
  capture, decile table), the reference definitions for the distributed ones.

``make_model(name, **hyperparameters)`` builds any of them by name; ``load_model(path)`` reads
any saved model. Only ``models.btyd`` and ``models.gamma_gamma`` (via ``models._lifetimes_compat``)
import lifetimes.
"""
from models.base import (FORMAT_VERSION, MODEL_REGISTRY, BaseModel, ModelFitError, NotFittedError,
                         PurchaseModel, SpendModel, load_model, make_model)
from models.btyd import BGNBDModel, MBGNBDModel, ParetoNBDModel
from models.cancellation import CancellationRateModel
from models.cohort import CELL_COLUMNS, DEFAULT_BANDS, CohortModel, assign_cells, band_index
from models.gamma_gamma import GammaGammaModel
from models.naive import NaiveRepeatModel
from models.value import ValuePrediction, predict_value

__all__ = [
    "FORMAT_VERSION", "MODEL_REGISTRY", "BaseModel", "ModelFitError", "NotFittedError", "PurchaseModel",
    "SpendModel", "load_model", "make_model", "BGNBDModel", "MBGNBDModel", "ParetoNBDModel",
    "GammaGammaModel", "CancellationRateModel", "CohortModel", "assign_cells", "band_index", "DEFAULT_BANDS",
    "CELL_COLUMNS", "NaiveRepeatModel", "ValuePrediction", "predict_value",
]
