"""Pre-processing: the reference size rule, EXIF orientation, normalisation and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import canvas_size, processed_size, resize_image, to_rgb
from model.tensor_preprocess import normalize, orient_tensor, pad_batch, resize_tensor


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (800, 1066)),  # 640·800/480 = 1066.67 truncated
        ((640, 480), (1066, 800)),
        ((800, 1200), (800, 1200)),  # short side already 800: kept
        ((1000, 3000), (444, 1332)),  # capped: round(1333·1000/3000) = 444, long = int(444·3)
        ((8, 10000), (1, 1250)),  # capped: round(1333·8/10000) = 1, long = int(1·10000/8)
        ((1, 1), (800, 800)),
        ((427, 640), (800, 1199)),
    ],
)
def test_processed_size_follows_the_reference_rule(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert processed_size(*size) == expected


def test_processed_size_rejects_empty_images() -> None:
    with pytest.raises(ValueError, match="positive"):
        processed_size(0, 10)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.info["exif"] = exif.tobytes()
    image.getexif()[0x0112] = 6
    rotated = to_rgb(image)
    assert rotated.size == (20, 40)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    rgb = np.asarray(to_rgb(grey))
    assert rgb.shape == (4, 4, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1


def test_normalize_matches_imagenet_constants() -> None:
    pixels = torch.tensor([[[255]], [[0]], [[128]]], dtype=torch.uint8)
    out = normalize(pixels)
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    torch.testing.assert_close(out.flatten(), expected)


def test_pad_batch_masks_padding_bottom_right() -> None:
    a, b = torch.ones(3, 2, 3), torch.full((3, 4, 2), 2.0)
    batch, mask = pad_batch([a, b], (4, 3))
    assert batch.shape == (2, 3, 4, 3) and mask.shape == (2, 4, 3)
    assert not mask[0, :2, :3].any() and mask[0, 2:].all()
    assert not mask[1, :, :2].any() and mask[1, :, 2].all()
    assert batch[0, :, 2:].abs().sum() == 0 and batch[1, :, :, 2].abs().sum() == 0


def test_canvas_depends_on_own_size_only() -> None:
    assert canvas_size((800, 1066), mode="exact") == (800, 1066)
    assert canvas_size((800, 1066), mode="bucketed", bucket=128) == (896, 1152)
    with pytest.raises(ValueError, match="batch mode"):
        canvas_size((1, 1), mode="nope")  # type: ignore[arg-type]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tensor_orientation_matches_pil(orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    image.getexif()[0x0112] = orientation
    expected = np.asarray(to_rgb(image))  # PIL's transposes
    got = orient_tensor(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(
    ("source", "target"), [((480, 640), (400, 533)), ((90, 120), (800, 1066)), ((61, 47), (61, 47))]
)
def test_tensor_resize_is_within_one_grey_level_of_pil(source: tuple[int, int], target: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    smooth = np.asarray(
        Image.fromarray(rng.integers(0, 256, (source[0] // 8 + 1, source[1] // 8 + 1, 3), dtype=np.uint8)).resize(
            (source[1], source[0]), Image.BICUBIC
        )
    )  # photo-like: smooth with texture
    pixels = np.clip(smooth.astype(int) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    expected = resize_image(Image.fromarray(pixels), target)  # [h, w, 3] PIL bilinear
    got = resize_tensor(torch.from_numpy(pixels).permute(2, 0, 1), target).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and got.dtype == np.uint8
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 1
    assert (difference == 0).mean() >= (1.0 if source == target else 0.7)
