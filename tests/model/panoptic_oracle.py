"""The panoptic merge as it was before it worked at the processed size: the oracle of `model.panoptic`.

A verbatim copy of the full-resolution implementation (the id map PIL-NEAREST resized to the original size as
int64 on every pass of the small-segment loop, areas and boxes counted there with int64 copies and ``nonzero``
index arrays). It is kept here, in tests only, to check that `model.panoptic.merge_panoptic` gives the same id
map, areas and boxes bit for bit, and by `bench/postprocess_memory.py` as the "before" of its figures.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.categories import is_thing
from model.panoptic import SMALL_SEGMENT_AREA, PanopticResult, Segment, pil_nearest_indices


def resize_nearest(id_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL-NEAREST resize of an integer map [h, w] to (height, width)."""
    h, w = id_map.shape
    if (h, w) == tuple(size):
        return id_map
    rows = torch.from_numpy(pil_nearest_indices(h, size[0])).to(id_map.device)  # [H]
    cols = torch.from_numpy(pil_nearest_indices(w, size[1])).to(id_map.device)  # [W]
    return id_map.index_select(0, rows).index_select(1, cols)  # [H, W]


def areas_and_boxes(id_map: np.ndarray, num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and [x, y, w, h] box of ids 0..S-1 in one pass -> (int64 [S], int64 [S, 4])."""
    height, width = id_map.shape
    ids = id_map.astype(np.int64)
    valid = (ids >= 0) & (ids < num_segments)
    areas = np.bincount(ids[valid], minlength=num_segments)[:num_segments]
    rows_hit = np.zeros((height, num_segments), dtype=bool)
    cols_hit = np.zeros((width, num_segments), dtype=bool)
    r, c = np.nonzero(valid)
    rows_hit[r, ids[r, c]] = True
    cols_hit[c, ids[r, c]] = True
    boxes = np.zeros((num_segments, 4), dtype=np.int64)
    present = areas > 0
    y0 = rows_hit.argmax(0)
    y1 = height - 1 - rows_hit[::-1].argmax(0)
    x0 = cols_hit.argmax(0)
    x1 = width - 1 - cols_hit[::-1].argmax(0)
    boxes[present] = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)[present]
    return areas, boxes


def merge_panoptic_full_size(
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    processed_size: tuple[int, int],
    original_size: tuple[int, int],
) -> PanopticResult:
    """`model.panoptic.merge_panoptic` as it was: every pass of the loop at the original size, in int64."""
    height, width = original_size
    if labels.numel() == 0:
        return PanopticResult(np.zeros((height, width), dtype=np.uint8), [])
    masks = F.interpolate(mask_logits[:, None].float(), size=processed_size, mode="bilinear", align_corners=False)[
        :, 0
    ]  # [k, h, w]
    label_list = [int(x) for x in labels.tolist()]
    stuff_queries: dict[int, list[int]] = {}
    for k, label in enumerate(label_list):
        if not is_thing(label):
            stuff_queries.setdefault(label, []).append(k)

    alive = list(range(len(label_list)))
    first_pass = True
    while True:
        id_map = resize_nearest(masks[alive].softmax(0).argmax(0), original_size)  # [H, W] int64
        if first_pass:
            for same_class in stuff_queries.values():
                for k in same_class[1:]:
                    id_map[id_map == k] = same_class[0]
        areas = torch.bincount(id_map.flatten(), minlength=len(alive))
        small = [i for i in range(len(alive)) if areas[i] <= SMALL_SEGMENT_AREA]
        if not small:
            break
        alive = [k for i, k in enumerate(alive) if i not in set(small)]
        first_pass = False
        if not alive:
            return PanopticResult(np.zeros((height, width), dtype=np.uint8), [])

    id_np = id_map.to(torch.uint8 if len(alive) <= 256 else torch.int32).cpu().numpy()  # [H, W]
    areas_np, boxes = areas_and_boxes(id_np, len(alive))
    scores_list = scores.tolist()
    segments = [
        Segment(
            id=i,
            category_id=label_list[k],
            isthing=is_thing(label_list[k]),
            score=float(scores_list[k]),
            area=int(areas_np[i]),
            bbox=tuple(int(v) for v in boxes[i]),  # type: ignore[arg-type]
        )
        for i, k in enumerate(alive)
    ]
    return PanopticResult(id_np, segments)
