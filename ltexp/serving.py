"""The MLflow pyfunc model, as a models-from-code file (`mlflow.pyfunc.log_model(python_model=<this file>)`).

MLflow executes this file when the model loads; `set_model` registers the instance. The model's
artifact `predictor` is a `FusedPredictor.save` folder (expert weights, class names,
normalisation, fusion rule and its fitted parameters). The ltexp package travels with the model
as a code path, so `mlflow models serve --env-manager local` needs no ltexp install.

Besides the ltexp/tracking package, this is the one module that imports mlflow: MLflow's
model-from-code contract requires it.
"""

from __future__ import annotations

import gc
import os

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


MAX_ERROR_CHARS = 1000  # MLflow echoes the whole request into some errors; a client needs the reason


class InvalidRequest(MlflowException):
    """A 400 whose body is ltexp's reason. MLflow's scoring server rewrites the message of an
    exception raised by `predict` to `Failed to predict data '<the whole input>'. Error: ...`;
    this class keeps its own reason as the message instead."""

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if getattr(self, "_reason", None) is None:
            self._reason = str(value)  # the first assignment (MLflow's __init__) is the reason


def _guard_request_parsing() -> None:
    """Make every malformed JSON request a 400 under `mlflow models serve`.

    Python's JSON parser raises RecursionError on deeply nested input (about 990 levels), which
    MLflow's scoring server answers with a 500; and its parse errors echo the whole request. The
    server looks up `_parse_json_data` in its module at every request, so wrapping it there covers
    every JSON request. Skipped (MLflow's behaviour) if that function is ever renamed.
    """
    from mlflow.pyfunc import scoring_server

    original = getattr(scoring_server, "_parse_json_data", None)
    if original is None or getattr(original, "ltexp_guarded", False):
        return

    def parse(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except RecursionError:
            raise InvalidRequest("invalid input: JSON nested too deeply to parse; send images as a "
                                 "(N, H, W, C) uint8 array or base64 PNG/JPEG strings",
                                 error_code=INVALID_PARAMETER_VALUE) from None
        except MlflowException as exc:
            if len(exc.message) > MAX_ERROR_CHARS:
                exc.message = exc.message[:MAX_ERROR_CHARS] + " ... (truncated)"
            raise

    parse.ltexp_guarded = True
    scoring_server._parse_json_data = parse


SERVER_MODEL_PATH_VARIABLE = "__pyfunc_model_path__"


class FusedExpertsModel(PythonModel):
    """predict(images) -> DataFrame(label, class_name, score[, probabilities])."""

    def load_context(self, context):
        from ltexp.engine import resolve_device
        from ltexp.predictor import FusedPredictor

        device = resolve_device(os.environ.get("LTEXP_SERVE_DEVICE", "cpu"))
        self.predictor = FusedPredictor.load(context.artifacts["predictor"], device=device)
        # `mlflow models serve` starts its workers with the model's path in this variable
        # (`scoring_server._SERVER_MODEL_PATH`). The scoring server's module alone is no sign: a
        # training process imports it too when it logs the model with an input example.
        if os.environ.get(SERVER_MODEL_PATH_VARIABLE):
            # Under `mlflow models serve`: the objects of torch/MLflow/pandas loaded so far never
            # die; freezing them keeps the collector from rescanning them on every request
            # (bench/serve.py measures the server CPU per request).
            gc.collect()
            gc.freeze()
            _guard_request_parsing()

    # The hint declares the usual input (uint8 images, N x H x W x C); a DataFrame of encoded
    # images is accepted too. A numpy hint tells MLflow not to infer a schema from it: the model
    # validates both forms itself (`to_image_batch`), with messages that name the problem.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
        from ltexp.predictor import InvalidInput, to_image_batch

        try:
            images = to_image_batch(model_input, self.predictor.image_shape)
        except InvalidInput as exc:
            # INVALID_PARAMETER_VALUE becomes HTTP 400 in `mlflow models serve`, message intact.
            raise InvalidRequest(f"invalid input: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
        except RecursionError:  # e.g. deeply nested lists that survived JSON parsing
            raise InvalidRequest("invalid input: nested too deeply; send images as a (N, H, W, C) uint8 array",
                                 error_code=INVALID_PARAMETER_VALUE) from None
        return self.predictor.predict(images, probabilities=bool((params or {}).get("probabilities", False)))


set_model(FusedExpertsModel())
