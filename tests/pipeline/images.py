"""Small deterministic test photos as encoded bytes (smooth structure + noise, like a photo), and tar shards of
them."""

from __future__ import annotations

import io
import tarfile

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


def input_columns(image_ids: list[str], *, source: str | None = None) -> dict[str, np.ndarray]:
    """The columns every stage passes through (`pipeline.schema.INPUT_COLUMNS`, ``retryable``), as a read
    stage emits them for whole files named ``image_ids`` (or members of ``source``)."""
    n = len(image_ids)
    return {
        "image_id": np.array(image_ids, dtype=object),
        "source": np.array(image_ids if source is None else [source] * n, dtype=object),
        "member": np.array([None] * n, dtype=object),
        "input_size": np.array([None] * n, dtype=object),
        "input_version": np.array([None] * n, dtype=object),
        "retryable": np.zeros(n, dtype=bool),
    }


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar archive holding ``(name, data)`` members, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
