"""A real `mlflow models serve` process on loopback, serving a registered model by alias."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from conftest import bomb_png

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Train a small split model on digits, register it @candidate, serve it on a loopback port."""
    tmp = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    train = subprocess.run([sys.executable, "-m", "ltexp", "train", "--method", "split", "--epochs", "3",
                            "--lws-epochs", "1", "--no-progress", "--register-as", "ltexp-digits"],
                           cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "registered ltexp-digits version 1 as @candidate" in train.stdout
    port = _free_port()
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/ltexp-digits@candidate",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/ping", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if server.poll() is not None:
            raise AssertionError(f"server exited: {server.stderr.read()[-3000:]}")
        time.sleep(0.5)
    else:
        server.kill()
        raise AssertionError("server did not answer /ping within 120 s")
    yield {"url": url, "env": env, "tmp": tmp}
    server.terminate()
    server.wait(timeout=30)


def _post(url, payload):
    return requests.post(f"{url}/invocations", data=json.dumps(payload),
                         headers={"Content-Type": "application/json"}, timeout=30)


def _in_process(served, images):
    import mlflow

    mlflow.set_tracking_uri(served["env"]["MLFLOW_TRACKING_URI"])
    return mlflow.pyfunc.load_model("models:/ltexp-digits@candidate").predict(images)


def test_served_predictions_equal_in_process(served):
    from ltexp.data.sources import load_digits_source

    images = load_digits_source().test_images[:32]
    response = _post(served["url"], {"inputs": images.tolist()})
    assert response.status_code == 200, response.text
    served_frame = pd.DataFrame(response.json()["predictions"])
    expected = _in_process(served, images)
    assert served_frame["label"].tolist() == expected["label"].tolist()
    assert served_frame["class_name"].tolist() == expected["class_name"].tolist()
    assert np.allclose(served_frame["score"], expected["score"], atol=1e-6)


def test_served_png_bytes_as_base64(served):
    from ltexp.data.sources import load_digits_source

    images = load_digits_source().test_images[:4]
    encoded = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img.squeeze(-1)).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    response = _post(served["url"], {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] == _in_process(served, images)["label"].tolist()
    probs = _post(served["url"], {"inputs": images.tolist(), "params": {"probabilities": True}}).json()["predictions"]
    assert len(probs[0]["probabilities"]) == 10


@pytest.mark.parametrize("payload,fragment", [
    ({"inputs": np.zeros((2, 8, 8), int).tolist()}, "rank 4"),
    ({"inputs": np.zeros((2, 8, 8, 3), int).tolist()}, "channel count must match"),
    ({"inputs": np.full((1, 8, 8, 1), 0.5).tolist()}, "dtype float64"),
    ({"inputs": [[[[float("nan")]] * 8] * 8]}, "contain NaN"),
    ({"dataframe_split": {"columns": ["image"], "data": [["aGVsbG8="]]}}, "cannot decode as an image"),
    ({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(bomb_png()).decode()]]}},
     "image 0 has 400000000 pixels, more than the limit 89478485 (PIL's Image.MAX_IMAGE_PIXELS)"),
    ({"inputs": np.zeros((0, 8, 8, 1), int).tolist()}, "empty batch"),
    ({"inputs": np.zeros((4097, 8, 8, 1), int).tolist()}, "over the limit of 4096"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(served, payload, fragment):
    response = _post(served["url"], payload)  # json.dumps writes NaN as the literal MLflow parses
    assert response.status_code == 400, response.text[:500]
    message = response.json()["message"]
    # ltexp's reason leads, not MLflow's "Failed to predict data '<the whole input>'" echo.
    assert message.startswith("invalid input: ") and fragment in message and len(message) < 1000
    ok = _post(served["url"], {"inputs": np.zeros((1, 8, 8, 1), int).tolist()})
    assert ok.status_code == 200


@pytest.mark.parametrize("depth", [64, 500, 989, 990, 5000, 100_000])
def test_deeply_nested_json_gets_400(served, depth):
    # Raw text: json.dumps itself cannot write such nesting. Python's parser gives up near 990 levels.
    body = '{"inputs": ' + "[" * depth + "]" * depth + "}"
    response = requests.post(f"{served['url']}/invocations", data=body, headers={"Content-Type": "application/json"},
                             timeout=30)
    assert response.status_code == 400, (depth, response.status_code, response.text[:300])
    message = response.json()["message"]
    assert len(message) <= 1100, message[:200]
    if depth >= 990:
        assert message.startswith("invalid input: JSON nested too deeply")
    ok = _post(served["url"], {"inputs": np.zeros((1, 8, 8, 1), int).tolist()})
    assert ok.status_code == 200


@pytest.mark.parametrize("body", [
    "", "not json", "[1, 2]", '{"inputs": null}', '{"inputs": "text"}', '{"inputs": [[["a"]]]}',
    '{"inputs": {"a": 1}}', '{"dataframe_records": [{"x": 1}]}', '{"instances": {}}', '{"inputs": [1e999]}',
    '{"inputs": ' + "[" * 200 + "1" + "]" * 200 + "}",
])
def test_malformed_requests_get_400(served, body):
    response = requests.post(f"{served['url']}/invocations", data=body, headers={"Content-Type": "application/json"},
                             timeout=30)
    assert response.status_code == 400, (body[:50], response.status_code, response.text[:300])
    assert len(response.json()["message"]) <= 1100


def test_the_model_knows_a_serving_worker_by_mlflows_own_variable():
    # load_context freezes the heap and guards request parsing only in `mlflow models serve`'s
    # workers, which MLflow starts with the model path in this variable; a process that merely
    # logged or loaded the model (its scoring-server module imported) must stay as it was.
    from mlflow.pyfunc import scoring_server

    from ltexp import serving

    assert serving.SERVER_MODEL_PATH_VARIABLE == scoring_server._SERVER_MODEL_PATH
