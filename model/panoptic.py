"""Panoptic merge: kept queries' mask logits -> one segment-id map at the original image size.

Reproduces upstream `PostProcessPanoptic` (threshold 0.85) pixel for pixel for an image run alone:

1. kept mask logits are bilinearly upsampled (align_corners=False) to the processed size — after the
   caller cropped canvas padding at stride 4, so padded images are not stretched (upstream stretches);
2. pixel id = argmax over kept queries of the softmax over queries (no score weighting);
3. first pass only: every pixel of a stuff class predicted by several queries goes to the class's first
   query; then segments of area <= 4 px (at the original size) are dropped and the argmax recomputed over
   the rest, without that relabelling, until none is small;
4. the id map is resized to the original size with PIL NEAREST semantics; areas are counted there.

Memory: that resize copies source pixels, so steps 3 and 4 run at the processed size (each source pixel
weighing as many original pixels as copy it, `NearestResize`) and the one map made at the original size is
the result, in the narrowest dtype (1 byte per pixel up to 256 segments, else 4): an image's post-processing
holds H·W bytes at its original size plus O(k·h·w) at the processed size, with no int64 or index array of
H·W elements. The full-size implementation this replaced is the oracle in ``tests/model/panoptic_oracle.py``.

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
    """PIL-NEAREST resize of an integer map [h, w] to (height, width), in the map's own dtype."""
    h, w = id_map.shape
    if (h, w) == tuple(size):
        return id_map
    rows = torch.from_numpy(pil_nearest_indices(h, size[0])).to(id_map.device)  # [H]
    cols = torch.from_numpy(pil_nearest_indices(w, size[1])).to(id_map.device)  # [W]
    return id_map.index_select(0, rows).index_select(1, cols)  # [h, w] -> [H, w] -> [H, W]


class NearestResize(NamedTuple):
    """A PIL-NEAREST resize from (h, w) to (H, W) as its two axes: the source row of each output row and the
    source column of each output column (each non-decreasing). Output pixel (Y, X) is source pixel
    (rows[Y], cols[X]), so whatever is counted at the original size can be counted at the source size with
    each source pixel weighted by how many output pixels copy it."""

    rows: np.ndarray  # int64 [H]
    cols: np.ndarray  # int64 [W]

    @classmethod
    def between(cls, source: tuple[int, int], target: tuple[int, int]) -> NearestResize:
        return cls(pil_nearest_indices(source[0], target[0]), pil_nearest_indices(source[1], target[1]))

    def pixel_weights(self, source: tuple[int, int]) -> np.ndarray:
        """float64 [h, w]: how many output pixels copy each source pixel (0 for a source pixel no output
        pixel samples, when the resize shrinks). Integers, so sums of them are exact below 2^53."""
        row_copies = np.bincount(self.rows, minlength=source[0])  # [h]
        col_copies = np.bincount(self.cols, minlength=source[1])  # [w]
        return np.outer(row_copies.astype(np.float64), col_copies)  # [h, w]


