"""Exactly once across faults: the driver killed and re-run, a node lost mid-job (a model actor killed mid-batch
and write tasks killed mid-commit: tests/pipeline/test_write_stage.py).

Each test checks the output, not the logs: the ``images`` table holds every input id exactly once, the
``segments`` table has no duplicate (image_id, segment_id), every image's ``num_segments`` matches its
segment rows, and every ``segments`` part has its ``images`` part (no orphans left behind).

Write tasks commit parts of 2 images (``--rows-per-file 2``), so 32 inputs give 16 commits: the fault strikes
at the first, with most of the work still to commit. Processes are killed by PID, found as descendants of
processes these tests started (`tests.pipeline.fault_probes`), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.pipeline.fault_probes import (
    assert_exactly_once,
    committed_ids,
    descendants,
    wait_for,
)
from tests.pipeline.images import photo_bytes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds its processes through /proc"),
]

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 32  # two 16-image blocks
JOB_TIMEOUT_S = 240.0  # generous: the test machines are small and shared
JOB_FLAGS = [
    "--weights", "synthetic", "--device", "cpu", "--min-size", "64", "--max-size", "107",
    "--batch-size", "2", "--rows-per-file", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, set[str]]:
    """A folder of NUM_IMAGES small JPEGs and their image ids."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(NUM_IMAGES):
        (folder / f"img{i:03d}.jpg").write_bytes(photo_bytes(48, 64, seed=i))
    return folder, {str(p) for p in folder.glob("*.jpg")}


def test_killed_driver_then_rerun_commits_each_image_once(
    ray_session: None, inputs: tuple[Path, set[str]], tmp_path: Path
) -> None:
    """SIGKILL `python -m jobs.segment` (the driver, holder of the output's lease) after the first commit,
    then run the same command again: it takes the lease over, skips what was committed and does the rest."""
    import ray

    folder, expected = inputs
    output = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.segment", "--input", str(folder), "--output", str(output), *JOB_FLAGS]
    # The driver joins this session's cluster, as under `ray job submit`: the cluster outlives the driver.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = (tmp_path / "first.log").open("w")
    marker, release = tmp_path / "first-commit", tmp_path / "release"
    held = [sys.executable, "-m", "tests.pipeline.paused_job", *command[3:]]  # holds after its first commit
    held_env = {**env, "PF_FAULT_MARKER": str(marker), "PF_FAULT_RELEASE": str(release)}
    first = subprocess.Popen(held, cwd=REPO, env=held_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: marker.exists() or first.poll() is not None, timeout=JOB_TIMEOUT_S, what="a commit")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()  # SIGKILL; nothing when it has already exited
        first.wait()
        release.touch()  # the held worker dies with the job's driver; nothing else waits for this
        log.close()
    assert first.returncode == -signal.SIGKILL
    committed = committed_ids(output)
    assert 0 < len(committed) < NUM_IMAGES and not (output / "_SUCCESS").exists()

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    noise = ("Failed to convert column", "Execution plan", "used up to", "Progress bars disabled", "issue detection")
    assert [n for n in noise if n in second.stdout + second.stderr] == []  # Ray Data's messages: --verbose only
    done = re.search(
        r"done: (\d+) images ok, (\d+) errors \(0 retryable\), \d+ segments, (\d+) already committed.*now holds (\d+) "
        r"images",
        second.stdout,
    )
    assert done, second.stdout
    assert [int(n) for n in done.groups()] == [NUM_IMAGES - len(committed), 0, len(committed), NUM_IMAGES]
    success = json.loads((output / "_SUCCESS").read_text())
    assert success["this_run"]["images_ok"] == NUM_IMAGES - len(committed)
    assert success["output"]["images"] == success["output"]["images_ok"] == NUM_IMAGES
    assert_exactly_once(output, expected)


def test_lost_node_mid_job(inputs: tuple[Path, set[str]], tmp_path: Path) -> None:
    """A two-node cluster loses the node holding the model actor and decoded blocks after the first
    commit, and a replacement joins: the actor restarts there, lost blocks are rebuilt from lineage.
    Runs `tests.pipeline.fault_node_loss` in its own process (its own cluster, its own RAY_TMPDIR)."""
    folder, expected = inputs
    output = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="pf-f-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    command = [sys.executable, "-m", "tests.pipeline.fault_node_loss", "--input", str(folder), "--output", str(output)]
    script = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = script.communicate(timeout=JOB_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(script.pid), script.pid]:  # still running, so still its descendants
            _kill(pid)
        stdout, stderr = script.communicate()
        pytest.fail(f"the node-loss script timed out:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    finally:
        for pid in _processes_naming(ray_tmp):  # anything of its cluster that outlived it
            _kill(pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert script.returncode == 0, stdout[-2000:] + stderr[-4000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["actors_on_lost_node"] == 1 and report["job_alive_after_loss"], report
    assert 0 < report["committed_before_loss"] < NUM_IMAGES, report
    assert report["job_finished"] and "job_error" not in report, report
    assert report["images_ok"] == NUM_IMAGES, report
    assert_exactly_once(output, expected)


def _processes_naming(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text`` (a path unique to this test)."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and text.encode() in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
