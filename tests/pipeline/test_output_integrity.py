"""An output that stays right: one writer at a time, nothing half-published, transient errors retried, stale
results detected, the output never read as input, ids never shared. Each case is checked row by row.

Jobs that must be separate processes (two drivers on one output; a driver stopped by a signal) run
`python -m jobs.segment` joined to this session's cluster (``RAY_ADDRESS``), as under ``ray job submit``.
S3 faults are injected by the session's fault proxy, which every S3 client goes through, Ray workers too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import s3fs

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.exactly_once.run_records import SettingsChanged
from pipeline.reading.output_tables import open_table
from tests.pipeline.fault_probes import assert_exactly_once, committed_parts, wait_for
from tests.pipeline.images import photo_bytes, tar_bytes
from tests.s3_server import FaultProxy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300.0
JOB_FLAGS = ["--weights", "synthetic", "--device", "cpu", "--min-size", "64", "--max-size", "107",
             "--batch-size", "2", "--rows-per-file", "2", "--max-actors", "1", "--no-progress"]  # fmt: skip


def _config(inputs: list[str], output: str, *, threshold: float = 0.85, rows_per_file: int = 2) -> JobConfig:
    return JobConfig(
        input=InputConfig(tuple(inputs)),
        output=output,
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107, threshold=threshold),
        resources=ResourceConfig(batch_size=2, device="cpu", rows_per_file=rows_per_file, max_actors=1),
    )


def _images(output: Path | str) -> dict[str, dict]:
    """The images rows by id of the latest snapshot (asserting that no id has two); ``s3://`` through s3fs."""
    if str(output).startswith("s3://"):
        s3fs.S3FileSystem().invalidate_cache()
    rows = open_table(str(output), "images").to_table().to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    return {r["image_id"]: r for r in rows}


def _photos(folder: Path, n: int, *, prefix: str = "img") -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{prefix}{i:02d}.jpg").write_bytes(photo_bytes(48, 64, seed=i))
    return {str(p) for p in folder.glob(f"{prefix}*.jpg")}


def _segment_command(folder: Path | str, output: Path | str) -> list[str]:
    return [sys.executable, "-m", "jobs.segment", "--input", str(folder), "--output", str(output), *JOB_FLAGS]


def _cluster_env() -> dict[str, str]:
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("panoptic-flow segment: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# -- one writer per output ----------------------------------------------------------------------------------


def test_two_jobs_started_together_on_one_output(ray_session: None, tmp_path: Path) -> None:
    expected = _photos(tmp_path / "in", 16)
    output = tmp_path / "out"
    command, env = _segment_command(tmp_path / "in", output), _cluster_env()
    jobs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(job, *job.communicate(timeout=TIMEOUT_S)) for job in jobs]
    assert sorted(job.returncode for job, _, _ in results) == [0, 2], [err[-2000:] for _, _, err in results]
    loser = next(err for job, _, err in results if job.returncode == 2)
    assert "is being written by run" in _error_line(loser)
    assert_exactly_once(output, expected)


