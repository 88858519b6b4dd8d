"""Unreadable committed parts are moved to ``_quarantine/<run>/`` on every store, and their images redone
exactly once, also when the re-run gathers its parts differently (another ``--rows-per-file``: the redone
parts get other names, so nothing overwrites the bad files by chance)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import fsspec
import pytest
import s3fs

from jobs.query import connect, run_query
from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease
from tests.pipeline.fault_probes import assert_exactly_once
from tests.pipeline.images import photo_bytes

pytestmark = pytest.mark.slow

N_IMAGES = 8


def _config(folder: Path, output: str, *, rows_per_file: int) -> JobConfig:
    return JobConfig(
        input=InputConfig((str(folder),)),
        output=output,
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(batch_size=2, device="cpu", rows_per_file=rows_per_file, max_actors=1),  # parts as cut
    )


def _photos(folder: Path) -> set[str]:
    folder.mkdir(parents=True)
    for i in range(N_IMAGES):
        (folder / f"img{i:02d}.jpg").write_bytes(photo_bytes(48, 64, seed=i))
    return {str(folder / f"img{i:02d}.jpg") for i in range(N_IMAGES)}


def _damage_two_parts_and_rerun(folder: Path, output: str, fs, root: str) -> tuple[list[str], object]:
    """Run, replace two committed images parts by random bytes, re-run with another --rows-per-file; returns
    (the damaged part names, the re-run's summary)."""
    from pipeline.run import run_job

    first = run_job(_config(folder, output, rows_per_file=2), show_progress=False)
    assert first.totals.images == N_IMAGES and first.parts == N_IMAGES // 2
    parts = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/images"))
    damaged = parts[:2]
    for i, name in enumerate(damaged):
        fs.pipe_file(f"{root}/images/{name}", os.urandom(300 + i))
    fs.invalidate_cache()
    second = run_job(_config(folder, output, rows_per_file=3), show_progress=False)
    fs.invalidate_cache()
    return damaged, second


def _check_rerun(output: Path, damaged: list[str], summary: object, expected: set[str]) -> None:
    """``output``: a local folder (an S3 output is copied to one first)."""
    assert summary.quarantined == 2 and summary.this_run.images == 4 and summary.skipped_committed == 4
    assert summary.totals.images == N_IMAGES and summary.totals.images_ok == N_IMAGES
    moved = sorted(str(p.relative_to(output / "_quarantine")) for p in (output / "_quarantine").rglob("*.parquet"))
    run = summary.run_id
    assert moved == sorted(f"{run}/{table}/{name}" for table in ("images", "segments") for name in damaged)
    assert not {p.name for p in (output / "images").iterdir()} & set(damaged)
    assert not {p.name for p in (output / "segments").iterdir()} & set(damaged)
    assert_exactly_once(output, expected)
    con = connect(str(output))
    try:
        _, rows = run_query(con, "SELECT count(*), count(DISTINCT image_id), sum(num_segments) FROM images")
        _, segments = run_query(con, "SELECT count(*) FROM segments JOIN images USING (image_id)")
    finally:
        con.close()
    assert rows[0][:2] == (N_IMAGES, N_IMAGES) and segments[0][0] == rows[0][2]


def test_damaged_parts_on_a_local_output_are_quarantined_and_redone(ray_session: None, tmp_path: Path) -> None:
    from pipeline.run import run_job

    expected = _photos(tmp_path / "in")
    output = tmp_path / "out"
    fs = fsspec.filesystem("file")
    damaged, second = _damage_two_parts_and_rerun(tmp_path / "in", str(output), fs, str(output))
    _check_rerun(output, damaged, second, expected)
    third = run_job(_config(tmp_path / "in", str(output), rows_per_file=3), show_progress=False)
    assert (third.quarantined, third.this_run.images, third.skipped_committed) == (0, 0, N_IMAGES)
    assert_exactly_once(output, expected)


def test_damaged_parts_on_an_s3_output_are_quarantined_and_redone(ray_session: None, tmp_path: Path) -> None:
    from pipeline.run import run_job

    bucket = "pf-quarantine"
    boto3.client("s3").create_bucket(Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    expected = _photos(tmp_path / "in")
    output = f"s3://{bucket}/out"
    damaged, second = _damage_two_parts_and_rerun(tmp_path / "in", output, fs, f"{bucket}/out")
    copy = tmp_path / "copy"
    fs.get(f"{bucket}/out/", str(copy), recursive=True)
    _check_rerun(copy, damaged, second, expected)
    con = connect(output)  # the query command on the S3 output itself
    try:
        _, rows = run_query(con, "SELECT count(*) FROM images WHERE status = 'ok'")
    finally:
        con.close()
    assert rows == [(N_IMAGES,)]
    third = run_job(_config(tmp_path / "in", output, rows_per_file=3), show_progress=False)
    assert (third.quarantined, third.this_run.images, third.skipped_committed) == (0, 0, N_IMAGES)


def test_a_move_that_fails_is_raised_and_a_vanished_part_is_not(tmp_path: Path) -> None:
    """Unit: the move's own failure reaches the caller; a part already gone (moved by hand) is no error."""
    root = tmp_path / "out"

    def quarantine(part: str, *, run_id: str, problem: str) -> None:
        with Lease.acquire(str(root), run_id) as lease:
            OutputCommitter(str(root), run_id, lease=lease).quarantine(part, problem=problem)

    (root / "images").mkdir(parents=True)
    (root / "images" / "part-a.parquet").write_bytes(b"junk")
    quarantine(str(root / "images" / "part-a.parquet"), run_id="r1", problem="test")  # no segments
    assert (root / "_quarantine" / "r1" / "images" / "part-a.parquet").read_bytes() == b"junk"
    quarantine(str(root / "images" / "part-a.parquet"), run_id="r2", problem="test")  # gone already
    (root / "images" / "part-b.parquet").write_bytes(b"junk")
    (root / "_quarantine" / "r3").write_bytes(b"a file where the run's folder goes")
    with pytest.raises(OSError):
        quarantine(str(root / "images" / "part-b.parquet"), run_id="r3", problem="test")
    assert (root / "images" / "part-b.parquet").read_bytes() == b"junk"  # still there, and the caller knows
