"""`merge_panoptic` counts areas and boxes at the processed size and resizes once, in the narrowest dtype: its
id map, areas and boxes must equal, bit for bit, those of the full-size implementation it replaced (the oracle
`tests.model.panoptic_oracle`), whatever the sizes, the number of segments, or an empty result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.panoptic import NearestResize, areas_and_boxes, merge_panoptic, resize_nearest
from tests.model import panoptic_oracle as oracle


def _smooth_logits(rng: np.random.Generator, k: int, h4: int, w4: int) -> torch.Tensor:
    """Mask logits [k, h4, w4] whose winners form regions, not single pixels."""
    coarse = torch.from_numpy(rng.normal(0, 3, (k, max(2, h4 // 2), max(2, w4 // 2))).astype(np.float32))
    return F.interpolate(coarse[None], size=(h4, w4), mode="bilinear")[0]


def _assert_same(labels: torch.Tensor, logits: torch.Tensor, size: tuple[int, int], target: tuple[int, int]) -> None:
    scores = torch.linspace(0.86, 0.99, len(labels))
    new = merge_panoptic(scores, labels, logits, processed_size=size, original_size=target)
    old = oracle.merge_panoptic_full_size(scores, labels, logits, processed_size=size, original_size=target)
    assert new.segments == old.segments  # ids, categories, scores, areas, boxes
    assert new.id_map.dtype == old.id_map.dtype and new.id_map.shape == target
    assert np.array_equal(new.id_map, old.id_map)


# (processed size, original size): enlarged (the usual case, by odd ratios), shrunk (an image smaller than
# --min-size is enlarged to be processed), equal, one-pixel sides, and EXIF-rotated originals (portrait
# processed size of a landscape file: the predictor passes the size after orientation, which the processed
# size follows)
SIZES = [
    ((36, 48), (300, 401)),
    ((48, 36), (401, 300)),  # the same photo rotated by its EXIF orientation
    ((40, 53), (3000 // 7, 4000 // 7)),
    ((37, 29), (37, 29)),
    ((60, 80), (23, 31)),
    ((61, 47), (59, 49)),  # some rows shrink while some columns grow
    ((12, 400), (1, 799)),
    ((400, 12), (799, 3)),
]


@pytest.mark.parametrize(("size", "target"), SIZES)
@pytest.mark.parametrize("seed", range(4))
def test_merge_equals_the_full_size_oracle(size: tuple[int, int], target: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 16))
    h4, w4 = -(-size[0] // 4), -(-size[1] // 4)
    labels = torch.from_numpy(rng.choice([1, 3, 18, 100, 100, 150, 184, 201], size=k)).long()  # stuff duplicates
    _assert_same(labels, _smooth_logits(rng, k, h4, w4), size, target)


def test_more_than_256_segments_use_int32_and_match() -> None:
    """300 queries, each winning its own 4×5 block: the map needs int32, and every segment survives."""
    h, w, k = 60, 100, 300
    logits = torch.zeros(k, h, w)
    for q in range(k):
        r, c = divmod(q, w // 5)
        logits[q, 4 * r : 4 * r + 4, 5 * c : 5 * c + 5] = 9.0
    labels = torch.ones(k, dtype=torch.long)
    target = (97, 151)
    new = merge_panoptic(torch.full((k,), 0.9), labels, logits, processed_size=(h, w), original_size=target)
    assert new.id_map.dtype == np.int32 and len(new.segments) == k
    _assert_same(labels, logits, (h, w), target)


def test_small_segments_dropped_by_their_area_at_the_original_size() -> None:
    """A segment of 2 pixels at the processed size survives when the resize makes it 5 or more pixels, and is
    dropped when it stays at 4 or fewer: the rule counts at the original size, as the oracle does."""
    logits = torch.zeros(2, 10, 10)
    logits[0] = 3.0
    logits[1, 0, 0:2] = 9.0  # 2 processed pixels
    labels = torch.tensor([100, 1])
    for target in [(10, 10), (20, 20), (15, 10), (21, 30), (5, 5)]:
        _assert_same(labels, logits, (10, 10), target)
    grown = merge_panoptic(torch.full((2,), 0.9), labels, logits, processed_size=(10, 10), original_size=(20, 20))
    assert [s.area for s in grown.segments] == [392, 8]


def test_empty_results_match() -> None:
    _assert_same(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, 5), (16, 20), (31, 43))
    every_segment_tiny = torch.zeros(2, 2, 2)
    every_segment_tiny[1, 0, 0] = 5.0  # query 1: 1 pixel, query 0: 3 pixels, at a size that keeps them small
    labels = torch.tensor([1, 2])
    _assert_same(labels, every_segment_tiny, (2, 2), (2, 2))
    result = merge_panoptic(
        torch.full((2,), 0.9), labels, every_segment_tiny, processed_size=(2, 2), original_size=(2, 2)
    )
    assert result.segments == [] and result.id_map.dtype == np.uint8 and not result.id_map.any()


@pytest.mark.parametrize("seed", range(6))
def test_areas_and_boxes_through_a_resize_equal_those_of_the_resized_map(seed: int) -> None:
    """Ids outside 0..S-1 (negative, too large) are not counted, absent ids get zeros, in both."""
    rng = np.random.default_rng(seed)
    source = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    target = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
    id_map = rng.integers(-2, 9, size=source).astype(np.int32)  # S = 7: ids 7, 8 and -1, -2 are not counted
    resize = NearestResize.between(source, target)
    resized = resize_nearest(torch.from_numpy(id_map), target).numpy()
    areas, boxes = areas_and_boxes(id_map, 7, resize)
    expected_areas, expected_boxes = oracle.areas_and_boxes(resized, 7)
    assert np.array_equal(areas, expected_areas) and np.array_equal(boxes, expected_boxes)
    assert areas.dtype == boxes.dtype == np.int64


def test_the_resized_map_keeps_its_dtype() -> None:
    narrow = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    assert resize_nearest(narrow, (7, 9)).dtype == torch.uint8
    assert np.array_equal(resize_nearest(narrow, (7, 9)).numpy(), oracle.resize_nearest(narrow.long(), (7, 9)).numpy())
