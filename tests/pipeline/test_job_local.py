"""End to end on local files: every input exactly once, segments decode to the model's own panoptic maps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.checkpoint import build_model
from model.config import VARIANTS
from model.predictor import InferenceConfig, PanopticPredictor
from model.synthetic_weights import synthetic_state_dict
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from tests.pipeline.images import photo_bytes, tar_bytes

INFERENCE = InferenceConfig(min_size=96, max_size=160)


def _config(inputs: list[str], output: Path, **resources: object) -> JobConfig:
    return JobConfig(
        input=InputConfig(tuple(inputs)),
        output=str(output),
        model=ModelSpec(weights="synthetic"),
        inference=INFERENCE,
        resources=ResourceConfig(batch_size=3, device="cpu", rows_per_file=4, **resources),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def predictor(ray_session: None) -> Iterator[PanopticPredictor]:
    """The model run in this process, on as many threads as the job's CPU actors (float reductions round
    differently with the thread count)."""
    from pipeline.segmenting.resources import actor_layout

    config = VARIANTS["detr-r50-panoptic"].config
    threads = torch.get_num_threads()
    torch.set_num_threads(int(actor_layout(ResourceConfig(device="cpu"), use_gpu=False).cpus))
    try:
        yield PanopticPredictor(build_model(config, synthetic_state_dict(config)), INFERENCE)
    finally:
        torch.set_num_threads(threads)


def _read(output: Path, table: str):
    return pads.dataset(str(output / table), format="parquet").to_table()


def test_local_folder_end_to_end(ray_session: None, tmp_path: Path, predictor: PanopticPredictor) -> None:
    from pipeline.run import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    expected_ok = {}
    for i, (h, w, fmt) in enumerate([(90, 120, "JPEG"), (120, 90, "PNG"), (100, 100, "JPEG"), (64, 150, "WEBP")]):
        path = folder / f"img{i}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.write_bytes(photo_bytes(h, w, fmt=fmt, seed=i))
        expected_ok[str(path)] = path
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")

    summary = run_job(_config([str(folder)], tmp_path / "out"), show_progress=False)
    assert (summary.images_ok, summary.images_error) == (4, 2)

    images = _read(tmp_path / "out", "images").to_pylist()
    ids = [r["image_id"] for r in images]
    assert sorted(ids) == sorted([*map(str, expected_ok), str(folder / "broken.jpg"), str(folder / "empty.png")])
    assert len(ids) == len(set(ids))
    by_id = {r["image_id"]: r for r in images}
    assert by_id[str(folder / "broken.jpg")]["status"] == "error"
    assert "empty" in by_id[str(folder / "empty.png")]["error"]

    segments = _read(tmp_path / "out", "segments").to_pylist()
    for image_id, path in expected_ok.items():
        row = by_id[image_id]
        expected = predictor.predict([Image.open(path)])[0]
        assert row["status"] == "ok" and (row["height"], row["width"]) == expected.id_map.shape
        mine = sorted((s for s in segments if s["image_id"] == image_id), key=lambda s: s["segment_id"])
        assert row["num_segments"] == len(mine) == len(expected.segments)
        for seg, ref in zip(mine, expected.segments):
            mask = mask_utils.decode({"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode()})
            assert np.array_equal(mask.astype(bool), expected.id_map == ref.id)
            assert seg["area"] == int(mask.sum()) == ref.area
            ys, xs = np.nonzero(mask)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert seg["category_id"] == ref.category_id and seg["isthing"] == ref.isthing

    run = json.loads((tmp_path / "out" / "_runs" / f"{summary.run_id}.json").read_text())
    assert run["config"]["model"]["variant"] == "detr-r50-panoptic" and run["status"] == "finished"
    assert run["format_version"] == 2  # pipeline.schema.OUTPUT_FORMAT_VERSION: what its parts hold
    assert run["settings"]["threshold"] == INFERENCE.threshold and run["this_run"]["images_ok"] == 4
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert success["run_id"] == summary.run_id and success["this_run"]["images_ok"] == 4
    assert (success["output"]["images"], success["output"]["images_error"]) == (6, 2)
    assert {r["run_id"] for r in images} == {summary.run_id}
    assert all(r["member"] is None and r["input_version"].startswith("mtime=") for r in images)  # whole files


def test_rerun_resumes_without_duplicates(ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.run import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"a{i}.jpg").write_bytes(photo_bytes(70, 90, seed=10 + i))
    out = tmp_path / "out"
    first = run_job(_config([str(folder)], out), show_progress=False)
    assert first.images_ok == 3
    for i in range(3, 5):
        (folder / f"a{i}.jpg").write_bytes(photo_bytes(70, 90, seed=10 + i))
    second = run_job(_config([str(folder)], out), show_progress=False)
    assert (second.images_ok, second.skipped_committed) == (2, 3)
    ids = _read(out, "images").column("image_id").to_pylist()
    assert sorted(ids) == sorted(str(folder / f"a{i}.jpg") for i in range(5))
    seg_ids = _read(out, "segments").select(["image_id", "segment_id"]).to_pylist()
    assert len(seg_ids) == len({(r["image_id"], r["segment_id"]) for r in seg_ids})

    # Nothing left to do: a small output is planned on the driver, and no Ray is joined or started at all.
    import pipeline.run

    def refuse() -> None:
        raise AssertionError("a re-run with nothing to do started Ray")

    monkeypatch.setattr(pipeline.run, "init_ray", refuse)
    third = run_job(_config([str(folder)], out), show_progress=False)
    assert (third.images_ok, third.skipped_committed, third.parts, third.totals.images) == (0, 5, 0, 5)


def test_crash_between_part_files_is_cleaned_on_rerun(ray_session: None, tmp_path: Path) -> None:
    """A segments part without its images part (crash between the two writes) is removed, then redone."""
    from pipeline.run import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(photo_bytes(80, 80, seed=3))
    out = tmp_path / "out"
    run_job(_config([str(folder)], out), show_progress=False)
    images_part = next((out / "images").glob("*.parquet"))
    images_part.unlink()  # as if the write task died after writing the segments part
    summary = run_job(_config([str(folder)], out), show_progress=False)
    assert summary.images_ok == 1 and summary.skipped_committed == 0
    assert _read(out, "images").column("image_id").to_pylist() == [str(folder / "x.jpg")]
    seg = _read(out, "segments")
    assert len(set(seg.column("segment_id").to_pylist())) == seg.num_rows


def test_tar_shards_and_parquet_inputs(ray_session: None, tmp_path: Path) -> None:

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.run import run_job

    shard = tmp_path / "shard-000.tar"
    members = [
        ("s1.jpg", photo_bytes(60, 80, seed=1)),
        ("s1.json", b"{}"),
        ("s2.png", photo_bytes(80, 60, fmt="PNG", seed=2)),
        ("s3.jpg", b"garbage"),
    ]
    shard.write_bytes(tar_bytes(members))
    table = pa.table({"key": ["p1", "p2"], "image": [photo_bytes(50, 70, seed=5), photo_bytes(70, 50, seed=6)]})
    pq.write_table(table, tmp_path / "images.parquet")

    config = JobConfig(
        input=InputConfig((str(shard), str(tmp_path / "images.parquet")), id_column="key"),
        output=str(tmp_path / "out"),
        model=ModelSpec(weights="synthetic"),
        inference=INFERENCE,
        resources=ResourceConfig(batch_size=4, device="cpu"),
    )
    summary = run_job(config, show_progress=False)
    assert (summary.images_ok, summary.images_error) == (4, 1)
    ids = sorted(_read(tmp_path / "out", "images").column("image_id").to_pylist())
    assert ids == sorted([f"{shard}#s1.jpg", f"{shard}#s2.png", f"{shard}#s3.jpg", "p1", "p2"])