def areas_and_boxes(
    id_map: np.ndarray, num_segments: int, resize: NearestResize | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and [x, y, w, h] box of ids 0..S-1 of ``id_map`` [h, w] -> (int64 [S], int64 [S, 4]), or,
    given ``resize``, of the map that resize makes of it, without making it: the areas and boxes at the
    original size are counted on the source map (memory O(h·w + (h + w)·S), none of it at the original size).

    Ids outside 0..S-1 are not counted; an id absent from the map has area 0 and box (0, 0, 0, 0).
    """
    height, width = id_map.shape
    if resize is None:
        resize = NearestResize(np.arange(height), np.arange(width))
    # Only the source rows and columns some output pixel copies count; each gets the output span it fills.
    rows, first_y, last_y = _spans(resize.rows)  # [h'] source rows, first and last output row of each
    cols, first_x, last_x = _spans(resize.cols)  # [w']
    sampled = id_map[np.ix_(rows, cols)] if (len(rows), len(cols)) != (height, width) else id_map  # [h', w']
    ids = sampled.astype(np.intp, copy=False)  # [h', w'] (a fancy index is intp anyway)
    valid = (ids >= 0) & (ids < num_segments)  # [h', w']
    weights = np.outer((last_y - first_y + 1).astype(np.float64), last_x - first_x + 1)  # [h', w'] copies
    areas = np.bincount(ids[valid], weights=weights[valid], minlength=num_segments)[:num_segments]
    areas = np.rint(areas).astype(np.int64)  # [S] exact: integer sums below 2^53
    safe = np.where(valid, ids, num_segments)  # [h', w'] an extra column for ids not counted
    rows_hit = np.zeros((len(rows), num_segments + 1), dtype=bool)  # [h', S + 1]
    cols_hit = np.zeros((len(cols), num_segments + 1), dtype=bool)  # [w', S + 1]
    rows_hit[np.arange(len(rows))[:, None], safe] = True
    cols_hit[np.arange(len(cols))[None, :], safe] = True
    rows_hit, cols_hit = rows_hit[:, :num_segments], cols_hit[:, :num_segments]
    boxes = np.zeros((num_segments, 4), dtype=np.int64)
    present = areas > 0
    y0 = first_y[rows_hit.argmax(0)]  # [S] first output row of the first source row holding the id
    y1 = last_y[len(rows) - 1 - rows_hit[::-1].argmax(0)]
    x0 = first_x[cols_hit.argmax(0)]
    x1 = last_x[len(cols) - 1 - cols_hit[::-1].argmax(0)]
    boxes[present] = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)[present]
    return areas, boxes


def _spans(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of a non-decreasing source index per output position: the distinct sources, and the first and last
    output position that copies each -> three int64 [n']."""
    starts = np.flatnonzero(np.diff(index, prepend=-1))  # [n'] first output position of each run
    ends = np.append(starts[1:], len(index))[: len(starts)] - 1  # [n'] last output position of each run
    return index[starts], starts, ends


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

    # Every pass works at the processed size: the resize to the original size is a pure gather (see
    # `NearestResize`), so relabelling commutes with it and each pixel's area at the original size is its
    # number of copies. Only the final map is resized, once, in the narrowest dtype.
    resize = NearestResize.between(processed_size, original_size)
    weights = torch.from_numpy(resize.pixel_weights(processed_size)).to(masks.device).flatten()  # [h·w] float64
    alive = list(range(len(label_list)))  # indices into the kept queries
    live = masks  # [k', h, w] the logits of the queries in `alive` (narrowed, not copied whole, on each pass)
    first_pass = True
    while True:
        ids = live.softmax(0).argmax(0)  # [h, w]; softmax first, as upstream (ties resolve identically)
        if first_pass:
            for same_class in stuff_queries.values():
                for k in same_class[1:]:
                    ids[ids == k] = same_class[0]
        areas = torch.bincount(ids.flatten(), weights=weights, minlength=len(alive))  # [k'] float64, exact
        small = [i for i in range(len(alive)) if areas[i] <= SMALL_SEGMENT_AREA]
        if not small:
            break
        kept = [i for i in range(len(alive)) if i not in set(small)]
        alive = [alive[i] for i in kept]
        live = live[kept] if kept else live[:0]  # [k'', h, w]
        first_pass = False
        if not alive:
            return PanopticResult(np.zeros((height, width), dtype=np.uint8), [])

    # Sent back in the smallest type: at full size the map is the largest device-to-host copy of an image.
    narrow = ids.to(torch.uint8 if len(alive) <= 256 else torch.int32)  # [h, w]
    id_np = resize_nearest(narrow, original_size).cpu().numpy()  # [H, W]
    areas_np, boxes = areas_and_boxes(narrow.cpu().numpy(), len(alive), resize)
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
