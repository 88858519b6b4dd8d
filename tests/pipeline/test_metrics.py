"""The job's Ray metrics (`pipeline.segmenting.metrics`): counted in a Ray actor and read back from the node's
Prometheus endpoint, as a cluster's Prometheus scrapes it (`tests.pipeline.metrics_cluster`, in its own process and
cluster); and a no-op that never raises outside Ray or when Ray's metrics fail."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.segmenting import metrics
from pipeline.segmenting.metrics import PartMetrics

REPO = Path(__file__).resolve().parents[2]

ROWS: list[dict[str, object]] = [
    {
        "part": "part-a.parquet", "images_ok": 5, "images_error": 2, "images_retryable": 1, "segments": 40,
        "bytes": 1000, "node_id": "n1", "seconds": 0.1,
        "error_kinds": [{"kind": "unreadable: ClientError", "count": 2}],
        "stages": {"wall": 2.0, "read": 0.25, "decode": 1.5, "model": 1.0, "rle": 0.5, "commit": 0.125,
                   "model_idle": 0.75, "waited_read": 0.0, "waited_decode": 0.5, "waited_model": 1.0,
                   "waited_rle": 0.0, "waited_commit": 0.25},
        "cpus": 4.0,
    },
    {
        "part": "part-b.parquet", "images_ok": 3, "images_error": 2, "images_retryable": 0, "segments": 7,
        "bytes": 900, "node_id": "n1", "seconds": 0.1,
        "error_kinds": [{"kind": "unreadable: ClientError", "count": 1}, {"kind": "not an image", "count": 1}],
        "stages": {"wall": 3.0, "read": 0.5, "decode": 0.5, "model": 2.5, "rle": 0.25, "commit": 0.125,
                   "model_idle": 0.25, "waited_read": 0.0, "waited_decode": 0.0, "waited_model": 2.0,
                   "waited_rle": 0.0, "waited_commit": 0.5},
        "cpus": 4.0,
    },
    # a part row as PART_ROW_SCHEMA had it before "stages": images, errors and segments only
    {"part": "part-c.parquet", "images_ok": 4, "images_error": 0, "images_retryable": 0, "segments": 3,
     "bytes": 800, "node_id": "n1", "seconds": 0.1, "error_kinds": []},
]  # fmt: skip

# What Prometheus reads, summed by hand from ROWS (every sample with this run id: no other, none missing;
# a stage's zero seconds export nothing). Names: ray_ + the counter's name + _total.
EXPECTED = {
    ("ray_panoptic_flow_images_total", (("status", "ok"),)): 12.0,
    ("ray_panoptic_flow_images_total", (("status", "error"),)): 4.0,
    ("ray_panoptic_flow_errors_total", (("kind", "unreadable: ClientError"),)): 3.0,
    ("ray_panoptic_flow_errors_total", (("kind", "not an image"),)): 1.0,
    ("ray_panoptic_flow_segments_total", ()): 50.0,
    ("ray_panoptic_flow_parts_total", ()): 3.0,
    ("ray_panoptic_flow_stage_seconds_total", (("stage", "read"),)): 0.75,
    ("ray_panoptic_flow_stage_seconds_total", (("stage", "decode"),)): 2.0,
    ("ray_panoptic_flow_stage_seconds_total", (("stage", "model"),)): 3.5,
    ("ray_panoptic_flow_stage_seconds_total", (("stage", "rle"),)): 0.75,
    ("ray_panoptic_flow_stage_seconds_total", (("stage", "commit"),)): 0.25,
    ("ray_panoptic_flow_model_idle_seconds_total", ()): 1.0,
    ("ray_panoptic_flow_waited_seconds_total", (("stage", "decode"),)): 0.5,
    ("ray_panoptic_flow_waited_seconds_total", (("stage", "model"),)): 3.0,
    ("ray_panoptic_flow_waited_seconds_total", (("stage", "commit"),)): 0.75,
    ("ray_panoptic_flow_wall_seconds_total", ()): 5.0,
    ("ray_panoptic_flow_reserved_cpu_seconds_total", ()): 20.0,
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray clusters in a subprocess")
def test_counters_reach_prometheus() -> None:
    ray_tmp = tempfile.mkdtemp(prefix="pf-m-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    command = [sys.executable, "-m", "tests.pipeline.metrics_cluster", json.dumps(ROWS)]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    samples = json.loads(done.stdout.strip().splitlines()[-1])
    run_id = ("run_id", "metrics-test-run")  # PartMetrics' tags: on every series
    assert all(run_id in labels.items() for _, labels, _ in samples), samples
    got = {(name, tuple(sorted(k for k in labels.items() if k != run_id))): value for name, labels, value in samples}
    assert got == {(name, tuple(sorted(labels))): value for (name, labels), value in EXPECTED.items()}, (
        f"after {time.monotonic() - started:.0f} s; stderr: {done.stderr[-2000:]}"
    )


class _FailingCounter:
    """Stands in for `ray.util.metrics.Counter`: created fine, every increment raises."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def set_default_tags(self, tags: dict[str, str]) -> None:
        pass

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        raise RuntimeError("metrics agent gone")


def _no_counter(*args: object, **kwargs: object) -> None:
    raise AssertionError("a counter was created outside Ray")


def test_outside_ray_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: False)  # whether or not this session's Ray is up
    monkeypatch.setattr(metrics, "Counter", _no_counter)
    part_metrics = PartMetrics(tags={"run_id": "r"})
    for row in [*ROWS, {}]:
        part_metrics.record(row)
    assert part_metrics._counters is None


def test_failing_metrics_never_raise(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(metrics, "Counter", _FailingCounter)
    with caplog.at_level(logging.DEBUG, logger="pipeline.segmenting.metrics"):
        recording = PartMetrics()
        for row in ROWS:
            recording.record(row)
        monkeypatch.setattr(metrics, "Counter", lambda *a, **k: (_ for _ in ()).throw(OSError("no agent")))
        creating = PartMetrics()
        creating.record(ROWS[0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # once for recording (three rows failed), once for creating
    assert "recording failed (RuntimeError: metrics agent gone)" in warnings[0]
    assert "creating failed (OSError: no agent)" in warnings[1]
    assert creating._counters is None
