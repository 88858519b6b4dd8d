"""COCO compressed RLE of a panoptic id map: every segment encoded in one vectorised pass, and the map rebuilt.

COCO RLE is column-major (Fortran order): the counts alternate between runs of 0s and runs of 1s, starting
with a (possibly empty) run of 0s; the last run is always written, so a mask that ends in 1s has no trailing
0-run. The compressed string is pycocotools' ``rleToString``: from the fourth count on, each count is stored
as its difference to the count two places before; each value is written as signed 5-bit groups, low group
first, ``+ 48``, with ``0x20`` marking that another group follows.

`encode_segments` finds the runs of *all* segment ids at once (one comparison of neighbouring rows of the
map, then the few change positions put in column-major order), turns each segment's runs into its
alternating counts, and writes every counts string with numpy, so the per-segment Python work is one slice
of a shared string. The output is byte-identical to
``pycocotools.mask.encode(np.asfortranarray(id_map == s))`` for each ``s``; ``area`` and ``bbox`` equal
``pycocotools.mask.area`` / ``toBbox`` of that RLE.

(Compressing the counts through ``pycocotools.mask.frPyObjects`` instead is also byte-identical but slower:
see ``bench/rle.py``.)

Decoding, for the readers of an output: `decode_rle` / `decode_mask` give one bool mask; `panoptic_map` rebuilds
an image's id map from its segment rows (`VOID_ID` where no segment is), the inverse of `encode_segments`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as coco_mask

__all__ = ["VOID_ID", "EncodedSegment", "decode_mask", "decode_rle", "encode_segments", "panoptic_map"]

VOID_ID = -1  # value of `panoptic_map` pixels covered by no segment


class EncodedSegment(NamedTuple):
    """One segment's COCO RLE plus the statistics computed with it.

    ``size`` is ``(H, W)`` in pixels; ``counts`` the COCO compressed counts string (ASCII); ``area`` the
    number of pixels; ``bbox`` ``(x, y, w, h)`` in integer pixels, ``(0, 0, 0, 0)`` for an empty segment.
    """

    size: tuple[int, int]
    counts: str
    area: int
    bbox: tuple[int, int, int, int]


def encode_segments(id_map: np.ndarray, segment_ids: Sequence[int]) -> list[EncodedSegment]:
    """Encode the mask ``id_map == s`` of every ``s`` in ``segment_ids`` as COCO compressed RLE.

    Args:
        id_map: ``[H, W]`` integer segment ids (int32 in the pipeline), any memory layout. Pixels whose value
            is not requested (background, negative ids, ...) are 0 in every mask.
        segment_ids: the ids to encode, in output order; ids absent from the map give an empty mask
            (``area == 0``), repeated ids give repeated results.

    Returns:
        One `EncodedSegment` per entry of ``segment_ids``, in the same order.
    """
    if id_map.ndim != 2:
        raise ValueError(f"id_map must be 2-D [H, W], got shape {id_map.shape}")
    if not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"id_map must have an integer dtype, got {id_map.dtype}")
    height, width = (int(v) for v in id_map.shape)
    size = (height, width)
    wanted = np.asarray(segment_ids, dtype=np.int64).reshape(-1)  # [S]
    if wanted.size == 0:
        return []
    unique_ids, back = np.unique(wanted, return_inverse=True)  # [U], [S]

    runs = _segment_runs(id_map, unique_ids)
    counts, num_counts = _alternating_counts(runs, height * width, len(unique_ids))
    text, num_chars = _compress(counts, num_counts)

    char_end = np.cumsum(num_chars).tolist()  # [U]
    char_start = [0, *char_end[:-1]]
    areas = runs.areas.tolist()
    boxes = runs.boxes.tolist()
    per_unique = [
        EncodedSegment(size, text[a:b], area, tuple(box)) for a, b, area, box in zip(char_start, char_end, areas, boxes)
    ]
    return [per_unique[u] for u in back.reshape(-1).tolist()]


def decode_rle(size: Sequence[int], counts: str | bytes) -> np.ndarray:
    """Decode a COCO compressed RLE of ``size`` ``(H, W)`` to a bool mask ``[H, W]``."""
    height, width = (int(v) for v in size)
    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    return coco_mask.decode({"size": [height, width], "counts": raw}).astype(bool)


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode one ``rle`` struct (``{"size": [h, w], "counts": str}``) to a bool mask ``[h, w]``."""
    return decode_rle(rle["size"], rle["counts"])


