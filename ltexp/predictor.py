"""The shipped model: experts + fusion rule + class names + preprocessing, in pure torch.

`FusedPredictor` is what the experiment evaluates in-process and what the MLflow pyfunc wraps
(`ltexp/serving.py`), so served predictions are the evaluated ones. A single-model method is a
predictor with one expert that owns every class.

Input formats (`to_image_batch`): uint8 arrays (N, H, W, C) (integer arrays in 0..255 are
accepted, as JSON delivers them as int64), or encoded PNG/JPEG images as bytes or base64 text
(a DataFrame column, a list, or a dict column). Everything else is an `InvalidInput` naming the
problem.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltexp import LtexpError, __version__
from ltexp.fusion import ExpertLayout, fuse
from ltexp.models import Classifier

# Largest batch one request may carry; bigger batches are refused (HTTP 400), not queued.
MAX_BATCH_IMAGES = 4096
IMAGE_COLUMN = "image"


class InvalidInput(LtexpError):
    """A prediction request that cannot be scored (bad shape, dtype, values or image bytes)."""


@dataclass
class FusedPredictor:
    """Experts and the rule that fuses their outputs into one prediction over all classes."""

    experts: list[Classifier]
    layout: ExpertLayout
    fusion: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (H, W, C)
    fusion_params: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.experts[0].mean.device

    @torch.no_grad()
    def expert_outputs(self, images: torch.Tensor, batch_size: int = 1024) -> list[torch.Tensor]:
        """Each expert's float32 logits for uint8 images (N, C, H, W) on the predictor's device."""
        from ltexp.engine import predict_logits

        return [predict_logits(expert, images, batch_size) for expert in self.experts]

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Fused log-probabilities (N, K), label order."""
        return fuse(self.fusion, self.expert_outputs(images), self.layout, self.fusion_params)

    def predict(self, images_nhwc: np.ndarray, probabilities: bool = False):
        """Label, class name and score (fused probability of that label) per image, as a DataFrame."""
        import pandas as pd

        batch = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).to(self.device)
        probs = self.log_probs(batch).exp().cpu()
        score, label = probs.max(dim=1)
        frame = pd.DataFrame({"label": label.numpy().astype(np.int64),
                              "class_name": [self.class_names[i] for i in label.tolist()],
                              "score": score.numpy().astype(np.float64)})
        if probabilities:
            frame["probabilities"] = [row for row in probs.numpy().astype(np.float64)]
        return frame

    # -- persistence: two files, so the pyfunc needs no pickle of ltexp classes ------------------
    def save(self, directory: str | Path) -> Path:
        from ltexp.lifecycle import save_whole  # a failed write says why, in one line

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_whole([{"arch": e.arch, "in_channels": int(e.mean.shape[1]), "num_outputs": e.head.linear.out_features,
                     "head": e.head.kind, "mean": e.mean.flatten().tolist(), "std": e.std.flatten().tolist(),
                     "state_dict": {k: v.detach().cpu() for k, v in e.state_dict().items()}}
                    for e in self.experts], directory / "experts.pt", "the model's weights")
        meta = {"ltexp_version": __version__, "fusion": self.fusion, "fusion_params": self.fusion_params,
                "class_names": list(self.class_names), "image_shape": list(self.image_shape),
                "owners": [list(c) for c in self.layout.owners], "has_other": list(self.layout.has_other),
                "router": self.layout.router,
                "max_batch_images": MAX_BATCH_IMAGES}
        (directory / "predictor.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "FusedPredictor":
        directory = Path(directory)
        meta = json.loads((directory / "predictor.json").read_text())
        experts = []
        for saved in torch.load(directory / "experts.pt", map_location="cpu", weights_only=True):
            model = Classifier(saved["arch"], saved["in_channels"], saved["num_outputs"], saved["mean"], saved["std"],
                               head=saved.get("head", "linear"))
            state = saved["state_dict"]
            # Models saved before the head had an offset (post-hoc logit adjustment) have none: zero.
            state.setdefault("head.offset", torch.zeros(saved["num_outputs"]))
            model.load_state_dict(state)
            experts.append(model.to(device).eval())
        layout = ExpertLayout(tuple(tuple(c) for c in meta["owners"]), tuple(meta["has_other"]), len(meta["class_names"]),
                              router=bool(meta.get("router", False)))  # models saved before routers had none
        # "none" was the name of one expert's identity rule before it became `concat`.
        fusion = "concat" if meta["fusion"] == "none" else meta["fusion"]
        return cls(experts, layout, fusion, tuple(meta["class_names"]), tuple(meta["image_shape"]),
                   meta["fusion_params"])


def _decode_image(value: Any, row: int, image_shape: tuple[int, int, int]) -> np.ndarray:
    from ltexp.images import UndecodableImage, decode_image

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"image {row}: text is not valid base64 of a PNG/JPEG file") from None
    if not isinstance(value, (bytes, bytearray)):
        raise InvalidInput(f"image {row}: expected PNG/JPEG bytes or base64 text, got {type(value).__name__}")
    height, width, channels = image_shape
    try:
        array = decode_image(value, f"image {row}", "L" if channels == 1 else "RGB", (width, height))
    except UndecodableImage as exc:
        raise InvalidInput(str(exc)) from None
    return array.reshape(height, width, channels)


