"""The block call without Ray: one `BlockSegmenter` call reads, decodes, segments, encodes and commits a shard.

The oracle is the unpipelined path: `read_refs` on every ref, `decode_batch` on every image, then the model with
RLE in its call (`PanopticSegmenter(encode_rle=True)`), batch after batch, in one thread. The block call, with
its thread pool, batches and parts cut across batches, must commit exactly those rows, each image once, in parts
of at most ``--rows-per-file`` images, and return one row per part with that part's counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, ResourceConfig
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease
from pipeline.exactly_once.parts import split_results
from pipeline.inputs.decode import decode_batch
from pipeline.inputs.readers import read_refs
from pipeline.inputs.sources import REF_SCHEMA
from pipeline.schema import PART_ROW_SCHEMA
from pipeline.segmenting.block_call import BlockSegmenter
from pipeline.segmenting.poison import POISON_ERROR, FlightLog
from pipeline.segmenting.predict import PanopticSegmenter
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


def _shard_call(model: PanopticSegmenter, output: Path, *, recorder: FlightLog | None = None) -> BlockSegmenter:
    """A block call on the module's model (the job tests build it in the actor): parts of 4, batches of 3."""
    return BlockSegmenter.with_model(
        model,
        inference=INFERENCE,
        input=InputConfig(uris=(str(output),), max_pixels=10**8, max_bytes=10**8),
        resources=ResourceConfig(rows_per_file=4, batch_size=3),
        cpus=3,
        committer=OutputCommitter(str(output), "r1"),
        flight_recorder=recorder,
        io_threads=2,
        node_id="node-a",
    )


def _unpipelined(model: PanopticSegmenter, refs: pa.Table, *, batch_size: int) -> pa.Table:
    """The oracle: read everything, decode everything, then the model with RLE in its call, batch after batch
    (the same batches as the block call's: float reductions differ with a batch's composition)."""
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
    call = _shard_call(model, output)
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


def _images(output: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in pads.dataset(str(output / "images")).to_table().to_pylist()}


def _segments(output: Path) -> pa.Table:
    table = pads.dataset(str(output / "segments")).to_table()
    return table.sort_by([("image_id", "ascending"), ("segment_id", "ascending")])


def _expected(model: PanopticSegmenter, refs: pa.Table, *, without: set[str]) -> tuple[dict[str, dict], pa.Table]:
    """The oracle's images rows (by id) and segments of ``refs``, without the images named in ``without``
    (whose rows the test checks itself). Each image is predicted alone: a batch's composition moves floats."""
    images, segments = split_results(_unpipelined(model, refs, batch_size=1), run_id="r1")
    keep = [not any(name in i for name in without) for i in segments["image_id"].to_pylist()]
    rows = {r["image_id"]: r for r in images.to_pylist() if not any(name in r["image_id"] for name in without)}
    return rows, segments.filter(pa.array(keep)).sort_by([("image_id", "ascending"), ("segment_id", "ascending")])