def panoptic_map(
    segments_rows: Iterable[Mapping[str, Any]], *, height: int | None = None, width: int | None = None
) -> np.ndarray:
    """Rebuild one image's id map ``[H, W]`` int32 from its segment rows (``segment_id`` + ``rle``).

    Pixel value = the ``segment_id`` covering it, :data:`VOID_ID` (-1) where no segment does. Segments
    of one image are disjoint by construction; if rows overlap anyway, the later row wins. ``height`` /
    ``width`` are needed only for an image without segments; when given they must match every mask.
    """
    id_map: np.ndarray | None = None
    if height is not None and width is not None:
        id_map = np.full((height, width), VOID_ID, dtype=np.int32)  # [H, W]
    for row in segments_rows:
        mask = decode_mask(row["rle"])  # [H, W] bool
        if id_map is None:
            id_map = np.full(mask.shape, VOID_ID, dtype=np.int32)
        if mask.shape != id_map.shape:
            raise ValueError(
                f"segment {row['segment_id']} has mask size {list(mask.shape)}, expected {list(id_map.shape)}"
            )
        id_map[mask] = int(row["segment_id"])
    if id_map is None:
        raise ValueError("an image without segments needs height= and width=")
    return id_map


class _Runs(NamedTuple):
    """The runs of 1s of every requested segment, grouped by segment, in column-major order within each."""

    starts: np.ndarray  # [R] int64, first column-major index of the run
    ends: np.ndarray  # [R] int64, one past the last index
    segment: np.ndarray  # [R] int64, index into the unique requested ids (non-decreasing)
    num_runs: np.ndarray  # [U] int64
    areas: np.ndarray  # [U] int64
    boxes: np.ndarray  # [U, 4] int64, x, y, w, h


def _segment_runs(id_map: np.ndarray, unique_ids: np.ndarray) -> _Runs:
    """Find the maximal constant runs of the column-major map and keep those of the requested ids."""
    height, width = id_map.shape
    n = height * width
    num_unique = len(unique_ids)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        zeros = np.zeros(num_unique, dtype=np.int64)
        return _Runs(empty, empty, empty, zeros, zeros, np.zeros((num_unique, 4), dtype=np.int64))

    # Column-major index p = x·H + y. A run starts where a pixel differs from the one above it, or at the top
    # of a column whose first pixel differs from the bottom of the previous column. Comparing rows of the
    # row-major map and reordering the (few) change positions is much faster than a Fortran-order copy.
    grid = np.ascontiguousarray(id_map)
    below = _changes_from_above(grid)  # [V] row-major index of pixels unlike the one above
    top = np.flatnonzero(grid[0, 1:] != grid[-1, :-1]) + 1  # [T] row-major index of column tops that start a run
    index = np.concatenate((top, below))  # [R_all - 1] row 0 first: a stable sort by column keeps rows in order
    row, col = np.divmod(index, width)
    order = _group_order(col, width)
    change = (col * height + row)[order]  # [R_all - 1] column-major, increasing
    starts = np.concatenate(([0], change))  # [R_all]
    ends = np.concatenate((change, [n]))  # [R_all]
    values = grid.reshape(-1)[np.concatenate(([0], index[order]))].astype(np.int64)  # [R_all]

    slot = np.searchsorted(unique_ids, values)  # [R_all] in [0, U]
    clipped = np.minimum(slot, num_unique - 1)
    keep = np.flatnonzero(unique_ids[clipped] == values)  # [R] runs of requested ids, in position order
    order = _group_order(slot[keep], num_unique)  # group by segment, position order within a group
    keep = keep[order]
    segment = slot[keep]
    starts = starts[keep]
    ends = ends[keep]

    num_runs = np.bincount(segment, minlength=num_unique)  # [U]
    areas = np.bincount(segment, weights=ends - starts, minlength=num_unique).astype(np.int64)  # [U] exact < 2^53

    # A run inside one column spans rows start % H .. (end-1) % H; a run over two or more columns covers the
    # bottom of its first column and the top of its last, so all rows (pycocotools' toBbox does the same).
    col_first, row_first = np.divmod(starts, height)
    col_last, row_last = np.divmod(ends - 1, height)
    one_column = col_first == col_last
    row_min = np.where(one_column, row_first, 0)
    row_max = np.where(one_column, row_last, height - 1)

    boxes = np.zeros((num_unique, 4), dtype=np.int64)
    present = np.flatnonzero(num_runs)  # [P]
    if present.size:
        first = np.concatenate(([0], np.cumsum(num_runs)[:-1]))[present]  # [P] first run of each group
        last = first + num_runs[present] - 1
        x0 = col_first[first]  # runs are in position order, so the first run has the smallest column
        x1 = col_last[last]
        y0 = np.minimum.reduceat(row_min, first)
        y1 = np.maximum.reduceat(row_max, first)
        boxes[present] = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)
    return _Runs(starts, ends, segment, num_runs, areas, boxes)


COMPARED_PIXELS = 1 << 22  # pixels compared with the row above at a time: a bool block of 4 MB, not H·W


