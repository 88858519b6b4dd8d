"""Synthetic result rows shaped like 800×1066 photos with 25 segments (real RLE strings of a realistic id map),
for the benchmarks that commit parts (`bench.plan_cost`'s write stage). Formerly in ``bench/write_path.py``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.schema import RESULT_SCHEMA, SEGMENT_STRUCT
from pipeline.segmenting.rle import encode_segments

HEIGHT, WIDTH, SEGMENTS = 800, 1066, 25
DISTINCT_PHOTOS = 256  # images cycle through this many different segmentations (~14 MB of RLE: beyond zstd's
# window, so parts compress like real ones)


def segments_of_a_photo(seed: int = 0) -> list[dict]:
    """25 segments of an 800×1066 id map of blobs: real RLE strings of a realistic length."""
    rng = np.random.default_rng(seed)
    cell = int(rng.integers(30, 50))
    small = rng.integers(0, SEGMENTS, size=(HEIGHT // cell + 1, WIDTH // cell + 1))
    id_map = np.kron(small, np.ones((cell, cell), dtype=np.int64))[:HEIGHT, :WIDTH].astype(np.uint8)
    shifts = rng.integers(-4, 5, size=WIDTH)  # ragged boundaries, as real masks have: runs of varied lengths
    id_map = id_map[(np.arange(HEIGHT)[:, None] + shifts[None, :]) % HEIGHT, np.arange(WIDTH)[None, :]]
    encoded = encode_segments(id_map, list(range(SEGMENTS)))
    return [
        {"segment_id": i, "category_id": 1 + i, "category": f"class_{1 + i}", "isthing": i < 15, "score": 0.9,
         "area": e.area, "bbox": list(e.bbox), "rle": {"size": [HEIGHT, WIDTH], "counts": e.counts}}
        for i, e in enumerate(encoded)
    ]  # fmt: skip


def result_block(start: int, n: int, photos: list[list[dict]]) -> pa.Table:
    """``n`` `RESULT_SCHEMA` rows (images ``start``..), image ``i`` with the segments of ``photos[i % len]``."""
    ids = [f"s3://bench/images/{i:09d}.jpg" for i in range(start, start + n)]
    segments = photos[0]
    values = pa.array([s for i in range(start, start + n) for s in photos[i % len(photos)]], SEGMENT_STRUCT)
    offsets = pa.array(np.arange(0, (n + 1) * len(segments), len(segments), dtype=np.int32))
    return pa.table(
        {
            "image_id": ids,
            "source": ids,
            "member": pa.nulls(n, pa.string()),
            "input_size": pa.array([150_000] * n, pa.int64()),
            "input_version": ["etag"] * n,
            "width": pa.array([WIDTH] * n, pa.int32()),
            "height": pa.array([HEIGHT] * n, pa.int32()),
            "error": pa.nulls(n, pa.string()),
            "retryable": [False] * n,
            "status": ["ok"] * n,
            "segments": pa.ListArray.from_arrays(offsets, values),
        },
        schema=RESULT_SCHEMA,
    )
