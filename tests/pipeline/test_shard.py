"""The shard call without Ray: one `ShardSegmenter` call reads, decodes, segments, encodes and commits a shard.

The oracle is the unpipelined path: `read_refs` on every ref, `decode_batch` on every image, then the model with
RLE in its call (`PanopticSegmenter(encode_rle=True)`), batch after batch, in one thread. The shard call, with
its thread pool, batches and parts cut across batches, must commit exactly those rows, each image once, in parts
of at most ``--rows-per-file`` images, and return one row per part with that part's counts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from model.predictor import InferenceConfig
from pipeline.commit import OutputCommitter
from pipeline.decode import decode_batch
from pipeline.lease import Lease
from pipeline.parts import split_results
from pipeline.predict import PanopticSegmenter
from pipeline.readers import read_refs
from pipeline.schema import PART_ROW_SCHEMA
from pipeline.shard import ShardSegmenter
from pipeline.sources import REF_SCHEMA
from tests.pipeline.images import photo_bytes, tar_bytes

INFERENCE = InferenceConfig(min_size=64, max_size=107)


@pytest.fixture(scope="module")
def model() -> PanopticSegmenter:
    return PanopticSegmenter(
        variant="detr-r50-panoptic", weights="synthetic", inference=INFERENCE, device="cpu", encode_rle=False
    )


def _inputs(folder: Path) -> pa.Table:
    """Refs of 7 files (one corrupt, one missing) and a tar of 3 images, as `REF_SCHEMA` rows."""
    folder.mkdir()
    uris = []
    for i in range(6):
        path = folder / f"img{i}.jpg"
        path.write_bytes(b"not an image" if i == 3 else photo_bytes(48 + 8 * i, 64, seed=i))
        uris.append((str(path), "file"))
    uris.append((str(folder / "gone.jpg"), "file"))
    tar = folder / "shard.tar"
    tar.write_bytes(tar_bytes([(f"m{i}.png", photo_bytes(56, 40, fmt="PNG", seed=20 + i)) for i in range(3)]))
    uris.append((str(tar), "tar"))
    return pa.table({"uri": [u for u, _ in uris], "kind": [k for _, k in uris],
                     "skip": [[] for _ in uris], "size": [None] * len(uris), "version": [None] * len(uris)},
                    schema=REF_SCHEMA)  # fmt: skip


def _unpipelined(model: PanopticSegmenter, refs: pa.Table, *, batch_size: int) -> pa.Table:
    """The oracle: read everything, decode everything, then the model with RLE in its call, batch after batch
    (the same batches as the shard call's: float reductions differ with a batch's composition)."""
    rows = read_refs(refs.to_pydict(), bytes_column="image", id_column=None)
    decoded = decode_batch(rows, max_pixels=10**8, inference=INFERENCE)
    results = []
    model.encode_rle = True
    try:
        for start in range(0, len(rows["image_id"]), batch_size):
            results.append(model({name: column[start : start + batch_size] for name, column in decoded.items()}))
    finally:
        model.encode_rle = False
    return pa.concat_tables(results)


def test_a_shard_call_commits_exactly_the_rows_of_the_unpipelined_path(
    model: PanopticSegmenter, tmp_path: Path
) -> None:
    refs = _inputs(tmp_path / "in")
    output = tmp_path / "out"
    call = ShardSegmenter.__new__(ShardSegmenter)  # the module's model (the job tests build it in the actor)
    call.segmenter, call.inference = model, INFERENCE
    call.committer = OutputCommitter(str(output), "r1")
    call.rows_per_file, call.batch_size, call.max_pixels = 4, 3, 10**8
    call.bytes_column, call.id_column, call.node_id, call.max_bytes = "image", None, "node-a", 10**8
    call.read_timeout_s = 60.0
    call.pool, call.io_pool = ThreadPoolExecutor(max_workers=3), ThreadPoolExecutor(max_workers=2)
    with Lease.acquire(str(output), "r1"):
        parts = call(refs)
        again = call(refs)  # Ray's retry of the same shard: the same part names, nothing added
    expected_images, expected_segments = split_results(_unpipelined(model, refs, batch_size=3), run_id="r1")

    assert parts.schema == PART_ROW_SCHEMA and parts.num_rows == 3  # 10 images in parts of 4, 4, 2
    sizes = sorted(pq.ParquetFile(output / "images" / name).metadata.num_rows for name in parts["part"].to_pylist())
    assert sizes == [2, 4, 4]
    assert sum(parts["images_ok"].to_pylist()) == 8 and sum(parts["images_error"].to_pylist()) == 2
    assert set(parts["node_id"].to_pylist()) == {"node-a"}
    images = pads.dataset(str(output / "images")).to_table().sort_by("image_id")
    segments = pads.dataset(str(output / "segments")).to_table().sort_by([("image_id", "ascending"),
                                                                          ("segment_id", "ascending")])  # fmt: skip
    assert images.equals(expected_images.sort_by("image_id"))
    assert segments.equals(expected_segments.sort_by([("image_id", "ascending"), ("segment_id", "ascending")]))
    assert sum(parts["segments"].to_pylist()) == segments.num_rows > 0
    errors = {r["image_id"]: r["error"] for r in images.to_pylist() if r["status"] == "error"}
    assert sorted(Path(i).name for i in errors) == ["gone.jpg", "img3.jpg"]
    assert np.all([r["num_segments"] >= 0 for r in images.to_pylist()])
    assert sorted(again["part"].to_pylist()) == sorted(parts["part"].to_pylist())
    assert pads.dataset(str(output / "images")).to_table().num_rows == 10
