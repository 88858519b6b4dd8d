"""`decode_image` / `decode_batch` on every kind of bad or odd input (unit tier: no Ray, milliseconds each)."""

from __future__ import annotations

import io
import re
import resource
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.predictor import InferenceConfig
from model.preprocess import processed_size, resize_image
from pipeline.inputs.decode import EMPTY_PIXELS, decode_batch, decode_image
from tests.pipeline.images import input_columns
from tests.pipeline.odd_inputs import OddInput, animated_gif, corpus, exif_jpeg, forged_jpeg, png_bomb

INFERENCE = InferenceConfig(min_size=64, max_size=107)
MAX_PIXELS = 89_478_485  # the job's default cap


@pytest.mark.parametrize("odd", corpus(), ids=lambda odd: odd.name)
def test_each_kind_decodes_or_fails_with_its_reason(odd: OddInput) -> None:
    data = odd.build()
    if odd.error is not None:
        with pytest.raises(ValueError, match="^" + re.escape(odd.error)):
            decode_image(data, max_pixels=MAX_PIXELS, inference=INFERENCE)
        return
    pixels, width, height = decode_image(data, max_pixels=MAX_PIXELS, inference=INFERENCE)
    assert (width, height) == odd.size
    size = processed_size(height, width, min_size=INFERENCE.min_size, max_size=INFERENCE.max_size)
    assert pixels.shape == (*size, 3) and pixels.dtype == np.uint8


def test_corpus_names_are_unique_and_cover_twenty_kinds() -> None:
    names = [odd.name for odd in corpus()]
    assert len(names) == len(set(names)) >= 20


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1)])  # 6: 90° clockwise, 8: counter-clockwise
def test_exif_rotation_gives_the_displayed_frame(orientation: int, turns: int) -> None:
    data = exif_jpeg(orientation, width=72, height=48)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # [48, 72, 3], orientation not applied
    displayed = np.ascontiguousarray(np.rot90(stored, k=turns))  # [72, 48, 3]
    pixels, width, height = decode_image(data, max_pixels=MAX_PIXELS, inference=INFERENCE)
    assert (height, width) == displayed.shape[:2] == (72, 48)
    size = processed_size(height, width, min_size=INFERENCE.min_size, max_size=INFERENCE.max_size)
    assert np.array_equal(pixels, resize_image(Image.fromarray(displayed), size))


def test_animated_gif_uses_the_first_frame() -> None:
    pixels, width, height = decode_image(animated_gif(), max_pixels=MAX_PIXELS, inference=INFERENCE)
    assert (width, height) == (50, 30)
    assert np.array_equal(np.unique(pixels.reshape(-1, 3), axis=0), [[255, 0, 0]])  # red, not green or blue


def test_pixel_cap_is_the_configured_one() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 80)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match=r"too many pixels \(rejected on the header\): 100x80 = 8000 > cap 7999"):
        decode_image(buffer.getvalue(), max_pixels=7999, inference=INFERENCE)
    _, width, height = decode_image(buffer.getvalue(), max_pixels=8000, inference=INFERENCE)
    assert (width, height) == (100, 80)


def test_wide_image_decodes_when_the_resize_keeps_a_pixel() -> None:
    """10000x8 has no pixel row left at min_size 64 / max_size 107, but one at the reference sizes."""
    odd = next(odd for odd in corpus() if odd.name == "wide_10000x8.png")
    pixels, width, height = decode_image(odd.build(), max_pixels=MAX_PIXELS, inference=InferenceConfig())
    assert (width, height) == (10_000, 8) and pixels.shape == (1, 1250, 3)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0), so ``ru_maxrss`` measures what follows.

    Without it an earlier test's peak (a model run, say) could hide a large allocation from ``ru_maxrss``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.parametrize("build", [forged_jpeg, png_bomb], ids=["forged_65000.jpg", "bomb_30000.png"])
def test_bombs_are_rejected_on_the_header_in_bounded_memory(build: Callable[[], bytes]) -> None:
    """A JPEG claiming 65000² (12.7 GB as RGB) and the 30000² PNG bomb (900 MB as palette pixels)."""
    data = build()
    assert len(data) < 200_000  # tiny files, huge headers
    if not _reset_peak_rss():
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure the peak RSS of one call")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(ValueError, match=r"^too many pixels \(rejected on the header\)"):
        decode_image(data, max_pixels=MAX_PIXELS, inference=INFERENCE)
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert growth_kib < 500 * 1024


def test_decode_batch_gives_one_row_per_input_with_the_error_or_the_size() -> None:
    odds = corpus()
    n = len(odds) + 1
    batch = {
        **input_columns([odd.name for odd in odds] + ["gone.jpg"]),
        "data": np.array([odd.build() for odd in odds] + [b""], dtype=object),
        "error": np.array([""] * len(odds) + ["not found: gone.jpg"], dtype=object),
    }
    out = decode_batch(batch, max_pixels=MAX_PIXELS, inference=INFERENCE)
    assert all(len(column) == n for column in out.values())
    assert list(out["image_id"]) == list(batch["image_id"])
    for i, odd in enumerate(odds):
        if odd.error is not None:
            assert odd.error in out["error"][i] and out["pixels"][i] is EMPTY_PIXELS
            assert out["width"][i] == out["height"][i] == 0
        else:
            assert out["error"][i] == "" and (out["width"][i], out["height"][i]) == odd.size
    assert out["error"][-1] == "not found: gone.jpg" and out["pixels"][-1] is EMPTY_PIXELS
    assert list(out["member"]) == [None] * n and not out["retryable"].any()  # passed through
