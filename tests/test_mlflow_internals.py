"""Each non-public part of MLflow that ltexp relies on, checked against the installed MLflow, so
an upgrade that moves one fails here with its name and the version (ltexp would otherwise fall
back silently: the registry's own error after training, or a 500 for a malformed request)."""

import importlib

import mlflow
import pytest

VERSION = f"mlflow {mlflow.__version__}"


def _private(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{VERSION} moved {module}.{name} (ltexp uses it): {exc}")


def test_the_registry_name_validators_ltexp_calls_before_training_still_refuse_bad_names():
    from mlflow.exceptions import MlflowException

    validate_name = _private("mlflow.utils.validation", "_validate_model_name")
    validate_alias = _private("mlflow.utils.validation", "_validate_model_alias_name")
    validate_name("ltexp-digits")
    validate_alias("champion")
    with pytest.raises(MlflowException, match="Names cannot contain"):
        validate_name("bad/name")
    with pytest.raises(MlflowException):
        validate_alias("bad alias!")


def test_the_scoring_server_still_parses_json_through_the_function_ltexp_guards():
    from mlflow.pyfunc import scoring_server

    from ltexp import serving

    _private("mlflow.pyfunc.scoring_server", "_parse_json_data")
    assert _private("mlflow.pyfunc.scoring_server", "_SERVER_MODEL_PATH") == serving.SERVER_MODEL_PATH_VARIABLE
    original = scoring_server._parse_json_data
    try:
        serving._guard_request_parsing()
        guarded = scoring_server._parse_json_data
        assert guarded is not original and guarded.ltexp_guarded
        deep = "[" * 5000 + "]" * 5000
        with pytest.raises(mlflow.exceptions.MlflowException, match="nested too deeply") as err:
            guarded('{"inputs": ' + deep + "}", "json", None)
        assert err.value.get_http_status_code() == 400
    finally:
        scoring_server._parse_json_data = original
