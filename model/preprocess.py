"""Inference pre-processing as the reference does it (upstream `datasets/transforms.py`, eval transforms),
the CPU half: PIL and numpy only, so the CPU workers that decode images never import torch.

EXIF orientation applied, RGB; shorter side resized to ``min_size`` with the longer side capped at
``max_size`` (the reference's size rule, truncation included) using PIL bilinear on the uint8 image. The
tensor half (the same steps on the model's device, [0, 1] floats and ImageNet normalisation, zero-padding
bottom/right to a canvas with a padding mask) is `model.tensor_preprocess`.

Canvas policy (batch independence): in ``exact`` mode the canvas is the image's own processed size, so
only images of equal processed size share a batch and each result equals the reference's single-image
result. In ``bucketed`` mode the canvas is the processed size rounded up to a multiple of ``bucket``
pixels: more images share a canvas (bigger batches), each result still depends on its own size only, but
differs slightly from the single-image reference near the bottom/right border (padding is seen by the
convolutions, as in any padded batch).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image

from model.config import BatchMode, InferenceConfig

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def processed_size(height: int, width: int, *, min_size: int = 800, max_size: int | None = 1333) -> tuple[int, int]:
    """The reference's resize rule: (height, width) of the image fed to the model.

    If long/short · min_size > max_size the target short side becomes round(max_size · short / long);
    an image whose short side already equals the target is kept; otherwise short = target and
    long = int(target · long / short) (truncation, not rounding).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    size = min_size
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 (as stored) when absent, broken or out of range."""
    try:
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error):
        return 1  # a broken EXIF block: shown as stored
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert to 8-bit RGB (16-bit and 32-bit grey scaled down, not clipped).

    The orientation tag is read on its own (as `ImageOps.exif_transpose` does, without rewriting the EXIF
    block, which raises on some damaged blocks); an unreadable or out-of-range tag means no rotation.
    Transparency is dropped (as the reference's ``convert("RGB")`` does).
    """
    transpose = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,  # 90° clockwise
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,  # 90° counter-clockwise
    }.get(exif_orientation(image))
    if transpose is not None:
        image = image.transpose(transpose)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    elif image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # the palette's transparency applied before the alpha is dropped
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """PIL bilinear (antialiased) resize of an RGB image to (height, width) -> uint8 [h, w, 3]."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return rgb_pixels(image)


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """uint8 ``[h, w, 3]`` of an RGB image. Where Pillow exports its memory (the Arrow C data interface, Pillow
    >= 11.2, an image held in one block), a view of it, without a copy (its stride is 4 bytes per pixel: Pillow
    keeps RGB as RGBX); else a copy (``np.asarray``: `Image.tobytes`, a Python loop that holds the GIL, ~1.4 ms
    per 800×1066 image, which the block call's decoding threads would wait on each other for)."""
    if image.mode == "RGB" and hasattr(image, "__arrow_c_array__"):
        try:
            rgbx = pa.array(image).values.to_numpy(zero_copy_only=True)
        except (ValueError, pa.ArrowException):  # e.g. "Image rows are not contiguous in memory" (large images)
            pass
        else:
            return rgbx.reshape(image.size[1], image.size[0], 4)[:, :, :3]
    return np.asarray(image, dtype=np.uint8)


def canvas_size(size: tuple[int, int], *, mode: BatchMode, bucket: int = 128) -> tuple[int, int]:
    """The padded canvas an image of processed ``size`` is computed on; depends on its own size only."""
    if mode == "exact":
        return size
    if mode == "bucketed":
        return (-(-size[0] // bucket) * bucket, -(-size[1] // bucket) * bucket)
    raise ValueError(f"batch mode must be 'exact' or 'bucketed', got {mode!r}")


class PreparedImage(NamedTuple):
    # uint8 at the processed size: numpy [h, w, 3] when prepared on a CPU worker, or a tensor [3, h, w]
    # already on the model's device (see `pipeline.inputs.device_decode`)
    pixels: np.ndarray | torch.Tensor
    original_size: tuple[int, int]  # (height, width) after EXIF orientation

    @property
    def processed_size(self) -> tuple[int, int]:
        shape = self.pixels.shape
        return (shape[0], shape[1]) if isinstance(self.pixels, np.ndarray) else (int(shape[-2]), int(shape[-1]))


def prepare(image: Image.Image, config: InferenceConfig) -> PreparedImage:
    """EXIF orientation, RGB and the reference resize (PIL bilinear) of one decoded image."""
    rgb = to_rgb(image)
    original = (rgb.height, rgb.width)
    size = processed_size(*original, min_size=config.min_size, max_size=config.max_size)
    return PreparedImage(resize_image(rgb, size), original)
