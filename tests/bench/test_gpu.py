"""`python -m bench.gpu --device cpu --quick`: the GPU command proven on CPU, as CI runs it.

One subprocess runs every step on tiny images (its own local Ray for the job step); the test reads back the
JSON and Markdown it wrote and checks that each step did its work: machine facts, the ``gpu`` tests collected
and skipped without CUDA, every variant timed at both batch sizes with its agreement and gate verdict,
torch.compile traced (dynamo, ``eager`` backend), bytes → maps on both paths, and the whole job committed
every image with a steady rate measured from its parts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--budget-s", "300", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    written = sorted(out.glob("gpu-*-cpu.json"))
    assert proc.returncode == 0 and len(written) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    markdown = written[0].with_suffix(".md").read_text()
    return json.loads(written[0].read_text()), markdown, proc


def test_every_step_ran_inside_the_budget(report) -> None:
    data, _, _ = report
    assert data["device"] == "cpu" and data["settings"]["min_size"] == 64
    assert {name: step["status"] for name, step in data["steps"].items()} == dict.fromkeys(
        ["machine", "pytest", "model", "compile", "bytes", "job"], "done"
    )
    assert data["seconds"] < data["budget_s"]
    machine = data["steps"]["machine"]["result"]
    assert machine["device"] == "cpu" and machine["host"]["torch"] and "gpu" not in machine


def test_the_gpu_tests_were_collected_and_skipped_without_cuda(report) -> None:
    pytest_step = report[0]["steps"]["pytest"]["result"]
    assert pytest_step["exit_code"] == 0 and pytest_step["failed"] == 0
    assert pytest_step["skipped"] >= 2 and pytest_step["passed"] == 0  # at least test_device_decode's two


def test_every_variant_is_timed_and_judged_against_the_yardstick(report) -> None:
    model = report[0]["steps"]["model"]["result"]
    rows = model["rows"]
    assert set(rows) == {
        "fp32",
        "bf16",
        "channels_last",
        "default config",
        "exact, mixed sizes",
        "bucketed, mixed sizes",
    }
    for name, row in rows.items():
        assert set(row["images_per_s"]) == {"2", "4"} and all(v > 0 for v in row["images_per_s"].values()), name
    assert rows["channels_last"]["channels_last_used"] and rows["default config"]["channels_last_used"]
    assert not rows["fp32"]["channels_last_used"]
    for name in ("bf16", "channels_last", "default config", "bucketed, mixed sizes"):
        row = rows[name]
        assert 0.0 <= row["pixels_in_matching_segments_min"] <= row["pixels_in_matching_segments"] <= 1.0, name
        assert "±0.5 grey level" in row["gate_message"] and isinstance(row["gate_passed"], bool)
    assert rows["channels_last"]["gate_passed"], rows["channels_last"]["gate_message"]
    assert "gate_passed" not in rows["fp32"] and "gate_passed" not in rows["exact, mixed sizes"]
    assert set(model["yardsticks"]) == {"uniform", "mixed"}
    assert len(model["processed_sizes"]["mixed"]) > 1 and len(model["processed_sizes"]["uniform"]) == 1


def test_compile_bytes_and_job_steps_measured_something(report) -> None:
    steps = report[0]["steps"]
    compiled = steps["compile"]["result"]
    assert compiled["backend"] == "eager" and compiled["compiled_shapes"] >= 1
    assert compiled["uniform"]["compiled_images_per_s"] > 0 and compiled["uniform"]["gate_passed"]
    paths = steps["bytes"]["result"]["rows"]
    assert set(paths) == {"CPU decode (Pillow, one core)", "device_preprocess"}
    assert all(row["images_per_s"] > 0 for row in paths.values())
    assert "gate_message" in paths["device_preprocess"]
    job = steps["job"]["result"]
    assert job["images_ok"] == job["images"] == 32
    assert job["parts"] == 4 and job["steady_images_per_s"] > 0 and 0 < job["startup_s"] < job["total_s"]


def test_the_markdown_rows_are_written(report) -> None:
    _, markdown, proc = report
    for heading in (
        "Machine: no GPU (device cpu)",
        "| variant | TF32 |",
        "`torch.compile` of the detector",
        "Bytes → maps",
        "The whole job",
        "yardstick",
    ):
        assert heading in markdown
    assert markdown.strip() in proc.stdout
