"""Decoding encoded images (PNG, JPEG, ...) into uint8 arrays, for every way an image enters ltexp.

A folder data set's files (`ltexp/data/sources.py`) and the encoded images a client sends to the
served model (`ltexp/predictor.py`) both go through `decode_image`, so both refuse the same
images with the same words: files PIL cannot identify or read, and images with more pixels than
PIL's limit (`PIL.Image.MAX_IMAGE_PIXELS`, read at each call so a program may change it). A PNG
of a few KB can declare a size that takes gigabytes to decode (a decompression bomb); the limit
is checked on the declared size, before any pixel is decoded.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np

from ltexp import LtexpError


class UndecodableImage(LtexpError):
    """An image that cannot be decoded, or has more pixels than the limit; the message names it."""


def decode_image(data: bytes | bytearray | str | Path, name: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """Decode `data` (encoded bytes, or the path of an image file) into a uint8 array.

    The image is converted to PIL `mode` ("L": (H, W); "RGB": (H, W, 3)) and resized bilinearly
    to `size` = (width, height) unless it has that size already. `name` says which image it is in
    messages, e.g. "image 3" or "image /data/train/cat/1.png". Raises `UndecodableImage` naming
    it when PIL cannot read it, or when it has more than `PIL.Image.MAX_IMAGE_PIXELS` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with warnings.catch_warnings():
            # Between the limit and twice it PIL opens the image with a warning; it is refused
            # below, so the warning would only repeat the refusal.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)  # reads the header only: the size is known, no pixel decoded
        with img:
            pixels = img.width * img.height
            if limit is not None and pixels > limit:
                raise UndecodableImage(_too_many_pixels(name, str(pixels), limit))
            img = img.convert(mode)
            if img.size != tuple(size):
                img = img.resize(tuple(size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        # Over twice the limit PIL refuses in `open`, before handing out the image; its message
        # ("Image size (N pixels) exceeds ...") is where the count is, if it still has that form.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = found.group(1) if found else f"more than {2 * limit}"
        raise UndecodableImage(_too_many_pixels(name, count, limit)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UndecodableImage(f"{name}: cannot decode as an image ({type(exc).__name__})") from None


def _too_many_pixels(name: str, count: str, limit: int) -> str:
    return f"{name} has {count} pixels, more than the limit {limit} (PIL's Image.MAX_IMAGE_PIXELS)"
