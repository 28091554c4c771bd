"""The shipped model: FusedPredictor persistence, input validation, pyfunc round trip."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import bomb_png
from ltexp.fusion import ExpertLayout
from ltexp.models import build_model
from ltexp.predictor import MAX_BATCH_IMAGES, FusedPredictor, InvalidInput, to_image_batch

SHAPE = (8, 8, 1)


def _predictor(fusion="softmax", other=False):
    torch.manual_seed(0)
    experts = [build_model("smallcnn", SHAPE, 5 + int(other), [80.0], [60.0]).eval() for _ in range(2)]
    layout = ExpertLayout(((0, 2, 4, 6, 8), (1, 3, 5, 7, 9)), (other, other), 10)
    return FusedPredictor(experts, layout, fusion, tuple(f"digit{i}" for i in range(10)), SHAPE)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)


def test_save_load_round_trip_predicts_the_same(tmp_path):
    predictor = _predictor("calibrated")
    predictor.fusion_params = {"temperature": [2.0, 0.5], "bias": [0.0, 1.5]}
    before = predictor.predict(IMAGES, probabilities=True)
    loaded = FusedPredictor.load(predictor.save(tmp_path))
    after = loaded.predict(IMAGES, probabilities=True)
    pd.testing.assert_frame_equal(before.drop(columns="probabilities"), after.drop(columns="probabilities"))
    assert np.allclose(np.stack(before["probabilities"]), np.stack(after["probabilities"]))
    assert list(after.columns) == ["label", "class_name", "score", "probabilities"]
    assert np.allclose(np.stack(after["probabilities"]).sum(1), 1.0)
    assert (after["class_name"] == [f"digit{i}" for i in after["label"]]).all()
    assert np.allclose(after["score"], np.stack(after["probabilities"]).max(1))


def test_encoded_images_predict_like_arrays():
    predictor = _predictor()
    from_array = predictor.predict(to_image_batch(IMAGES, SHAPE))
    encoded = [_png(img) for img in IMAGES]
    for form in (pd.DataFrame({"image": encoded}), encoded, {"image": encoded},
                 pd.DataFrame({"image": [base64.b64encode(b).decode() for b in encoded]})):
        pd.testing.assert_frame_equal(predictor.predict(to_image_batch(form, SHAPE)), from_array)


def test_json_style_int64_arrays_are_accepted():
    assert to_image_batch(IMAGES.astype(np.int64).tolist(), SHAPE).dtype == np.uint8


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 8, 1), np.uint8), r"shape \(N, 8, 8, 1\) \(rank 4\), got shape \(8, 8, 1\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"height, width and channel count must match"),
    (np.zeros((2, 8, 8, 1), np.float32), "dtype float32: send uint8 pixel values 0..255"),
    (np.full((2, 8, 8, 1), np.nan), "contain NaN"),
    (np.full((2, 8, 8, 1), 300), r"pixel values must lie in 0..255, got 300..300"),
    (np.zeros((0, 8, 8, 1), np.uint8), "empty batch"),
    (np.zeros((MAX_BATCH_IMAGES + 1, 8, 8, 1), np.uint8), f"over the limit of {MAX_BATCH_IMAGES}"),
    (pd.DataFrame({"image": [b"not an image"]}), "image 0: cannot decode as an image"),
    (pd.DataFrame({"image": [_png(IMAGES[0]), bomb_png()]}),
     r"^image 1 has 400000000 pixels, more than the limit 89478485 \(PIL's Image.MAX_IMAGE_PIXELS\)$"),
    (pd.DataFrame({"image": ["%%%"]}), "image 0: text is not valid base64"),
    (pd.DataFrame({"a": [1], "b": [2]}), "expected one column 'image'"),
    ([[1, 2], [3]], "ragged or non-numeric"),
])
def test_bad_requests_name_the_problem(bad, match):
    with pytest.raises(InvalidInput, match=match):
        to_image_batch(bad, SHAPE)


def test_pyfunc_log_load_predict_equals_in_process(mlflow_store, tmp_path):
    import mlflow

    from ltexp import tracking

    predictor = _predictor("softmax")
    expected = predictor.predict(IMAGES)
    with mlflow.start_run() as active:
        model_uri = tracking.Run(active).log_model(predictor.save(tmp_path / "p"), input_example=IMAGES[:2])
    loaded = mlflow.pyfunc.load_model(model_uri)
    pd.testing.assert_frame_equal(loaded.predict(IMAGES), expected)
    with_probs = loaded.predict(IMAGES, params={"probabilities": True})
    assert np.stack(with_probs["probabilities"]).shape == (6, 10)
    pd.testing.assert_frame_equal(loaded.predict(pd.DataFrame({"image": [_png(i) for i in IMAGES]})), expected)
    with pytest.raises(mlflow.exceptions.MlflowException, match="invalid input: images must have shape"):
        loaded.predict(np.zeros((2, 4, 4, 1), np.uint8))
    # A decompression bomb is the client's error (400 under `mlflow models serve`), named as such.
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^invalid input: image 0 has 400000000 pixels, "
                                                                r"more than the limit 89478485") as bomb:
        loaded.predict(pd.DataFrame({"image": [bomb_png()]}))
    assert bomb.value.error_code == "INVALID_PARAMETER_VALUE" and bomb.value.get_http_status_code() == 400
    signature = loaded.metadata.signature
    assert [c.name for c in signature.outputs.inputs] == ["label", "class_name", "score"]
    assert signature.params.params[0].name == "probabilities"
    assert loaded.metadata.saved_input_example_info is not None


def test_weights_written_on_a_gpu_load_on_cpu(tmp_path, monkeypatch):
    """A predictor trained on CUDA (channels_last weights, storages tagged with a CUDA device)
    loads and predicts the same on a machine without CUDA: `FusedPredictor.load` maps to CPU."""
    predictor = _predictor("softmax")
    for expert in predictor.experts:
        expert.to(memory_format=torch.channels_last)  # what ltexp.engine does to a model on CUDA
    before = predictor.predict(IMAGES, probabilities=True)
    # Simulate the file a CUDA process writes: every storage's location tag says "cuda:0".
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    predictor.save(tmp_path)
    monkeypatch.undo()
    if not torch.cuda.is_available():  # the simulation is real: a plain load needs CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "experts.pt", weights_only=True)
    loaded = FusedPredictor.load(tmp_path)
    assert loaded.device.type == "cpu"
    after = loaded.predict(IMAGES, probabilities=True)
    pd.testing.assert_frame_equal(before.drop(columns="probabilities"), after.drop(columns="probabilities"))
    assert np.allclose(np.stack(before["probabilities"]), np.stack(after["probabilities"]), atol=1e-6)


def test_router_predictor_round_trips_through_the_pyfunc(mlflow_store, tmp_path):
    """The mixture-of-experts design (two experts + a group router) is served exactly as evaluated."""
    import mlflow

    from ltexp import tracking
    from ltexp.fusion import fuse

    torch.manual_seed(1)
    experts = [build_model("smallcnn", SHAPE, 5, [80.0], [60.0]).eval() for _ in range(2)]
    router = build_model("smallcnn", SHAPE, 2, [80.0], [60.0]).eval()
    layout = ExpertLayout(((0, 2, 4, 6, 8), (1, 3, 5, 7, 9)), (False, False), 10, router=True)
    predictor = FusedPredictor([*experts, router], layout, "router", tuple(f"digit{i}" for i in range(10)), SHAPE)
    batch = torch.from_numpy(IMAGES).permute(0, 3, 1, 2)
    in_process = fuse("router", predictor.expert_outputs(batch), layout).argmax(1).numpy()
    expected = predictor.predict(IMAGES)
    assert (expected["label"].to_numpy() == in_process).all()
    with mlflow.start_run() as active:
        model_uri = tracking.Run(active).log_model(predictor.save(tmp_path / "p"), input_example=IMAGES[:2])
    pd.testing.assert_frame_equal(mlflow.pyfunc.load_model(model_uri).predict(IMAGES), expected)
    assert FusedPredictor.load(tmp_path / "p").layout.router