def to_image_batch(model_input: Any, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Validate a request and return uint8 images (N, H, W, C), or raise `InvalidInput`."""
    import pandas as pd

    expected = "(N, {}, {}, {})".format(*image_shape)
    if isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:
            raise InvalidInput(f"expected a column {IMAGE_COLUMN!r} of PNG/JPEG bytes, got keys {sorted(model_input)}")
        model_input = pd.DataFrame({IMAGE_COLUMN: list(model_input[IMAGE_COLUMN])})
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise InvalidInput(f"expected one column {IMAGE_COLUMN!r} of PNG/JPEG bytes, got columns {list(model_input.columns)}")
        encoded = model_input.iloc[:, 0].tolist()
    elif isinstance(model_input, (list, tuple)) and model_input and isinstance(model_input[0], (bytes, bytearray, str)):
        encoded = list(model_input)
    else:
        encoded = None
    if encoded is not None:
        _check_batch_size(len(encoded))
        return np.stack([_decode_image(v, i, image_shape) for i, v in enumerate(encoded)])

    try:
        array = np.asarray(model_input)
    except (ValueError, TypeError):
        raise InvalidInput(f"images must be a uint8 array {expected}: ragged or non-numeric input") from None
    if array.dtype == object:
        raise InvalidInput(f"images must be a uint8 array {expected}: ragged or non-numeric input")
    if array.size == 0:
        _check_batch_size(0)
    if array.ndim != 4:
        raise InvalidInput(f"images must have shape {expected} (rank 4), got shape {array.shape}")
    _check_batch_size(array.shape[0])
    if tuple(array.shape[1:]) != tuple(image_shape):
        raise InvalidInput(f"images must have shape {expected}, got {array.shape}: "
                           f"height, width and channel count must match the model")
    if np.issubdtype(array.dtype, np.floating):
        if np.isnan(array).any():
            raise InvalidInput("images contain NaN: send uint8 pixel values 0..255")
        raise InvalidInput(f"images have dtype {array.dtype}: send uint8 pixel values 0..255 (not normalised floats)")
    if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        raise InvalidInput(f"images have dtype {array.dtype}: send uint8 pixel values 0..255")
    if array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InvalidInput(f"pixel values must lie in 0..255, got {low}..{high}")
        array = array.astype(np.uint8)
    return array


def _check_batch_size(n: int) -> None:
    if n == 0:
        raise InvalidInput("empty batch: send at least one image")
    if n > MAX_BATCH_IMAGES:
        raise InvalidInput(f"batch of {n} images is over the limit of {MAX_BATCH_IMAGES}: split the request")
