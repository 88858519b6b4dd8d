"""A corpus of bad and odd image files, generated in memory, each with the row the pipeline must give it.

Built for `test_decode_formats` (``decode_image`` per kind, no Ray) and `test_bad_inputs` (one job over
all of them). The decompression bomb is written row by row through zlib, never held as pixels.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

from tests.pipeline.images import photo_array, photo_bytes

ORIENTATION = ExifTags.Base.Orientation  # 0x0112


@dataclass(frozen=True)
class OddInput:
    name: str  # file name, with the extension a crawler would find it under
    build: Callable[[], bytes]  # the file's bytes (built on demand: listing the corpus is free)
    size: tuple[int, int] | None = None  # (width, height) as displayed, when it must decode
    error: str | None = None  # a substring of the error, when it must be rejected
    header_only: bool = False  # must be rejected from its header (decoding would need gigabytes)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _photo(height: int, width: int, *, seed: int = 0) -> Image.Image:
    return Image.fromarray(photo_array(height, width, seed=seed))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit palette PNG of ``width``x``height`` zeros (~0.1 MB; decoded as "P" it needs w·h bytes).

    The zero rows go through zlib in slices of 256 rows: the full image is never allocated here.
    """
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then 1-bit palette indices
    compressor = zlib.compressobj(9)
    idat = [compressor.compress(row * 256) for _ in range(height // 256)]
    idat += [compressor.compress(row * (height % 256)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)  # bit depth 1, colour type 3 (palette)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255]))
        + _png_chunk(b"IDAT", b"".join(idat))
        + _png_chunk(b"IEND", b"")
    )


def forged_jpeg(width: int = 65_000, height: int = 65_000) -> bytes:
    """A tiny real JPEG whose SOF0 header claims ``width``x``height``."""
    data = bytearray(photo_bytes(16, 16, seed=4))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_jpeg(orientation: int, *, width: int = 72, height: int = 48) -> bytes:
    """A photo stored ``width``x``height`` whose EXIF says how to display it."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _save(_photo(height, width, seed=orientation), "JPEG", exif=exif.tobytes(), quality=95)


def damaged_exif_jpeg() -> bytes:
    """Orientation 6 readable, but another tag has the wrong type: rewriting the block raises struct.error.

    The Make tag (0x010F, ASCII) is renamed to ImageWidth (0x0100, expects an integer).
    """
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "Maker"
    block = exif.tobytes()
    assert block[6:8] == b"MM"  # big-endian: the entry starts with tag 01 0F, type 00 02 (ASCII)
    damaged = block.replace(b"\x01\x0f\x00\x02", b"\x01\x00\x00\x02")
    assert damaged != block
    return _save(_photo(40, 64, seed=8), "JPEG", exif=damaged)


def garbage_exif_jpeg() -> bytes:
    """An APP1 Exif segment holding random bytes (no TIFF header): shown as stored."""
    noise = np.random.default_rng(9).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return _save(_photo(40, 64, seed=9), "JPEG", exif=b"Exif\x00\x00" + noise)


def animated_gif() -> bytes:
    """Three 50x30 frames: red, green, blue (the first frame, red, is the one used)."""
    frames = [Image.new("RGB", (50, 30), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png(width: int = 60, height: int = 40) -> bytes:
    ramp = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    return _save(Image.fromarray(ramp), "PNG")  # mode I;16


def sixteen_bit_rgb_png(width: int = 60, height: int = 40) -> bytes:
    """Colour type 2, bit depth 16 (Pillow has no 16-bit RGB mode), written by hand."""
    pixels = photo_array(height, width, seed=3).astype(">u2") * 257
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def palette_transparent_png() -> bytes:
    image = _photo(40, 60, seed=5).quantize(16)
    return _save(image, "PNG", transparency=0)  # tRNS: palette entry 0 transparent


def float_tiff(width: int = 48, height: int = 32) -> bytes:
    values = np.linspace(0.0, 255.0, width * height, dtype=np.float32).reshape(height, width)
    return _save(Image.fromarray(values), "TIFF")  # mode F


def _truncated(data: Callable[[], bytes], keep: float) -> Callable[[], bytes]:
    return lambda: (whole := data())[: int(len(whole) * keep)]


def _jpeg() -> bytes:
    return photo_bytes(48, 64, seed=1)


def _png() -> bytes:
    return photo_bytes(40, 56, fmt="PNG", seed=2)


def _random_bytes() -> bytes:
    return np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _bad_crc_png() -> bytes:
    data = bytearray(_png())
    data[29] ^= 0xFF  # the IHDR chunk's CRC (bytes 29-32)
    return bytes(data)


HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"
POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # EPS: Pillow would run Ghostscript
NOT_SUPPORTED = "not a supported image format"


def corpus() -> list[OddInput]:
    """Every kind once; names are unique. Expectations hold for ``InferenceConfig(min_size=64, max_size=107)``."""
    return [
        # rejected, each with its reason
        OddInput("empty.jpg", lambda: b"", error="empty object (0 bytes)"),
        OddInput("random.jpg", _random_bytes, error=NOT_SUPPORTED),
        OddInput("page.png", lambda: HTML, error=NOT_SUPPORTED),
        OddInput("notes.png", lambda: b"just some text, not pixels\n" * 20, error=NOT_SUPPORTED),
        OddInput("postscript.jpg", lambda: POSTSCRIPT, error=NOT_SUPPORTED),
        OddInput("truncated.jpg", _truncated(_jpeg, 2 / 3), error="corrupt or truncated JPEG image"),
        OddInput("truncated_header.jpg", _truncated(_jpeg, 0.1), error="corrupt image header"),
        OddInput("truncated.png", _truncated(_png, 1 / 2), error="corrupt or truncated PNG image"),
        OddInput("bad_crc.png", _bad_crc_png, error="corrupt image header: PNG signature"),
        OddInput("forged_65000.jpg", forged_jpeg, error="too many pixels", header_only=True),
        OddInput("bomb_30000.png", png_bomb, error="too many pixels", header_only=True),
        OddInput("wide_10000x8.png", lambda: _save(_photo(8, 10_000), "PNG"), error="extreme aspect ratio"),
        # decoded, with the (width, height) a viewer shows
        OddInput("cmyk.jpg", lambda: _save(_photo(40, 60, seed=3).convert("CMYK"), "JPEG"), size=(60, 40)),
        OddInput("grey16.png", sixteen_bit_png, size=(60, 40)),
        OddInput("rgb16.png", sixteen_bit_rgb_png, size=(60, 40)),
        OddInput("palette_trns.png", palette_transparent_png, size=(60, 40)),
        OddInput("la.png", lambda: _save(_photo(40, 60, seed=6).convert("LA"), "PNG"), size=(60, 40)),
        OddInput("rgba.png", lambda: _save(_photo(40, 60, seed=7).convert("RGBA"), "PNG"), size=(60, 40)),
        OddInput("bilevel.png", lambda: _save(_photo(40, 60, seed=8).convert("1"), "PNG"), size=(60, 40)),
        OddInput("animated.gif", animated_gif, size=(50, 30)),
        OddInput("exif6.jpg", lambda: exif_jpeg(6), size=(48, 72)),  # stored 72x48, displayed 48x72
        OddInput("exif8.jpg", lambda: exif_jpeg(8), size=(48, 72)),
        OddInput("exif_damaged.jpg", damaged_exif_jpeg, size=(40, 64)),  # orientation 6 still applied
        OddInput("exif_garbage.jpg", garbage_exif_jpeg, size=(64, 40)),  # no usable EXIF: as stored
        OddInput("grey.jpg", lambda: _save(_photo(40, 60, seed=10).convert("L"), "JPEG"), size=(60, 40)),
        OddInput("one_pixel.png", lambda: _save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), size=(1, 1)),
        OddInput("photo.tif", lambda: _save(_photo(40, 60, seed=11), "TIFF", compression="tiff_lzw"), size=(60, 40)),
        OddInput("float.tiff", float_tiff, size=(48, 32)),
        OddInput("photo.webp", lambda: photo_bytes(40, 60, fmt="WEBP", seed=12), size=(60, 40)),
        OddInput("photo.bmp", lambda: photo_bytes(40, 60, fmt="BMP", seed=13), size=(60, 40)),
        OddInput("png_named.jpg", _png, size=(56, 40)),
    ]
