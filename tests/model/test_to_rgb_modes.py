"""`to_rgb` on every Pillow mode a decoder can hand it, and on damaged EXIF orientation data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.preprocess import to_rgb

ORIENTATION = 0x0112


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "PA", "LA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I;16B", "I", "F"]
)
def test_every_decoder_mode_becomes_8bit_rgb_of_the_same_size(mode: str) -> None:
    image = Image.new(mode, (5, 3))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (5, 3)


def test_float_grey_is_clipped_and_nan_is_black() -> None:
    values = np.array([[-5.0, 0.0, 127.6, 300.0, np.nan, np.inf]], dtype=np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 0, 127, 255, 0, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_palette_transparency_is_resolved_through_the_palette() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    assert np.asarray(to_rgb(image)).tolist() == [[[10, 20, 30], [200, 100, 50]]]


@pytest.mark.parametrize(("orientation", "size"), [(1, (4, 2)), (3, (4, 2)), (6, (2, 4)), (8, (2, 4))])
def test_orientation_tag_rotates(orientation: int, size: tuple[int, int]) -> None:
    image = Image.new("RGB", (4, 2))
    image.putpixel((0, 0), (255, 0, 0))  # top-left as stored
    image.getexif()[ORIENTATION] = orientation
    rgb = to_rgb(image)
    assert rgb.size == size
    red = np.argwhere((np.asarray(rgb) == [255, 0, 0]).all(axis=-1)).tolist()
    # 6 (90° clockwise): the stored top-left is shown top-right; 8: bottom-left; 3 (180°): bottom-right
    assert red == {1: [[0, 0]], 3: [[1, 3]], 6: [[0, 1]], 8: [[3, 0]]}[orientation]


@pytest.mark.parametrize("value", [0, 9, 65535, "6", (6,), b"\x06"])
def test_unusable_orientation_values_mean_no_rotation(value: object) -> None:
    image = Image.new("RGB", (4, 2))
    image.getexif()[ORIENTATION] = value
    assert to_rgb(image).size == (4, 2)
