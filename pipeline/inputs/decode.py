"""Decoding inside the model actor's process: raw bytes -> the model's input pixels, per-image errors captured.

Anything that is not a usable image becomes an error row with a short, specific reason and the job
carries on: an empty object, bytes in no supported format (JPEG, PNG, GIF, BMP, TIFF, WebP, recognised
by content, not by extension), too many pixels (checked on the header, before any pixel is decoded: no
decompression bombs), corrupt or truncated data, a pixel format with no RGB conversion, or an aspect
ratio so extreme that the resize rule leaves a zero-pixel side. Animated images use their first frame.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.config import InferenceConfig
from model.preprocess import exif_orientation, prepare, processed_size, to_rgb
from pipeline.schema import EMPTY_PIXELS, INPUT_COLUMNS, DecodedImage

# The formats the README promises (by content, whatever the extension). Restricting `Image.open` to them
# keeps Pillow's ~40 other parsers away from untrusted bytes (EPS, for one, would run Ghostscript).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")  # JPEG includes MPO (multi-picture)

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# What Pillow's parsers and decoders raise on malformed data (found by fuzzing, not only OSError).
_MALFORMED = (OSError, SyntaxError, EOFError, ValueError, struct.error, IndexError, KeyError, TypeError)


def decode_image(data: bytes, *, max_pixels: int, inference: InferenceConfig) -> tuple[np.ndarray, int, int]:
    """bytes -> (pixels uint8 [h, w, 3] at the processed size, width, height as displayed).

    Width and height are after the EXIF orientation (what a viewer shows, and the frame of the masks).
    ``max_pixels`` caps width·height on the header; Pillow's own hard limit (2 · ``Image.MAX_IMAGE_PIXELS``
    ≈ 179 MP) applies as well. Raises ValueError with a short reason for anything that is not a usable image.
    """
    if not data:
        raise ValueError("empty object (0 bytes)")
    return _decode_opened(_open_header(data, max_pixels=max_pixels), inference)


def check_for_device(data: bytes, *, max_pixels: int, inference: InferenceConfig) -> tuple[int, int, int] | None:
    """For ``device_preprocess``: (EXIF orientation, width, height as displayed) of a JPEG that is left to the
    model's device to decode, after the same header checks as `decode_image`; None for any other image
    (decode it here). Raises ValueError as `decode_image` does for bytes that are no usable image."""
    image = _open_header(data, max_pixels=max_pixels)
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):  # CMYK, MPO, ...: Pillow on this worker
        return None
    orientation = exif_orientation(image)
    width, height = (image.height, image.width) if orientation >= 5 else (image.width, image.height)
    _check_aspect_ratio(image, inference)
    return orientation, width, height


def _check_aspect_ratio(image: Image.Image, inference: InferenceConfig) -> None:
    target = processed_size(image.height, image.width, min_size=inference.min_size, max_size=inference.max_size)
    if min(target) < 1:  # symmetric in height and width, so the EXIF orientation does not matter here
        raise ValueError(
            f"extreme aspect ratio: {image.width}x{image.height} resizes to {target[1]}x{target[0]} "
            f"(min_size={inference.min_size}, max_size={inference.max_size})"
        )


def decode_oriented(data: bytes, *, max_pixels: int) -> np.ndarray:
    """bytes -> ``[H, W, 3]`` uint8 RGB at full size after EXIF orientation: the frame of the masks.

    The same header checks, first-frame load, orientation rule and RGB conversion as `decode_image`, without
    the resize (for drawing results over their image, `jobs/show.py`). Raises ValueError as `decode_image` does.
    """
    if not data:
        raise ValueError("empty object (0 bytes)")
    image = _open_header(data, max_pixels=max_pixels)
    _load_first_frame(image)
    with _conversion_errors(image):
        rgb = to_rgb(image)
    return np.asarray(rgb)


def _load_first_frame(image: Image.Image) -> None:
    try:
        image.seek(0)  # animated formats: the first frame
        image.load()
    except MemoryError as exc:
        raise ValueError(f"out of memory decoding a {image.width}x{image.height} {image.format} image") from exc
    except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its header said
        raise ValueError(f"too many pixels (in a frame): {exc}") from exc
    except _MALFORMED as exc:
        raise ValueError(f"corrupt or truncated {image.format} image: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _conversion_errors(image: Image.Image) -> Iterator[None]:
    try:
        yield
    except MemoryError as exc:
        raise ValueError(f"out of memory converting a {image.width}x{image.height} {image.mode} image") from exc
    except (ValueError, OSError) as exc:  # e.g. a pixel mode Pillow cannot convert to RGB
        raise ValueError(f"cannot convert {image.format} image of mode {image.mode} to RGB: {exc}") from exc


def _decode_opened(image: Image.Image, inference: InferenceConfig) -> tuple[np.ndarray, int, int]:
    _check_aspect_ratio(image, inference)
    _load_first_frame(image)
    with _conversion_errors(image):
        prepared = prepare(image, inference)
    height, width = prepared.original_size
    return prepared.pixels, width, height


def _open_header(data: bytes, *, max_pixels: int) -> Image.Image:
    """Parse the header only (Pillow opens lazily) and enforce the pixel cap before any decoding."""
    with warnings.catch_warnings():
        # The cap below replaces Pillow's warning level; its error level (2x) still stops absurd headers.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"too many pixels (rejected on the header): {exc}") from exc
        except UnidentifiedImageError as exc:
            signature = _signature(data)
            if signature:  # Pillow hides why its parser gave up
                raise ValueError(
                    f"corrupt image header: {signature} signature, but the header cannot be parsed"
                ) from exc
            raise ValueError(
                f"not a supported image format (JPEG, PNG, GIF, BMP, TIFF, WebP); {len(data)} bytes "
                f"starting {data[:16]!r}"
            ) from exc
        except _MALFORMED as exc:  # a recognised format whose header is broken
            raise ValueError(f"corrupt image header: {type(exc).__name__}: {exc}") from exc
    if image.width * image.height > max_pixels:
        raise ValueError(
            f"too many pixels (rejected on the header): {image.width}x{image.height} = "
            f"{image.width * image.height} > cap {max_pixels}"
        )
    if image.width < 1 or image.height < 1:
        raise ValueError(f"empty image: header says {image.width}x{image.height}")
    return image


def _signature(data: bytes) -> str | None:
    """The supported format whose magic bytes ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def decode_input(data: bytes, *, max_pixels: int, inference: InferenceConfig) -> DecodedImage:
    """An input's bytes -> its `DecodedImage`; anything that is not a usable image gets ``error`` set.

    With ``inference.device_preprocess``, a JPEG the device can decode keeps its bytes (after the header
    checks) and gets no pixels here: the model actor decodes it on its device (`pipeline.inputs.device_decode`).
    """
    try:
        passed = None
        if inference.device_preprocess and data:
            passed = check_for_device(data, max_pixels=max_pixels, inference=inference)
        if passed is not None:
            orientation, width, height = passed
            return DecodedImage(EMPTY_PIXELS, data, orientation, width, height, "")
        pixels, width, height = decode_image(data, max_pixels=max_pixels, inference=inference)
        return DecodedImage(pixels, b"", 1, width, height, "")
    except (ValueError, MemoryError) as exc:
        error = str(exc) or f"undecodable: {type(exc).__name__}"  # never "": that would read as ok
        return DecodedImage(EMPTY_PIXELS, b"", 1, 0, 0, error)


