"""The MLflow pyfunc of a registered model version, logged as "model from code".

MLflow copies this file into the model's artifacts and runs it on ``mlflow.pyfunc.load_model``;
``set_model`` names the model object. Logging the class from a file instead of a pickled object
means nothing is deserialised with cloudpickle when a model is loaded (MLflow warns about that
on every log). The bundle itself is the artifact ``bundle`` (JSON + parameters, see
:mod:`models.bundle`); the ``cvseg`` package must be installed where the model is served.
"""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd


class BundlePyfunc(mlflow.pyfunc.PythonModel):
    """Scores customers with the :class:`models.bundle.ScoringBundle` saved as artifact ``bundle``."""

    def load_context(self, context):
        from models.hybrid import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])     # a ScoringBundle or a HybridBundle

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.bundle.predict(model_input)


mlflow.models.set_model(BundlePyfunc())
