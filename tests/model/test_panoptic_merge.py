"""The panoptic merge against hand-built cases and against a literal re-implementation of upstream's code."""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.panoptic import areas_and_boxes, merge_panoptic, pil_nearest_indices


def _blocks(h: int, w: int, regions: list[tuple[slice, slice]], high: float = 5.0) -> torch.Tensor:
    """Mask logits [k, h, w]: query i is `high` inside its region and 0 elsewhere."""
    logits = torch.zeros(len(regions), h, w)
    for i, (rows, cols) in enumerate(regions):
        logits[i, rows, cols] = high
    return logits


def _merge(labels: list[int], logits: torch.Tensor, size: tuple[int, int], original: tuple[int, int] | None = None):
    scores = torch.linspace(0.9, 0.99, len(labels))
    return merge_panoptic(scores, torch.tensor(labels), logits, processed_size=size, original_size=original or size)


def test_no_detection_gives_all_zero_map_and_no_segments() -> None:
    result = _merge([], torch.zeros(0, 4, 5), (16, 20), (30, 41))
    assert result.segments == []
    assert result.id_map.shape == (30, 41) and result.id_map.dtype == np.uint8 and not result.id_map.any()


def test_thing_instances_of_one_class_stay_apart() -> None:
    # Logits at stride 4 given directly at the processed size (4x4 -> 4x4 means no resize).
    logits = _blocks(8, 8, [(slice(0, 8), slice(0, 4)), (slice(0, 8), slice(4, 8))])
    result = _merge([1, 1], logits, (8, 8))
    assert [(s.id, s.category_id, s.isthing, s.area) for s in result.segments] == [(0, 1, True, 32), (1, 1, True, 32)]
    assert result.id_map.dtype == np.uint8  # sent back from the device in the smallest type
    assert (result.id_map[:, :4] == 0).all() and (result.id_map[:, 4:] == 1).all()
    assert result.segments[1].bbox == (4, 0, 4, 8)


def test_stuff_duplicates_are_dropped_not_unioned() -> None:
    """Upstream: duplicates of a stuff class are relabelled on the first pass only, then dropped (area 0);
    their pixels go to whichever remaining query wins the new argmax."""
    h, w = 12, 12
    logits = torch.zeros(3, h, w)
    logits[0, :, 0:4] = 5.0  # query 0: stuff 100, left band
    logits[1, :, 4:8] = 5.0  # query 1: thing 5, middle band
    logits[2, :, 8:12] = 5.0  # query 2: stuff 100 again, right band...
    logits[1, :, 8:12] = 4.0  # ...where the thing query is the runner-up, the stuff query 0 is not
    result = _merge([100, 5, 100], logits, (h, w))
    assert [(s.category_id, s.area) for s in result.segments] == [(100, 48), (5, 96)]
    assert (result.id_map[:, 0:4] == 0).all() and (result.id_map[:, 4:12] == 1).all()


def test_tiny_segments_are_dropped_and_their_pixels_reassigned() -> None:
    h, w = 10, 10
    logits = torch.zeros(3, h, w)
    logits[0, :, :5] = 3.0
    logits[1, :, 5:] = 3.0
    logits[2, 0:2, 0:2] = 9.0  # 4 pixels: area <= 4 -> dropped
    logits[1, 0:2, 0:2] = 4.0  # ...and those pixels then go to query 1, not to the surrounding query 0
    result = _merge([1, 2, 3], logits, (h, w))
    assert [s.category_id for s in result.segments] == [1, 2]
    assert result.segments[0].area == 46 and result.segments[1].area == 54
    assert (result.id_map[0:2, 0:2] == 1).all()


def test_labels_above_200_are_stuff_and_do_not_crash() -> None:
    logits = _blocks(8, 8, [(slice(0, 8), slice(0, 4)), (slice(0, 8), slice(4, 8))])
    result = _merge([201, 249], logits, (8, 8))
    assert [(s.category_id, s.isthing) for s in result.segments] == [(201, False), (249, False)]


