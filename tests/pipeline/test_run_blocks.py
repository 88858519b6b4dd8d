"""Shards sized by images on every path (`pipeline.run.work_blocks`): up to ``rows`` file refs to a block and
each tar / Parquet shard a block of its own, whether the driver planned the refs or Ray did
(`pipeline.exactly_once.resume`),
so that every model actor gets work."""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.inputs.sources import REF_SCHEMA
from pipeline.segmenting.block_call import BlockSegmenter
from tests.pipeline.committed_parts import FAKE_WIDTH, commit_by_hand
from tests.pipeline.images import photo_bytes, tar_bytes


def _mixed_refs() -> pa.Table:
    """10 file refs with 5 tar refs between them."""
    rows = []
    for i in range(10):
        rows.append({"uri": f"/in/f{i}.jpg", "kind": "file"})
        if i % 2:
            rows.append({"uri": f"/in/t{i}.tar", "kind": "tar", "skip": [f"m{i}.jpg"]})
    return pa.Table.from_pylist(rows, schema=REF_SCHEMA)


def _block_uris(dataset: object) -> list[list[str]]:
    import ray

    materialized = dataset.materialize()  # type: ignore[attr-defined]
    return [
        ray.get(block).column("uri").to_pylist()
        for bundle in materialized.iter_internal_ref_bundles()
        for block in bundle.block_refs
    ]


@pytest.mark.parametrize("planned_on", ["driver", "ray"])
def test_file_refs_go_rows_to_a_block_and_each_shard_alone(ray_session: None, planned_on: str) -> None:
    import ray

    from pipeline.run import work_blocks

    refs = _mixed_refs()
    source = refs if planned_on == "driver" else ray.data.from_arrow([refs.slice(0, 8), refs.slice(8)])
    blocks = [uris for uris in _block_uris(work_blocks(source, rows=4)) if uris]
    shards = sorted(uris for uris in blocks if uris[0].endswith(".tar"))
    files = [uris for uris in blocks if not uris[0].endswith(".tar")]
    assert shards == [[f"/in/t{i}.tar"] for i in (1, 3, 5, 7, 9)]
    assert sorted(len(uris) for uris in files) == [2, 4, 4], files
    assert all(uri.endswith(".jpg") for uris in files for uri in uris)
    assert sorted(u for uris in blocks for u in uris) == sorted(refs.column("uri").to_pylist())


class CallRecordingSegmenter(BlockSegmenter):
    """`BlockSegmenter` that notes each call's process and refs in ``calls/`` beside the output."""

    def __call__(self, refs: pa.Table) -> pa.Table:
        calls = Path(self.committer.out.uri).parent / "calls"
        calls.mkdir(exist_ok=True)
        (calls / f"{os.getpid()}-{uuid.uuid4().hex}").write_text(json.dumps(refs.column("uri").to_pylist()))
        return super().__call__(refs)


@pytest.mark.slow
def test_a_resume_planned_on_ray_gives_each_tar_shard_its_own_call_on_both_actors(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 tar shards of 2 images and 16 image files, 2 actors, parts of 64: each tar is a block call of its own,
    the files go 2 to a call (`BLOCKS_PER_ACTOR` calls per actor), and both actors work (before: all 24 tars
    in one call on one actor, the other idle)."""
    from pipeline import run

    folder = tmp_path / "in"
    folder.mkdir()
    tars = [folder / f"shard-{i:03d}.tar" for i in range(24)]
    for i, tar in enumerate(tars):
        tar.write_bytes(tar_bytes([(f"s{j}.jpg", photo_bytes(40, 48, seed=2 * i + j)) for j in range(2)]))
    files = [folder / f"file-{i:02d}.jpg" for i in range(16)]
    for i, file in enumerate(files):
        file.write_bytes(photo_bytes(40, 48, seed=100 + i))
    output = tmp_path / "out"
    commit_by_hand(output, [(f"{tars[0]}#s0.jpg", str(tars[0]))])  # a committed part: a resume
    monkeypatch.setattr("pipeline.exactly_once.resume.fits_locally", lambda inputs, parts: False)  # planned on Ray
    monkeypatch.setattr(run, "BlockSegmenter", CallRecordingSegmenter)
    config = JobConfig(
        input=InputConfig((str(folder),)),
        output=str(output),
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(batch_size=4, device="cpu", rows_per_file=64, min_actors=2, max_actors=2),
    )

    summary = run.run_job(config, show_progress=False)

    calls = {path.name: json.loads(path.read_text()) for path in (tmp_path / "calls").iterdir()}
    assert sorted(uri for uris in calls.values() for uri in uris) == sorted(map(str, tars + files))
    tar_calls = sorted(uris for uris in calls.values() if uris[0].endswith(".tar"))
    assert tar_calls == [[str(tar)] for tar in tars]
    assert sorted(len(uris) for uris in calls.values() if uris[0].endswith(".jpg")) == [2] * 8
    assert len({name.split("-")[0] for name in calls}) == 2  # two actor processes
    images = pads.dataset(str(output / "images"), format="parquet").to_table().to_pylist()
    counts = Counter(r["image_id"] for r in images)
    members = {f"{tar}#s{j}.jpg" for tar in tars for j in range(2)}
    assert set(counts) == members | set(map(str, files)) and max(counts.values()) == 1
    assert [r["image_id"] for r in images if r["width"] == FAKE_WIDTH] == [f"{tars[0]}#s0.jpg"]
    assert (summary.images_ok, summary.images_error, summary.skipped_committed) == (63, 0, 1)
