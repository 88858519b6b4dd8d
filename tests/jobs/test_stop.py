"""A job stopped by SIGTERM (what ``ray job stop`` and schedulers send) or SIGINT says so in one line and exits
143 / 130; its run record says failed, its lease is released, and the same command resumes it exactly once.

The job is held mid-run deterministically, not raced: its inputs are on S3 behind the session's fault proxy,
which holds the GET of the last image (alone in its read task) for minutes. The job commits parts of the other
images meanwhile, so the test waits for a committed part, and the job cannot finish before the signal. A held
GET forwarded later reads; it writes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import s3fs

from tests.pipeline.fault_probes import assert_exactly_once, committed_parts, wait_for
from tests.pipeline.images import photo_bytes
from tests.s3_server import FaultProxy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300.0
HELD_S = 240.0  # the last image's read is held this long: longer than the test needs to send its signal
READ_TASK_REFS = 16  # `pipeline.run.REFS_PER_READ_TASK`: the held image is the 17th, alone in its read task
FLAGS = ["--weights", "synthetic", "--device", "cpu", "--min-size", "64", "--max-size", "107",
         "--batch-size", "2", "--rows-per-file", "2", "--max-actors", "1", "--no-progress"]  # fmt: skip


def _inputs(bucket: str) -> set[str]:
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    names = [f"img{i:02d}.jpg" for i in range(READ_TASK_REFS)] + ["z-held.jpg"]
    for i, name in enumerate(names):
        client.put_object(Bucket=bucket, Key=f"in/{name}", Body=photo_bytes(32, 40, seed=i))
    s3fs.S3FileSystem.clear_instance_cache()
    return {f"s3://{bucket}/in/{name}" for name in names}


def _default_sigint() -> None:
    """The job's SIGINT as a terminal gives it: a test run started in the background of a shell inherits SIGINT
    ignored (POSIX shells do that to background jobs), and so would the job, which then never sees Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_mid_run(bucket: str, output: Path, s3_proxy: FaultProxy, signum: int) -> tuple[subprocess.Popen[str], str]:
    import ray

    command = [sys.executable, "-m", "jobs.segment", "--input", f"s3://{bucket}/in/", "--output", str(output), *FLAGS]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    s3_proxy.set_fault("delay", count=1, methods=["GET"], paths=[f"/{bucket}/in/z-held.jpg"], delay_s=HELD_S)
    job = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        wait_for(lambda: committed_parts(output) or job.poll() is not None, timeout=TIMEOUT_S, what="a commit")
        assert job.poll() is None, "the job ended although its last read was held"
        job.send_signal(signum)
        _, err = job.communicate(timeout=TIMEOUT_S)
    finally:
        job.kill()
        s3_proxy.heal()
    return job, err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_job_says_so_in_one_line_and_resumes(
    ray_session: None, s3_proxy: FaultProxy, tmp_path: Path, signum: int, code: int
) -> None:
    bucket = f"pf-stop-{code}"
    expected = _inputs(bucket)
    output = tmp_path / "out"
    job, err = _stop_mid_run(bucket, output, s3_proxy, signum)
    assert job.returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if "stopped by" in line]
    assert lines == [f"panoptic-flow segment: stopped by {name}; re-run the same command to resume"], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    records = [json.loads(p.read_text()) for p in (output / "_runs").glob("*.json")]
    assert [r["status"] for r in records] == ["failed"]
    assert "released" in json.loads((output / "_lease.json").read_text())
    assert not (output / "_SUCCESS").exists()

    command = [sys.executable, "-m", "jobs.segment", "--input", f"s3://{bucket}/in/", "--output", str(output), *FLAGS]
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(output, expected)


def test_the_job_bounds_rays_retries_of_oom_killed_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray retries a task its memory monitor killed without end by default; the job bounds it (a user's value
    wins), set before Ray starts in the driver, which owns Ray Data's tasks."""
    from jobs.segment import OOM_RETRIES, main

    name = "RAY_task_oom_retries"  # Ray's spelling: RAY_ and the config's name
    args = ["--input", str(tmp_path / "none"), "--output", str(tmp_path / "out"), "--weights", "synthetic"]
    monkeypatch.delenv(name, raising=False)
    assert main(args) == 2  # no such input: stops before any cluster work, the setting made first
    assert os.environ[name] == str(OOM_RETRIES)
    monkeypatch.setenv(name, "7")
    assert main(args) == 2 and os.environ[name] == "7"
