"""MLflow models-from-code entry point: the pyfunc wrapper around the cxr Predictor.

MLflow loads this file as code (no pickle); the weights come from the ``cxr_model`` artifact.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from cxr.models.predictor import Predictor


class CxrPyfunc(PythonModel):
    def load_context(self, context):  # noqa: D401 - mlflow hook

        self.predictor = Predictor.from_dir(context.artifacts["cxr_model"])

    # an ndarray hint tells mlflow not to infer a schema from hints (the logged signature has it): no warning
    def predict(self, context, model_input: np.ndarray, params=None):
        return self.predictor.predict_proba(np.asarray(model_input, dtype=np.uint8))


mlflow.models.set_model(CxrPyfunc())
