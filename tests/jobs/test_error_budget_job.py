"""A systematic failure stops the job early (the error budget, `pipeline.error_budget`): one line, exit 1, the
committed parts kept; a re-run after the cause is gone completes the output exactly once.

Every read fails after the first 16 images (`tests.pipeline.failing_reads`, a worker hook: access denied, a
retryable error row), in parts of 8 images with ``--error-window 40``: after the 5th part, 24 of the last 40
images failed (more than the default half) and the job stops before its 12 parts are all committed (the parts
in flight at the stop may still be).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.pipeline.fault_probes import assert_exactly_once, committed_parts
from tests.pipeline.images import photo_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300.0
NUM_IMAGES = 96  # 12 parts of 8
READS_BEFORE_THE_FAULT = 16  # 2 parts
FLAGS = ["--weights", "synthetic", "--device", "cpu", "--min-size", "64", "--max-size", "107",
         "--batch-size", "4", "--rows-per-file", "8", "--error-window", "40", "--max-actors", "1",
         "--no-progress"]  # fmt: skip
STOPPED = re.compile(
    r'panoptic-flow segment: stopped: (\d+) of the last (\d+) images failed \(most common: "([^"]+)", (\d+) '
    r"images\); the parts committed so far are kept: fix the cause and re-run the same command to resume, or raise "
    r"--max-error-rate"
)


def test_a_systematic_failure_stops_the_job_and_a_rerun_completes_it(ray_session: None, tmp_path: Path) -> None:
    import ray

    folder, output, marker = tmp_path / "in", tmp_path / "out", tmp_path / "failed-reads"
    folder.mkdir()
    for i in range(NUM_IMAGES):
        (folder / f"img{i:03d}.jpg").write_bytes(photo_bytes(32, 40, seed=i))
    expected = {str(p) for p in folder.glob("*.jpg")}
    arguments = ["--input", str(folder), "--output", str(output), *FLAGS]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # joins this session's cluster
    failing = {**env, "PF_FAIL_READS_MARKER": str(marker), "PF_FAIL_READS_AFTER": str(READS_BEFORE_THE_FAULT)}

    first = subprocess.run([sys.executable, "-m", "tests.pipeline.failing_reads", *arguments], cwd=REPO,
                           env=failing, capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    err = first.stderr
    assert first.returncode == 1, first.stdout[-2000:] + err[-4000:]
    assert marker.exists(), "no read failed: the fault never struck"
    lines = [line for line in err.splitlines() if "stopped:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-4000:]
    stopped = STOPPED.fullmatch(lines[0])
    assert stopped, lines[0]
    failed, window, kind, hit = stopped.groups()
    assert int(window) == 40 and 20 < int(failed) == int(hit) <= 40 and kind == "unreadable: PermissionError"

    # stopped early: the images of the first parts committed (ok before the fault, retryable errors after it)
    images = pads.dataset(str(output / "images"), format="parquet").to_table().to_pylist()
    assert 40 <= len(images) < NUM_IMAGES, len(images)
    assert len(marker.read_text().splitlines()) < NUM_IMAGES - READS_BEFORE_THE_FAULT
    ok = [r for r in images if r["status"] == "ok"]
    errors = [r for r in images if r["status"] == "error"]
    assert len(ok) == READS_BEFORE_THE_FAULT and len({r["image_id"] for r in images}) == len(images)
    assert all(r["error"].startswith("unreadable: PermissionError: ") and r["retryable"] for r in errors)
    records = [json.loads(p.read_text()) for p in (output / "_runs").glob("*.json")]
    assert [(r["status"], r["error"].split(":")[0]) for r in records] == [("failed", "ErrorBudgetExceeded")]
    assert not (output / "_SUCCESS").exists()
    assert "released" in json.loads((output / "_lease.json").read_text())
    ok_parts = {p.name: _files(output, p.name) for p in committed_parts(output) if _all_ok(p)}
    assert sum(len(_ids(p)) for p in committed_parts(output) if p.name in ok_parts) == READS_BEFORE_THE_FAULT

    # the cause removed (a job without the hook): the same command resumes and completes the output exactly once
    again = subprocess.run([sys.executable, "-m", "jobs.segment", *arguments], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    done = re.search(r"done: (\d+) images ok, 0 errors .*?, (\d+) already committed, (\d+) redone \(retryable\)",
                     again.stdout)  # fmt: skip
    assert done, again.stdout
    assert [int(n) for n in done.groups()] == [NUM_IMAGES - len(ok), len(ok), len(errors)]
    assert_exactly_once(output, expected)  # every image once, all ok, segments matching their images rows
    kept = {name: _files(output, name) for name in ok_parts}
    assert kept == ok_parts  # the parts committed before the stop are the same files, segments included


def _files(output: Path, name: str) -> tuple[bytes, bytes]:
    """The bytes of a part's ``images`` and ``segments`` files."""
    return (output / "images" / name).read_bytes(), (output / "segments" / name).read_bytes()


def _ids(part: Path) -> list[str]:
    return pads.dataset(str(part), format="parquet").to_table(columns=["image_id"]).column("image_id").to_pylist()


def _all_ok(part: Path) -> bool:
    status = pads.dataset(str(part), format="parquet").to_table(columns=["status"]).column("status").to_pylist()
    return set(status) == {"ok"}