def test_an_unexpected_exception_at_any_stage_is_that_images_error_row(
    model: PanopticSegmenter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RuntimeError (no type a stage lists) raised while reading one ref, decoding one image, segmenting one
    and encoding one: four error rows naming the stage and the exception, the rest as the oracle gives them."""
    import pipeline.segmenting.block_call as shard

    refs = _inputs(tmp_path / "in")
    struck: list[str] = []
    read, decode, segment, encode = shard.read_ref, shard.decode_input, model.__class__.segment, shard.encode_results

    def read_ref(uri: str, *args: object, **kwargs: object) -> object:
        if uri.endswith("img0.jpg"):
            struck.append("read")
            raise RuntimeError("a reader bug on s3://key:secret@bucket/x")  # redacted in the row
        return read(uri, *args, **kwargs)

    def decode_input(data: bytes, **kwargs: object) -> object:
        if data == (tmp_path / "in" / "img1.jpg").read_bytes():
            struck.append("decode")
            raise SystemError("a C extension's error")
        return decode(data, **kwargs)

    def call(self: PanopticSegmenter, batch: dict) -> pa.Table:
        if any(str(i).endswith("img2.jpg") for i in batch["image_id"]):
            struck.append("model")
            raise RuntimeError("a kernel that fails on one odd shape")
        return segment(self, batch)

    def encode_results(predictions: pa.Table) -> pa.Table:
        rows = zip(predictions["image_id"].to_pylist(), predictions["error"].to_pylist())
        if any(str(i).endswith("img4.jpg") and error is None for i, error in rows):  # encoding its masks
            struck.append("encode")
            raise KeyError("an RLE bug")
        return encode(predictions)

    monkeypatch.setattr(shard, "read_ref", read_ref)
    monkeypatch.setattr(shard, "decode_input", decode_input)
    monkeypatch.setattr(model.__class__, "segment", call)
    monkeypatch.setattr(shard, "encode_results", encode_results)
    output = tmp_path / "out"
    call_ = _shard_call(model, output)
    with Lease.acquire(str(output), "r1"):
        parts = call_(refs)
    monkeypatch.undo()
    assert set(struck) == {"read", "decode", "model", "encode"}  # each fault struck

    images = _images(output)
    assert len(images) == 10 and sum(parts["images_error"].to_pylist()) == 6  # 4 struck, a corrupt and a gone
    by_name = {Path(i).name: r for i, r in images.items()}
    assert by_name["img0.jpg"]["error"] == "reading failed: RuntimeError: a reader bug on s3://bucket/x"
    assert by_name["img1.jpg"]["error"] == "decoding failed: SystemError: a C extension's error"
    assert by_name["img2.jpg"]["error"] == "segmenting failed: RuntimeError: a kernel that fails on one odd shape"
    assert by_name["img4.jpg"]["error"] == "encoding failed: KeyError: 'an RLE bug'"
    assert not any(by_name[n]["retryable"] for n in ("img0.jpg", "img1.jpg", "img2.jpg", "img4.jpg"))
    struck_names = {"img0.jpg", "img1.jpg", "img2.jpg", "img4.jpg"}
    expected_images, expected_segments = _expected(model, refs, without=struck_names)
    for image_id, row in expected_images.items():
        assert {k: v for k, v in images[image_id].items() if k != "part"} == {
            k: v for k, v in row.items() if k != "part"
        }, image_id
    segments = _segments(output)
    assert (
        segments.filter(pa.array([Path(i).name in struck_names for i in segments["image_id"].to_pylist()])).num_rows
        == 0
    )
    kept = segments.filter(pa.array([Path(i).name not in struck_names for i in segments["image_id"].to_pylist()]))
    _assert_same_segments(kept, expected_segments)


def _assert_same_segments(got: pa.Table, expected: pa.Table) -> None:
    """The same segments (masks, boxes, areas, categories); scores to float32 noise, since the oracle runs each
    image alone where the block call batched some of them."""
    assert got.num_rows == expected.num_rows > 0
    for name in got.column_names:
        if name == "score":
            np.testing.assert_allclose(got[name].to_numpy(), expected[name].to_numpy(), rtol=1e-4, atol=1e-5)
        else:
            assert got[name].equals(expected[name]), name


class _Death(BaseException):
    """The model actor's process dying, as the block call sees it in a test: nothing after it runs."""


def test_an_input_that_kills_its_worker_twice_gets_an_error_row_and_its_shard_mates_are_committed(
    model: PanopticSegmenter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol of `pipeline.segmenting.poison` on one shard, its actor's deaths simulated: the first attempt dies
    decoding img5 (its window of images in flight all get a strike); the retry runs the others, then the
    suspects alone, and dies again on img5 alone; the third attempt gives img5 its error row and commits the
    rest exactly as the oracle does, each image once."""
    import pipeline.segmenting.block_call as shard

    refs = _inputs(tmp_path / "in")
    poison = (tmp_path / "in" / "img5.jpg").read_bytes()
    decode, strikes = shard.decode_input, []

    def decode_input(data: bytes, **kwargs: object) -> object:
        if data == poison:
            strikes.append(len(strikes))
            raise _Death()
        return decode(data, **kwargs)

    monkeypatch.setattr(shard, "decode_input", decode_input)
    recorder = FlightLog()
    output = tmp_path / "out"
    call = _shard_call(model, output, recorder=recorder)
    with Lease.acquire(str(output), "r1"):
        for _ in range(2):
            with pytest.raises(_Death):
                call(refs)
        parts = call(refs)
    monkeypatch.undo()
    assert strikes == [0, 1] and recorder.open_blocks() == 0

    images = _images(output)
    poisoned = [r for i, r in images.items() if i.endswith("img5.jpg")]
    assert len(poisoned) == 1 and poisoned[0]["error"].startswith(f"{POISON_ERROR} while decoding: skipped")
    assert poisoned[0]["status"] == "error" and not poisoned[0]["retryable"]
    assert len(images) == 10 and sum(parts["images_ok"].to_pylist()) == 7
    expected_images, expected_segments = _expected(model, refs, without={"img5.jpg"})
    assert {i: r["status"] for i, r in images.items() if not i.endswith("img5.jpg")} == {
        i: r["status"] for i, r in expected_images.items()
    }
    kept = _segments(output)
    _assert_same_segments(kept, expected_segments)
    committed = [i for f in (output / "images").glob("*.parquet") for i in pq.read_table(f)["image_id"].to_pylist()]
    assert sorted(committed) == sorted(images)  # each image once, no part of an earlier attempt left over


def test_a_device_fault_ends_the_actor_and_the_image_that_causes_it_is_isolated(
    model: PanopticSegmenter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA error (the device's context lost: every later call would fail too) is not an error row: the actor
    ends itself, with the reason on the record, and the image is isolated like one that crashed its process."""
    import pipeline.segmenting.block_call as shard

    refs = _inputs(tmp_path / "in")
    segment, ended = model.__class__.segment, []

    def call(self: PanopticSegmenter, batch: dict) -> pa.Table:
        if any(str(i).endswith("img2.jpg") and not str(e) for i, e in zip(batch["image_id"], batch["error"])):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")
        return segment(self, batch)

    def end_process(code: int) -> None:
        ended.append(code)
        raise _Death()

    monkeypatch.setattr(model.__class__, "segment", call)
    monkeypatch.setattr(shard, "end_process", end_process)
    recorder, output = FlightLog(), tmp_path / "out"
    call_ = _shard_call(model, output, recorder=recorder)
    with Lease.acquire(str(output), "r1"):
        for _ in range(2):
            with pytest.raises(_Death):
                call_(refs)
        call_(refs)
    monkeypatch.undo()
    assert ended == [shard.ACTOR_ENDED_EXIT_CODE] * 2
    images = _images(output)
    assert len(images) == 10
    row = next(r for i, r in images.items() if i.endswith("img2.jpg"))
    assert row["error"].startswith(
        f"{POISON_ERROR} while segmenting (the device failed: RuntimeError: CUDA error: an illegal memory access "
        "was encountered): skipped"
    )
    errors = sorted(Path(i).name for i, r in images.items() if r["status"] == "error")
    assert errors == ["gone.jpg", "img2.jpg", "img3.jpg"]


def test_device_faults_are_told_from_other_errors() -> None:
    import torch

    from pipeline.segmenting.predict import is_device_fault

    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_fault(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_fault(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(ValueError("CUDA error: but not a RuntimeError"))
