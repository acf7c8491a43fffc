"""MLflow models-from-code entry point: the pyfunc wrapper around the cxr Predictor.

MLflow loads this file as code (no pickle); the weights come from the ``cxr_model`` artifact.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

from cxr.models.predictor import Predictor


class CxrPyfunc(PythonModel):
    def load_context(self, context):  # noqa: D401 - mlflow hook

        self.predictor = Predictor.from_dir(context.artifacts["cxr_model"])

    def predict(self, context, model_input, params=None):
        import numpy as np

        return self.predictor.predict_proba(np.asarray(model_input, dtype=np.uint8))


mlflow.models.set_model(CxrPyfunc())