UNREAD = DecodedImage(EMPTY_PIXELS, b"", 1, 0, 0, "")  # a row whose read failed: its error is the read's


def decoded_batch(rows: dict[str, Sequence], decoded: Sequence[DecodedImage]) -> dict[str, np.ndarray]:
    """Image rows ({`INPUT_COLUMNS`, "error", "retryable"}) and their `DecodedImage` -> the batch the model actor
    takes: rows with ``pixels``, ``encoded``, ``orientation``, ``width``, ``height`` and ``error`` (a read error
    kept, else the decode's), the input columns and ``retryable`` passed through."""
    errors = [str(e) or d.error for e, d in zip(rows["error"], decoded)]
    return {
        **{name: rows[name] for name in (*INPUT_COLUMNS, "retryable")},
        "pixels": _object_array([d.pixels for d in decoded]),
        "encoded": _object_array([d.encoded for d in decoded]),
        "orientation": np.array([d.orientation for d in decoded], dtype=np.int8),
        "width": np.array([d.width for d in decoded], dtype=np.int32),
        "height": np.array([d.height for d in decoded], dtype=np.int32),
        "error": np.array(errors, dtype=object),
    }


def decode_batch(batch: dict[str, np.ndarray], *, max_pixels: int, inference: InferenceConfig) -> dict[str, np.ndarray]:
    """Image rows with ``data`` -> `decoded_batch` (each row through `decode_input`; rows that already have an
    error are not decoded)."""
    decoded = [
        UNREAD if str(error) else decode_input(bytes(data), max_pixels=max_pixels, inference=inference)
        for data, error in zip(batch["data"], batch["error"])
    ]
    return decoded_batch(batch, decoded)


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