@pytest.mark.parametrize(("size_in", "size_out"), [(5, 13), (13, 5), (800, 333), (333, 800), (1066, 1067), (7, 7)])
def test_pil_nearest_indices_equal_pil(size_in: int, size_out: int) -> None:
    source = np.arange(size_in, dtype=np.int32)[None, :].repeat(2, 0)
    resized = np.asarray(Image.fromarray(source).resize((size_out, 2), Image.NEAREST))
    assert np.array_equal(resized[0], pil_nearest_indices(size_in, size_out))


def test_areas_and_boxes_hand_computed() -> None:
    id_map = np.array([[0, 0, 1], [2, 0, 1], [2, 2, 1]], dtype=np.int32)
    areas, boxes = areas_and_boxes(id_map, 4)
    assert areas.tolist() == [3, 3, 3, 0]
    assert boxes.tolist() == [[0, 0, 2, 2], [2, 0, 1, 3], [0, 1, 2, 2], [0, 0, 0, 0]]


# ---- a literal re-implementation of upstream PostProcessPanoptic (PNG round trip and all) as the oracle ----


def _id2rgb(id_map: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*id_map.shape, 3), dtype=np.uint8)
    ids = id_map.copy()
    for c in range(3):
        rgb[..., c] = ids % 256
        ids //= 256
    return rgb


def _rgb2id(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _upstream_merge(labels: torch.Tensor, masks: torch.Tensor, size: tuple[int, int], target: tuple[int, int]):
    is_thing = {i: i <= 90 for i in range(201)}
    cur_masks = F.interpolate(masks[:, None], size, mode="bilinear").squeeze(1)
    h, w = cur_masks.shape[-2:]
    cur_masks = cur_masks.flatten(1)
    cur_classes = labels
    stuff_equiv = defaultdict(list)
    for k, label in enumerate(cur_classes):
        if not is_thing[label.item()]:
            stuff_equiv[label.item()].append(k)

    def get_ids_area(masks: torch.Tensor, n: int, dedup: bool = False):
        m_id = masks.transpose(0, 1).softmax(-1)
        m_id = torch.zeros((h, w), dtype=torch.long) if m_id.shape[-1] == 0 else m_id.argmax(-1).view(h, w)
        if dedup:
            for equiv in stuff_equiv.values():
                if len(equiv) > 1:
                    for eq_id in equiv:
                        m_id.masked_fill_(m_id.eq(eq_id), equiv[0])
        img = Image.fromarray(_id2rgb(m_id.view(h, w).numpy())).resize((target[1], target[0]), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        final = _rgb2id(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        return [int((final == i).sum()) for i in range(n)], final

    area, final = get_ids_area(cur_masks, len(cur_classes), dedup=True)
    if cur_classes.numel() > 0:
        while True:
            small = torch.as_tensor([area[i] <= 4 for i in range(len(cur_classes))], dtype=torch.bool)
            if not small.any():
                break
            cur_classes, cur_masks = cur_classes[~small], cur_masks[~small]
            area, final = get_ids_area(cur_masks, len(cur_classes))
    return final, [(int(c), a) for c, a in zip(cur_classes.tolist(), area)]


@pytest.mark.parametrize("seed", range(12))
def test_merge_equals_upstream_pixel_for_pixel(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 9))
    h4, w4 = int(rng.integers(3, 12)), int(rng.integers(3, 12))
    size = (int(rng.integers(h4 * 3, h4 * 4 + 1)), int(rng.integers(w4 * 3, w4 * 4 + 1)))
    target = (int(rng.integers(5, 90)), int(rng.integers(5, 90)))
    # Smooth random logits so that regions, not single pixels, win; a few stuff duplicates on purpose.
    coarse = torch.from_numpy(rng.normal(0, 3, (k, max(2, h4 // 2), max(2, w4 // 2))).astype(np.float32))
    masks = F.interpolate(coarse[None], size=(h4, w4), mode="bilinear")[0]
    labels = torch.from_numpy(rng.choice([1, 3, 18, 100, 100, 150, 184], size=k)).long()
    expected_map, expected_segments = _upstream_merge(labels, masks, size, target)

    result = merge_panoptic(torch.full((k,), 0.9), labels, masks, processed_size=size, original_size=target)
    assert [(s.category_id, s.area) for s in result.segments] == expected_segments
    if result.segments:
        assert np.array_equal(result.id_map, expected_map)
    else:
        assert not result.id_map.any() and not expected_map.any()
