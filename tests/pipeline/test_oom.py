"""A CUDA out-of-memory error on a batch: the actor retries the halves, down to one image; an image that
still does not fit becomes a retryable error row, and every other image gets its result (no GPU needed: the
predictor raises the error the way torch does)."""

from __future__ import annotations

import numpy as np
import torch

from model.panoptic import PanopticResult, Segment
from model.predictor import InferenceConfig, PreparedImage
from pipeline.segmenting.predict import PanopticSegmenter
from tests.pipeline.images import input_columns

HUGE = 40  # images at least this wide "do not fit" on their own


class _FitsBelowBudget:
    """Stands in for `PanopticPredictor`: raises OutOfMemoryError when a batch's pixels exceed a budget."""

    config = InferenceConfig()

    def __init__(self, budget: int) -> None:
        self.budget, self.calls = budget, []

    def predict_prepared(self, images: list[PreparedImage]) -> list[PanopticResult]:
        self.calls.append(len(images))
        if sum(im.pixels.shape[0] * im.pixels.shape[1] for im in images) > self.budget:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        results = []
        for im in images:
            height, width = im.original_size
            id_map = np.zeros((height, width), dtype=np.uint8)
            results.append(PanopticResult(id_map, [Segment(0, 1, True, 0.9, height * width, (0, 0, width, height))]))
        return results


def _batch(widths: list[int]) -> dict[str, np.ndarray]:
    pixels = np.empty(len(widths), dtype=object)
    pixels[:] = [np.zeros((10, w, 3), dtype=np.uint8) for w in widths]
    return {
        **input_columns([f"img{i}" for i in range(len(widths))], source="s"),
        "pixels": pixels,
        "width": np.array(widths, dtype=np.int32),
        "height": np.full(len(widths), 10, dtype=np.int32),
        "error": np.array([""] * len(widths), dtype=object),
    }


def _segmenter(budget: int) -> PanopticSegmenter:
    segmenter = PanopticSegmenter.__new__(PanopticSegmenter)  # no model: the predictor is the stand-in
    segmenter.device, segmenter.encode_rle = torch.device("cpu"), True
    segmenter.predictor = _FitsBelowBudget(budget)  # type: ignore[assignment]
    return segmenter


def test_batch_that_does_not_fit_is_split_and_the_huge_image_is_an_error_row() -> None:
    widths = [8, 8, 8, HUGE, 8, 8, 8, 8]
    segmenter = _segmenter(budget=10 * 8 * 3)  # three small images fit at once; the huge one never does
    rows = segmenter(_batch(widths)).to_pylist()
    assert [r["image_id"] for r in rows] == [f"img{i}" for i in range(8)]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "ok", "ok", "ok", "ok"]
    assert rows[3]["error"] == "CUDA out of memory on this single image" and rows[3]["retryable"]
    assert not any(r["retryable"] for i, r in enumerate(rows) if i != 3)
    assert all(r["segments"][0]["area"] == 10 * w for r, w in zip(rows, widths) if r["status"] == "ok")
    # 8 -> 4 + 4 -> (2 + 2) + (2 + 2) -> the pair with the huge image splits once more
    assert segmenter.predictor.calls == [8, 4, 2, 2, 1, 1, 4, 2, 2]  # type: ignore[attr-defined]


def test_batch_that_fits_runs_once() -> None:
    segmenter = _segmenter(budget=10**9)
    rows = segmenter(_batch([8, HUGE, 8])).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert segmenter.predictor.calls == [3]  # type: ignore[attr-defined]
