"""Small deterministic test photos as encoded bytes (smooth structure + noise, like a photo)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from model.synthetic_weights import calibration_image


def photo_array(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """uint8 [height, width, 3]."""
    base = calibration_image(height, width).permute(1, 2, 0).numpy().astype(np.int16)
    if seed % 2:
        base = base[:, ::-1]
    rng = np.random.default_rng(seed)
    return np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)


def photo_bytes(height: int, width: int, *, fmt: str = "JPEG", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_array(height, width, seed=seed)).save(buffer, format=fmt)
    return buffer.getvalue()
