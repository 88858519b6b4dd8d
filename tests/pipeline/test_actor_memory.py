"""The actor's memory bound (README, "Memory per actor") holds with large images: a block call of 12 MP JPEGs in
tar shards and as files, and one image near ``--max-pixels``, run without Ray in a child process
(`tests.pipeline.actor_memory`); the peak resident memory the call adds, minus that of the same call on small
images, must stay under the README's formula evaluated for the call.

Before post-processing worked at the processed size, the 12 MP call alone added ~0.6 GB over the bound's
~0.35 GB (an int64 full-size map, its int64 copies and ``nonzero`` index arrays per image).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.inputs.sources import REF_SCHEMA
from pipeline.segmenting.block_call import (
    COMMITS_IN_FLIGHT,
    MODEL_IN_FLIGHT,
    READ_AHEAD_BYTES,
    READ_AHEAD_FILES,
    READ_AHEAD_SHARDS,
    RLE_IN_FLIGHT,
)
from pipeline.segmenting.poison import ANNOUNCE_CHUNK
from pipeline.segmenting.rle import COMPARED_PIXELS
from tests.pipeline.images import tar_bytes

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


class Call(NamedTuple):
    """What the README's formula needs to know of one block call."""

    pixels: int  # P: the largest image's width × height
    processed: int  # p: the largest processed image's pixels
    encoded: int  # E: the largest encoded image's bytes
    ref: int  # S: the largest ref's bytes (a file, or a whole shard)
    refs: int  # the bytes of all the call's refs
    kind: str  # "file", "tar" or "parquet"
    batch_size: int  # B
    threads: int  # T
    rows_per_file: int  # N
    result_bytes: int  # r: result bytes per image in a part


def actor_memory_bound(call: Call) -> int:
    """The README's formula (section "Memory per actor"), in bytes, besides the model and its activations at
    the processed size; one byte per id-map pixel (up to 256 segments)."""
    ahead = READ_AHEAD_FILES if call.kind == "file" else READ_AHEAD_SHARDS
    split = {"file": 1, "tar": 2, "parquet": 3}[call.kind]  # a shard's bytes, its members (and Arrow's copy)
    read = split * min(max(READ_AHEAD_BYTES, call.ref), ahead * call.ref, call.refs)
    decode = min(call.threads, 2 * call.batch_size) * 8 * call.pixels  # Pillow's RGB (4 B/px) + its resize
    decoded = (2 + MODEL_IN_FLIGHT) * call.batch_size * 4 * call.processed  # RGBX: a view of Pillow's memory
    queue = (2 * call.batch_size + ANNOUNCE_CHUNK) * call.encoded + decoded
    maps = (RLE_IN_FLIGHT + 2) * call.batch_size * call.pixels
    rle = min(call.threads, RLE_IN_FLIGHT) * (COMPARED_PIXELS + call.pixels)
    parts = (1 + COMMITS_IN_FLIGHT) * call.rows_per_file * call.result_bytes
    return read + decode + queue + maps + rle + parts


def _jpeg(height: int, width: int, seed: int) -> bytes:
    """A deterministic photo-like JPEG: random colours upsampled (texture every ~12 px) and a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 12 + 1, width // 12 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR)).copy()
    image[::3, ::2] ^= rng.integers(0, 16, image[::3, ::2].shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _refs(folder: Path, images: list[bytes], *, in_tar: int, per_tar: int) -> tuple[Path, list[int], str]:
    """The first ``in_tar`` images in tar shards of ``per_tar``, the rest as files -> (refs Parquet, ref sizes,
    the kind the formula takes: "tar" when any shard)."""
    folder.mkdir(parents=True)
    uris, kinds = [], []
    for start in range(0, in_tar, per_tar):
        path = folder / f"shard{start}.tar"
        members = [(f"s{i}.jpg", images[i]) for i in range(start, min(start + per_tar, in_tar))]
        path.write_bytes(tar_bytes(members))
        uris.append(str(path))
        kinds.append("tar")
    for i in range(in_tar, len(images)):
        path = folder / f"img{i}.jpg"
        path.write_bytes(images[i])
        uris.append(str(path))
        kinds.append("file")
    sizes = [os.path.getsize(u) for u in uris]
    refs = pa.table({"uri": uris, "kind": kinds, "skip": [[] for _ in uris], "size": sizes,
                     "version": [None] * len(uris)}, schema=REF_SCHEMA)  # fmt: skip
    pq.write_table(refs, folder / "refs.parquet")
    return folder / "refs.parquet", sizes, "tar" if in_tar else "file"


def _peak(refs: Path, output: Path, *, batch_size: int, threads: int, rows_per_file: int) -> dict[str, int]:
    spec = {"refs": str(refs), "output": str(output), "batch_size": batch_size, "threads": threads,
            "rows_per_file": rows_per_file}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.pipeline.actor_memory", json.dumps(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = {
    # 12 MP (4000×3000) JPEGs: six in two tar shards, three as files
    "12MP": ([(3000, 4000)] * 9, 6, 3),
    # one image of 10922×8192 = 89,473,024 pixels (the default --max-pixels is 89,478,485) and a 12 MP one
    "89MP": ([(8192, 10922), (3000, 4000)], 0, 1),
}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("case", list(CASES))
def test_the_actors_peak_memory_stays_under_the_readmes_bound(case: str, tmp_path: Path) -> None:
    sizes, in_tar, per_tar = CASES[case]
    batch_size, threads, rows_per_file = 2, 2, 4
    images = [_jpeg(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    big_refs, ref_sizes, kind = _refs(tmp_path / "big", images, in_tar=in_tar, per_tar=per_tar)
    small = [_jpeg(48, 64, seed=i) for i in range(len(images))]
    small_refs, _, _ = _refs(tmp_path / "small", small, in_tar=in_tar, per_tar=per_tar)

    big = _peak(big_refs, tmp_path / "out-big", batch_size=batch_size, threads=threads, rows_per_file=rows_per_file)
    base = _peak(small_refs, tmp_path / "out-small", batch_size=batch_size, threads=threads,
                 rows_per_file=rows_per_file)  # fmt: skip
    assert big["images_ok"] == base["images_ok"] == len(images)

    largest = max(h * w for h, w in sizes)
    call = Call(
        pixels=largest, processed=64 * 86, encoded=max(len(b) for b in images), ref=max(ref_sizes),
        refs=sum(ref_sizes), kind=kind, batch_size=batch_size, threads=threads, rows_per_file=rows_per_file,
        result_bytes=MIB,
    )  # fmt: skip
    bound = actor_memory_bound(call)
    added = big["peak"] - base["peak"]
    print(f"{case}: the call added {added / MIB:.0f} MiB over small images; the README's bound: {bound / MIB:.0f} MiB")
    assert added <= bound, f"{case}: peak {added / MIB:.0f} MiB over small images > bound {bound / MIB:.0f} MiB"
    assert added >= 3 * largest, "the largest image's full-size RGB decode (4 B/px) must show in the peak"