def test_a_job_started_mid_run_exits_2_and_deletes_nothing(ray_session: None, tmp_path: Path) -> None:
    expected = _photos(tmp_path / "in", 24)
    output = tmp_path / "out"
    marker, release = tmp_path / "first-commit", tmp_path / "release"
    env = {**_cluster_env(), "PF_FAULT_MARKER": str(marker), "PF_FAULT_RELEASE": str(release)}
    held = [sys.executable, "-m", "tests.pipeline.paused_job", *_segment_command(tmp_path / "in", output)[3:]]
    first = subprocess.Popen(held, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the first job holds right after its first commit until `release` exists: no race with its speed
        wait_for(lambda: marker.exists() or first.poll() is not None, timeout=TIMEOUT_S, what="the first commit")
        assert first.poll() is None, first.communicate()[1][-3000:]
        before = {p.name for p in committed_parts(output)}
        assert before, "the first job is held after a commit"
        command = _segment_command(tmp_path / "in", output)
        second = subprocess.run(command, cwd=REPO, env=_cluster_env(), capture_output=True, text=True,
                                timeout=TIMEOUT_S)  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        line = _error_line(second.stderr)
        assert "is being written by run" in line and f"pid {first.pid}" in line
        assert before <= {p.name for p in committed_parts(output)}  # nothing of the first job's removed
        release.touch()
        _, err = first.communicate(timeout=TIMEOUT_S)
    finally:
        release.touch()
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert before <= {p.name for p in committed_parts(output)}
    assert_exactly_once(output, expected)


# -- nothing half-published, transient errors retried -------------------------------------------------------


def test_transient_read_errors_are_retried_by_the_next_run(
    ray_session: None, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    from pipeline.run import run_job

    bucket = "pf-transient"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for name in ("ok0.jpg", "ok1.jpg", "flaky.jpg"):
        client.put_object(Bucket=bucket, Key=f"in/{name}", Body=photo_bytes(48, 64, seed=len(name)))
    s3fs.S3FileSystem.clear_instance_cache()
    config = _config([f"s3://{bucket}/in/"], str(tmp_path / "out"))
    s3_proxy.set_fault("reset", count=10**6, methods=["GET"], paths=[f"/{bucket}/in/flaky.jpg"])  # unreachable
    try:
        first = run_job(config, show_progress=False)
    finally:
        s3_proxy.heal()
    flaky = f"s3://{bucket}/in/flaky.jpg"
    rows = _images(tmp_path / "out")
    assert rows[flaky]["status"] == "error" and rows[flaky]["retryable"], rows[flaky]
    assert rows[flaky]["error"].startswith("unreadable:")
    assert (first.images_ok, first.this_run.images_retryable) == (2, 1)

    second = run_job(config, show_progress=False)  # the store is back
    rows = _images(tmp_path / "out")
    assert rows[flaky]["status"] == "ok" and not rows[flaky]["retryable"]
    assert rows[flaky]["run_id"] == second.run_id and rows[flaky]["input_size"] > 0
    assert {r["run_id"] for i, r in rows.items() if i != flaky} == {first.run_id}
    assert (second.images_ok, second.skipped_committed, second.redone) == (1, 2, {"retryable": 1})
    assert (second.totals.images_ok, second.totals.images_error) == (3, 0)
    segments = open_table(str(tmp_path / "out"), "segments").to_table(columns=["image_id"]).column("image_id")
    assert segments.to_pylist().count(flaky) == rows[flaky]["num_segments"]


def test_a_signal_during_an_s3_part_write_then_a_resume(
    ray_session: None, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The driver gets SIGTERM while a part is going up; an unreadable part left by an older version is moved
    aside. Every object under a final name is whole, the lease is released, and a resume commits each image
    once."""
    from pipeline.run import run_job

    bucket = "pf-signal"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="out/images/part-old.parquet", Body=b"PAR1 cut short by a signal")
    client.put_object(Bucket=bucket, Key="out/segments/part-old.parquet", Body=b"PAR1 ...")
    expected = _photos(tmp_path / "in", 8)
    output = f"s3://{bucket}/out"
    injected = s3_proxy.faults_injected
    s3_proxy.set_fault("delay", count=1, methods=["PUT"], paths=[f"/{bucket}/out/images/"], delay_s=5.0)
    job = subprocess.Popen(_segment_command(tmp_path / "in", output), cwd=REPO, env=_cluster_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: s3_proxy.faults_injected > injected or job.poll() is not None, timeout=TIMEOUT_S,
                 what="a part upload")  # fmt: skip
        assert job.poll() is None, "the job ended before the signal"
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=TIMEOUT_S)
    finally:
        job.kill()
        s3_proxy.heal()
    assert job.returncode != 0, err[-2000:]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_lease.json")  # released on the way out
    assert not fs.exists(f"{bucket}/out/_SUCCESS")
    quarantined = fs.find(f"{bucket}/out/_quarantine")
    assert sorted(p.rsplit("/", 2)[-2] for p in quarantined) == ["images", "segments"], quarantined
    wait_for(lambda: fs.find(f"{bucket}/out/images", refresh=True), timeout=60, what="the held upload")
    for path in fs.find(f"{bucket}/out/images") + fs.find(f"{bucket}/out/segments"):
        with fs.open(path, "rb") as f:
            pq.ParquetFile(f).read()  # whole: a cut-short object would not parse

    summary = run_job(_config([str(tmp_path / "in")], output), show_progress=False)
    rows = _images(output)
    assert set(rows) == expected and all(r["status"] == "ok" for r in rows.values())
    assert summary.totals.images == len(expected) and summary.quarantined == 0
    segments = pads.dataset(f"{bucket}/out/segments", filesystem=fs).to_table(columns=["image_id", "segment_id"])
    pairs = list(zip(segments["image_id"].to_pylist(), segments["segment_id"].to_pylist()))
    assert len(pairs) == len(set(pairs)) == sum(r["num_segments"] for r in rows.values())


# -- stale results, lineage, settings -----------------------------------------------------------------------


def test_changed_deleted_and_added_inputs_and_a_changed_threshold_after_a_crash(
    ray_session: None, tmp_path: Path
) -> None:
    from pipeline.run import run_job

    folder = tmp_path / "in"
    _photos(folder, 6)
    shard = folder / "shard.tar"
    shard.write_bytes(tar_bytes([(f"s{i}.jpg", photo_bytes(48, 64, seed=20 + i)) for i in range(3)]))
    output = tmp_path / "out"
    first = run_job(_config([str(folder)], str(output)), show_progress=False)
    assert first.totals.images == 9
    before = _images(output)  # run 1's snapshot, read before the crash below takes a file it lists
    img = {i: str(folder / f"img{i:02d}.jpg") for i in range(7)}
    member = {name: f"{shard}#{name}" for name in ("s0.jpg", "s1.jpg", "s2.jpg", "s3.jpg")}
    # A crash: one part (not holding img00 / img01) lost its images file; its segments file stays, an orphan.
    crashed = next(p for p in committed_parts(output) if not {img[0], img[1]} & set(_ids(p)))
    lost = _ids(crashed)
    crashed.unlink()
    # Meanwhile: img00 is replaced by a different photo, img01 deleted, img06 added, the shard rewritten.
    (folder / "img00.jpg").write_bytes(photo_bytes(64, 48, seed=99))
    (folder / "img01.jpg").unlink()
    (folder / "img06.jpg").write_bytes(photo_bytes(48, 64, seed=6))
    shard.write_bytes(tar_bytes([("s0.jpg", photo_bytes(64, 64, seed=30)), ("s3.jpg", photo_bytes(48, 64, seed=33))]))
    success, records = (output / "_SUCCESS").read_text(), sorted(os.listdir(output / "_runs"))

    with pytest.raises(SettingsChanged, match=r"threshold=0\.85 \(now 0\.7\)"):
        run_job(_config([str(folder)], str(output), threshold=0.7), show_progress=False)
    assert (output / "_SUCCESS").read_text() == success and sorted(os.listdir(output / "_runs")) == records
    assert (output / "segments" / crashed.name).exists()  # nothing touched: it stopped before any clean-up

    second = run_job(_config([str(folder)], str(output)), show_progress=False)
    rows = _images(output)
    assert set(rows) == {*img.values(), member["s0.jpg"], member["s3.jpg"]}  # s1, s2 left the shard
    assert (rows[img[0]]["width"], rows[img[0]]["height"], rows[img[0]]["run_id"]) == (48, 64, second.run_id)
    assert rows[img[1]] == before[img[1]]  # deleted input: its row kept, reported
    for image_id in {img[6], member["s0.jpg"], member["s3.jpg"], *(set(lost) & set(rows))}:
        assert rows[image_id]["run_id"] == second.run_id, image_id
    for image_id in set(before) - {img[0], *lost, *member.values()}:
        assert rows[image_id] == before[image_id], image_id  # untouched
    shard_rows_before = sum(1 for i in before if i.startswith(f"{shard}#") and i not in lost)  # still committed
    assert second.redone == {"changed": 1 + shard_rows_before} and second.unlisted == 1
    assert second.totals.images == len(rows) and all(r["status"] == "ok" for r in rows.values())
    assert all(r["input_version"] and r["input_size"] > 0 for r in rows.values())  # lineage recorded
    run = json.loads((output / "_runs" / f"{second.run_id}.json").read_text())
    assert run["settings"]["threshold"] == 0.85 and run["status"] == "finished"
    assert_exactly_once(output, set(rows))


# -- the output is never an input; ids are unambiguous -------------------------------------------------------


def test_output_inside_the_input_and_a_file_named_like_a_shard_member(ray_session: None, tmp_path: Path) -> None:
    from pipeline.run import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo_bytes(48, 64, seed=1))
    (folder / "big.tar").write_bytes(tar_bytes([("s0001.jpg", photo_bytes(48, 64, seed=2))]))
    (folder / "big.tar#s0001.jpg").write_bytes(photo_bytes(64, 48, seed=3))  # not the member: another image
    output = folder / "out"
    expected = {str(folder / "a.jpg"), f"{folder}/big.tar#s0001.jpg", f"{folder}/big.tar%23s0001.jpg"}
    for attempt in range(2):
        summary = run_job(_config([str(folder)], str(output)), show_progress=False)
        rows = _images(output)
        assert set(rows) == expected, attempt
        assert all(r["status"] == "ok" for r in rows.values())
        assert summary.skipped_committed == (0 if attempt == 0 else 3) and summary.totals.images == 3
    assert rows[f"{folder}/big.tar%23s0001.jpg"]["source"] == str(folder / "big.tar#s0001.jpg")
    assert rows[f"{folder}/big.tar%23s0001.jpg"]["member"] is None
    assert (rows[f"{folder}/big.tar#s0001.jpg"]["source"], rows[f"{folder}/big.tar#s0001.jpg"]["member"]) == (
        str(folder / "big.tar"),
        "s0001.jpg",
    )
    assert (rows[f"{folder}/big.tar%23s0001.jpg"]["width"], rows[f"{folder}/big.tar#s0001.jpg"]["width"]) == (48, 64)


def _ids(part: Path) -> list[str]:
    return pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()