def _changes_from_above(grid: np.ndarray) -> np.ndarray:
    """Row-major indices (int64 [V]) of the pixels of ``grid`` [H, W] that differ from the pixel above them,
    compared a block of rows at a time, so that no bool map of the whole image is made."""
    height, width = grid.shape
    step = max(1, COMPARED_PIXELS // max(width, 1))
    blocks = []
    for start in range(1, height, step):
        stop = min(start + step, height)
        blocks.append(np.flatnonzero(grid[start:stop] != grid[start - 1 : stop - 1]) + start * width)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


def _group_order(keys: np.ndarray, num_keys: int) -> np.ndarray:
    """Stable argsort of ``keys`` (ints in ``[0, num_keys)``); numpy radix-sorts 16-bit keys in linear time."""
    if num_keys <= 1 << 16:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _alternating_counts(runs: _Runs, n: int, num_unique: int) -> tuple[np.ndarray, np.ndarray]:
    """Uncompressed COCO counts of every segment, concatenated.

    Segment ``u`` with runs ``(s_k, e_k)`` gets ``s_0, e_0 - s_0, s_1 - e_0, e_1 - s_1, ..., n - e_last``;
    the trailing 0-run is dropped when it is empty, and a segment with no runs gets ``[n]``.

    Returns:
        ``counts`` ``[C]`` int64 and ``num_counts`` ``[U]`` (how many of them belong to each segment).
    """
    num_runs = runs.num_runs
    first_run = np.concatenate(([0], np.cumsum(num_runs)[:-1]))  # [U]
    slots = 2 * num_runs + 1  # [U] 0-run, 1-run per run, then the trailing 0-run
    first_slot = np.concatenate(([0], np.cumsum(slots)[:-1]))  # [U]

    local = np.arange(len(runs.starts)) - first_run[runs.segment]  # [R] index of the run within its segment
    previous_end = np.concatenate(([0], runs.ends[:-1]))  # [R]
    previous_end[local == 0] = 0

    last_end = np.zeros(num_unique, dtype=np.int64)
    present = num_runs > 0
    last_end[present] = runs.ends[(first_run + num_runs - 1)[present]]
    trailing = n - last_end  # [U]

    counts = np.empty(int(slots.sum()), dtype=np.int64)  # [sum(2r + 1)]
    base = first_slot[runs.segment] + 2 * local  # [R]
    counts[base] = runs.starts - previous_end
    counts[base + 1] = runs.ends - runs.starts
    counts[first_slot + slots - 1] = trailing

    drop_trailing = present & (trailing == 0)  # [U] ends in 1s: no trailing 0-run
    keep = np.ones(len(counts), dtype=bool)
    keep[(first_slot + slots - 1)[drop_trailing]] = False
    return counts[keep], slots - drop_trailing


def _compress(counts: np.ndarray, num_counts: np.ndarray) -> tuple[str, np.ndarray]:
    """pycocotools' ``rleToString`` over concatenated counts.

    Returns:
        The concatenated ASCII strings and ``[U]`` the number of characters of each segment's string.
    """
    first = np.concatenate(([0], np.cumsum(num_counts)[:-1]))  # [U]
    local = np.arange(len(counts)) - np.repeat(first, num_counts)  # [C] index within the segment's counts
    values = counts.copy()
    values[2:] -= np.where(local[2:] > 2, counts[:-2], 0)  # from the 4th count on: minus the count 2 before

    # Groups needed: the smallest k >= 1 with -2^(5k-1) <= v < 2^(5k-1) (signed two's complement in 5k bits),
    # i.e. k = (bit_length(m) + 5) // 5 with m = v for v >= 0 and ~v = -v - 1 for v < 0.
    magnitude = np.where(values < 0, ~values, values)  # [C] >= 0, < 2^53 so exact in float64
    groups = (np.frexp(magnitude.astype(np.float64))[1] + 5) // 5  # [C] frexp's exponent is the bit length

    # Write the lowest group of every value, then the next group of those that have one, and so on (almost
    # every value has one group, so this loop mostly runs over a handful of values).
    char_end = np.cumsum(groups)  # [C]
    chars = np.empty(int(char_end[-1]), dtype=np.uint8)  # [sum(groups)]
    position = char_end - groups  # [C'] where the current group of each remaining value goes
    rest = values  # [C'] arithmetic shifts keep the sign
    left = groups  # [C'] groups still to write
    while True:
        more = left > 1
        chars[position] = ((rest & 0x1F) | (more << 5)) + 48  # 0x20: another group follows
        if not more.any():
            break
        position, rest, left = position[more] + 1, rest[more] >> 5, left[more] - 1
    text = chars.tobytes().decode("ascii")
    num_chars = np.add.reduceat(groups, first)  # every segment has at least one count
    return text, num_chars
