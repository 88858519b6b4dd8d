"""Panoptic merge: kept queries' mask logits -> one segment-id map at the original image size.

Reproduces upstream `PostProcessPanoptic` (threshold 0.85) pixel for pixel for an image run alone:

1. kept mask logits are bilinearly upsampled (align_corners=False) to the processed size — after the
   caller cropped canvas padding at stride 4, so padded images are not stretched (upstream stretches);
2. pixel id = argmax over kept queries of the softmax over queries (no score weighting);
3. first pass only: every pixel of a stuff class predicted by several queries goes to the class's first
   query; then segments of area <= 4 px (at the original size) are dropped and the argmax recomputed over
   the rest, without that relabelling, until none is small;
4. the id map is resized to the original size with PIL NEAREST semantics; areas are counted there.

With no kept query (or none left) the map is all 0 and there are no segments. Segment ids are 0..S-1
in query order; id 0 is a real segment when segments exist.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from model.categories import is_thing

SMALL_SEGMENT_AREA = 4  # segments with area <= this many pixels are dropped (upstream rule)


class Segment(NamedTuple):
    id: int  # index in the id map
    category_id: int  # COCO panoptic category id (the class slot)
    isthing: bool
    score: float  # class probability of the query
    area: int  # pixels at the original image size
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels at the original image size


class PanopticResult(NamedTuple):
    id_map: np.ndarray  # [H, W] segment ids at the original image size: uint8 (int32 beyond 256 segments)
    segments: list[Segment]


def pil_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel for a PIL NEAREST resize along one axis -> int64 [size_out].

    PIL walks the output with an accumulated double-precision step (scale = in/out, first sample at
    scale/2) and truncates; a cumulative sum reproduces its rounding exactly.
    """
    steps = np.full(size_out, size_in / size_out, dtype=np.float64)
    steps[0] *= 0.5
    return np.clip(np.cumsum(steps).astype(np.int64), 0, size_in - 1)


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


def merge_panoptic(
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    processed_size: tuple[int, int],
    original_size: tuple[int, int],
) -> PanopticResult:
    """Merge one image's kept queries into a panoptic map.

    scores, labels: [k] of the kept queries in query order; mask_logits: [k, h4, w4] at stride 4 of the
    processed (unpadded) image; processed_size / original_size: (height, width).
    """
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

    alive = list(range(len(label_list)))  # indices into the kept queries
    first_pass = True
    while True:
        id_map = _argmax_ids(masks[alive], original_size)  # [H, W] ids into `alive`
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

    # Sent back in the smallest type: at full size the map is the largest device-to-host copy of an image.
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


def _argmax_ids(masks: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """[k, h, w] logits -> [H, W] int64 index of the winning query, resized PIL-NEAREST to the original size."""
    ids = masks.softmax(0).argmax(0)  # [h, w]; softmax first, as upstream (ties resolve identically)
    return resize_nearest(ids, original_size)  # [H, W]
