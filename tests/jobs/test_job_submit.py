"""`ray job submit --working-dir . -- python -m jobs.segment ...` against a local head node started by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.pipeline.images import photo_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ray_job_submit_runs_the_segment_job(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"s{i}.jpg").write_bytes(photo_bytes(50, 60, seed=50 + i))
    output = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="pf-js-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp
    done = subprocess.run(
        [sys.executable, "-m", "tests.jobs.job_submit_cluster", "--input", str(folder), "--output", str(output)],
        capture_output=True, text=True, timeout=540, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["returncode"] == 0, report
    assert "succeeded" in report["stdout_tail"] and "done: 3 images ok, 0 errors" in report["stdout_tail"]
    ids = pads.dataset(str(output / "images"), format="parquet").to_table().column("image_id").to_pylist()
    assert sorted(ids) == sorted(str(folder / f"s{i}.jpg") for i in range(3))
