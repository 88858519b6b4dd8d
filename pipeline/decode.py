"""Decode stage (CPU workers): raw bytes -> the model's input pixels, with per-image errors captured.

Undecodable, truncated, too large (pixel cap checked on the header, before decoding: no decompression
bombs) or unreadable images become an error row; the job carries on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.predictor import InferenceConfig, prepare

EMPTY_PIXELS = np.zeros((1, 1, 3), dtype=np.uint8)  # placeholder for rows without an image


def decode_image(data: bytes, *, max_pixels: int, inference: InferenceConfig) -> tuple[np.ndarray, int, int]:
    """bytes -> (pixels uint8 [h, w, 3] at the processed size, original width, original height).

    Raises ValueError with a short reason for anything that is not a usable image.
    """
    if not data:
        raise ValueError("empty object (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ValueError(f"too many pixels: {image.width}x{image.height} > cap {max_pixels}")
            image.seek(0)  # animated formats: the first frame
            image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"undecodable: {type(exc).__name__}: {exc}") from exc
        except (OSError, SyntaxError, EOFError) as exc:  # truncated/corrupt data
            raise ValueError(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from exc
    prepared = prepare(image, inference)
    height, width = prepared.original_size
    return prepared.pixels, width, height


def decode_batch(batch: dict[str, np.ndarray], *, max_pixels: int, inference: InferenceConfig) -> dict[str, np.ndarray]:
    """Image rows with ``data`` -> rows with ``pixels``, ``width``, ``height`` and ``error``."""
    n = len(batch["image_id"])
    pixels: list[np.ndarray] = []
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    errors = [str(e) for e in batch["error"]]
    for i in range(n):
        if errors[i]:
            pixels.append(EMPTY_PIXELS)
            continue
        try:
            px, widths[i], heights[i] = decode_image(
                bytes(batch["data"][i]), max_pixels=max_pixels, inference=inference
            )
            pixels.append(px)
        except (ValueError, MemoryError) as exc:
            errors[i] = str(exc)
            pixels.append(EMPTY_PIXELS)
    out_pixels = np.empty(n, dtype=object)
    out_pixels[:] = pixels
    return {
        "image_id": batch["image_id"],
        "source": batch["source"],
        "pixels": out_pixels,
        "width": widths,
        "height": heights,
        "error": np.array(errors, dtype=object),
    }
