"""One input never stops a job (`pipeline.segmenting.poison`): inputs that kill their model actor, or make a stage
raise, each get one error row, and every other image is committed once.

The job runs as `python -m tests.pipeline.fault_job` joined to this session's cluster, its workers patched by
`tests.pipeline.fault_hooks` (``PF_FAULT=poison``): an image whose bytes end in `POISON_DECODE` kills the
process decoding it (SIGSEGV, a crashing codec), one whose id holds `POISON_MODEL` kills the model's process,
one whose id holds `HANG_MODEL` hangs its model batch, one ending in `RAISE_DECODE` makes decoding raise a
RuntimeError. Every strike is logged, so each test also checks that its faults struck. 64 images in shards of
16 (``--rows-per-file 16``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.segmenting.poison import POISON_ERROR
from tests.pipeline.fault_hooks import HANG_MODEL, POISON_DECODE, POISON_MODEL, RAISE_DECODE
from tests.pipeline.images import photo_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 64
JOB_TIMEOUT_S = 420.0  # each death costs an actor restart (seconds on a small, shared machine)
JOB_FLAGS = [
    "--weights", "synthetic", "--device", "cpu", "--min-size", "64", "--max-size", "107",
    "--batch-size", "4", "--rows-per-file", "16", "--no-progress",
]  # fmt: skip


def _inputs(folder: Path, special: dict[int, str]) -> dict[str, str]:
    """NUM_IMAGES small JPEGs; image ``i`` in ``special`` is made into that fault. Returns id -> its fault."""
    folder.mkdir()
    faults = {}
    for i in range(NUM_IMAGES):
        fault = special.get(i, "")
        name = f"img{i:03d}-{fault}.jpg" if fault in (POISON_MODEL, HANG_MODEL) else f"img{i:03d}.jpg"
        data = photo_bytes(48, 64, seed=i)
        if fault == "decode-kill":
            data += POISON_DECODE  # after the JPEG's end: Pillow would read it fine
        elif fault == "decode-raise":
            data += RAISE_DECODE
        (folder / name).write_bytes(data)
        faults[str(folder / name)] = fault
    return faults


def _run(folder: Path, output: Path, marker: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    import ray

    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PF_FAULT": "poison",
        "PF_FAULT_MARKER": str(marker),
    }
    command = [sys.executable, "-m", "tests.pipeline.fault_job", "--input", str(folder), "--output", str(output)]
    return subprocess.run(
        [*command, *JOB_FLAGS, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )


def _rows(output: Path) -> list[dict]:
    return pads.dataset(str(output / "images"), format="parquet").to_table().to_pylist()


def _check(output: Path, faults: dict[str, str], errors: dict[str, str]) -> None:
    """Every input has exactly one row; those in ``errors`` an error starting with its text, the rest ok."""
    rows = _rows(output)
    assert Counter(r["image_id"] for r in rows) == Counter(list(faults))
    for row in rows:
        expected = errors.get(faults[row["image_id"]])
        if expected is None:
            assert row["status"] == "ok", row
        else:
            assert row["status"] == "error" and row["error"].startswith(expected), row
            assert not row["retryable"]


def test_inputs_that_kill_their_actor_get_one_error_row_each_and_a_rerun_does_nothing(
    ray_session: None, tmp_path: Path
) -> None:
    faults = _inputs(tmp_path / "in", {5: "decode-kill", 20: "decode-raise", 41: POISON_MODEL})
    output, marker = tmp_path / "out", tmp_path / "strikes"
    first = _run(tmp_path / "in", output, marker)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert "Traceback" not in first.stdout + first.stderr, first.stderr[-4000:]
    strikes = Counter(line.split()[0] for line in marker.read_text().splitlines())
    # killed in a batch's window, then again alone; the raise once (an error row at once)
    assert strikes == {"decode-kill": 2, "model-kill": 2, "decode-raise": 1}, strikes
    _check(
        output,
        faults,
        {
            "decode-kill": f"{POISON_ERROR} while decoding: skipped",
            POISON_MODEL: f"{POISON_ERROR} while segmenting: skipped",
            "decode-raise": "decoding failed: RuntimeError: a codec plugin's own exception",
        },
    )
    done = re.search(r"done: (\d+) images ok, (\d+) errors \((\d+) retryable\)", first.stdout)
    assert done and [int(n) for n in done.groups()] == [NUM_IMAGES - 3, 3, 0], first.stdout
    assert "; errors: 2 killed the model worker, 1 decoding failed: RuntimeError (" in first.stdout, first.stdout

    again = _run(tmp_path / "in", output, marker)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert sum(strikes.values()) == len(marker.read_text().splitlines())  # nothing struck: nothing was redone
    assert re.search(rf"done: 0 images ok, 0 errors .*{NUM_IMAGES} already committed", again.stdout), again.stdout
    assert len(_rows(output)) == NUM_IMAGES


def test_with_two_actors_a_crash_and_a_hung_batch_each_get_their_row(ray_session: None, tmp_path: Path) -> None:
    """Two actors (the retry may run on the other one: the record is the run's, not the actor's); a hung model
    batch is ended by the watchdog (``--hung-batch-timeout 3``) and isolated the same way."""
    faults = _inputs(tmp_path / "in", {9: HANG_MODEL, 50: "decode-kill"})
    output, marker = tmp_path / "out", tmp_path / "strikes"
    flags = ("--min-actors", "2", "--max-actors", "2", "--hung-batch-timeout", "3")
    result = _run(tmp_path / "in", output, marker, *flags)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-4000:]
    strikes = Counter(line.split()[0] for line in marker.read_text().splitlines())
    assert strikes == {"model-hang": 2, "decode-kill": 2}, strikes
    _check(
        output,
        faults,
        {
            HANG_MODEL: f"{POISON_ERROR} while segmenting (a model batch hung for",
            "decode-kill": f"{POISON_ERROR} while decoding: skipped",
        },
    )
