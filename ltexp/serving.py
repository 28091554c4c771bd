"""The MLflow pyfunc model, as a models-from-code file (`mlflow.pyfunc.log_model(python_model=<this file>)`).

MLflow executes this file when the model loads; `set_model` registers the instance. The model's
artifact `predictor` is a `FusedPredictor.save` folder (expert weights, class names,
normalisation, fusion rule and its fitted parameters). The ltexp package travels with the model
as a code path, so `mlflow models serve --env-manager local` needs no ltexp install.

Besides tracking.py, this is the one module that imports mlflow: MLflow's model-from-code
contract requires it.
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class FusedExpertsModel(PythonModel):
    """predict(images) -> DataFrame(label, class_name, score[, probabilities])."""

    def load_context(self, context):
        from ltexp.engine import resolve_device
        from ltexp.predictor import FusedPredictor

        device = resolve_device(os.environ.get("LTEXP_SERVE_DEVICE", "cpu"))
        self.predictor = FusedPredictor.load(context.artifacts["predictor"], device=device)
        if "mlflow.pyfunc.scoring_server" in sys.modules:
            # Under `mlflow models serve`: the ~450k objects of torch/MLflow/pandas loaded so far
            # never die; freezing them keeps the collector from rescanning them on every request
            # (measured in bench/serve.py: 152 -> 48 ms server CPU per 256-image JSON request).
            gc.collect()
            gc.freeze()

    # The hint declares the usual input (uint8 images, N x H x W x C); a DataFrame of encoded
    # images is accepted too. A numpy hint tells MLflow not to infer a schema from it: the model
    # validates both forms itself (`to_image_batch`), with messages that name the problem.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
        from ltexp.predictor import InvalidInput, to_image_batch

        try:
            images = to_image_batch(model_input, self.predictor.image_shape)
        except InvalidInput as exc:
            # INVALID_PARAMETER_VALUE becomes HTTP 400 in `mlflow models serve`, message intact.
            raise MlflowException(f"invalid input: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
        return self.predictor.predict(images, probabilities=bool((params or {}).get("probabilities", False)))


set_model(FusedExpertsModel())
