"""CPU time per image of `pipeline.segmenting.rle.encode_segments` vs one ``pycocotools.mask.encode`` per segment.

The id maps are Voronoi partitions of random points (blob-like segments with straight boundaries, as a
panoptic map roughly looks), with a few cells left as background (id 0, not encoded). Three ways, timed
interleaved in the same process (in a shuffled order each repeat), median over the repeats, each checked
to give identical counts strings:

- ``pycocotools``: ``[mask.encode(np.asfortranarray(id_map == s)) for s in ids]``;
- ``encode_segments``: one pass for the runs, counts strings written with numpy (what the pipeline uses);
- ``runs+frPyObjects``: the same one-pass runs, compressed by ``pycocotools.mask.frPyObjects`` per segment
  (the alternative the module docstring mentions, kept here to show why it is not used).

    python -m bench.rle [--repeats 50] [--segments 20] [--out bench/results/rle.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from pipeline.segmenting.rle import _alternating_counts, _segment_runs, encode_segments

SHAPES = ((800, 1066), (480, 640))
BACKGROUND_CELLS = 3


def voronoi_id_map(height: int, width: int, segments: int, *, seed: int = 0) -> np.ndarray:
    """``[H, W]`` int32: ids ``1..segments`` on Voronoi cells, plus a few background cells with id 0."""
    rng = np.random.default_rng(seed)
    cells = segments + BACKGROUND_CELLS
    points = rng.uniform((0, 0), (height, width), size=(cells, 2))  # [P, 2] (y, x)
    ys, xs = np.mgrid[0:height, 0:width]  # [H, W] each
    nearest = np.full((height, width), -1, dtype=np.int32)
    best = np.full((height, width), np.inf)
    for p, (py, px) in enumerate(points):
        d = (ys - py) ** 2 + (xs - px) ** 2  # [H, W]
        closer = d < best
        best[closer] = d[closer]
        nearest[closer] = p
    labels = np.concatenate(([0] * BACKGROUND_CELLS, rng.permutation(segments) + 1)).astype(np.int32)  # [P]
    return labels[nearest]  # [H, W]


def _pycocotools_loop(id_map: np.ndarray, ids: list[int]) -> list[str]:
    return [coco_mask.encode(np.asfortranarray(id_map == s))["counts"].decode("ascii") for s in ids]


def _ours(id_map: np.ndarray, ids: list[int]) -> list[str]:
    return [e.counts for e in encode_segments(id_map, ids)]


def _runs_then_frpyobjects(id_map: np.ndarray, ids: list[int]) -> list[str]:
    height, width = id_map.shape
    unique_ids = np.asarray(sorted(ids), dtype=np.int64)
    runs = _segment_runs(id_map, unique_ids)
    counts, num_counts = _alternating_counts(runs, height * width, len(unique_ids))
    pieces = np.split(counts, np.cumsum(num_counts)[:-1])
    out = {}
    for s, piece in zip(unique_ids.tolist(), pieces):
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": piece.tolist()}, height, width)
        out[s] = rle["counts"].decode("ascii")
    return [out[s] for s in ids]


METHODS: dict[str, Callable[[np.ndarray, list[int]], list[str]]] = {
    "pycocotools": _pycocotools_loop,
    "encode_segments": _ours,
    "runs+frPyObjects": _runs_then_frpyobjects,
}


def run(*, repeats: int = 50, segments: int = 20, seed: int = 0) -> dict:
    """Time every method on each shape of `SHAPES`; seconds per image are medians over ``repeats``."""
    rows = []
    order_rng = random.Random(seed)
    for height, width in SHAPES:
        id_map = voronoi_id_map(height, width, segments, seed=seed)
        ids = [int(s) for s in np.unique(id_map) if s != 0]
        reference = _pycocotools_loop(id_map, ids)
        for name, method in METHODS.items():
            if method(id_map, ids) != reference:
                raise AssertionError(f"{name} differs from pycocotools on {height}x{width}")
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        names = list(METHODS)
        for _ in range(repeats):
            order_rng.shuffle(names)  # no method always runs right after the same other one
            for name in names:
                method = METHODS[name]
                start = time.perf_counter()
                method(id_map, ids)
                times[name].append(time.perf_counter() - start)
        median = {name: float(np.median(t)) for name, t in times.items()}
        rows.append(
            {
                "height": height,
                "width": width,
                "segments": len(ids),
                "seconds_per_image": median,
                "speedup_vs_pycocotools": {name: median["pycocotools"] / m for name, m in median.items()},
            }
        )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "repeats": repeats,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--segments", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    result = run(repeats=args.repeats, segments=args.segments, seed=args.seed)
    names = list(METHODS)
    print(f"{'image':>10} {'segs':>4} " + " ".join(f"{n + ' ms':>20}" for n in names) + f" {'ratio':>7}")
    for row in result["rows"]:
        ms = " ".join(f"{row['seconds_per_image'][n] * 1e3:>20.3f}" for n in names)
        ratio = row["speedup_vs_pycocotools"]["encode_segments"]
        print(f"{row['height']:>4}x{row['width']:<5} {row['segments']:>4} {ms} {ratio:>6.1f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
