"""The exit-code convention of every command (`jobs/usage.py`): 0 done, 2 a user's mistake reported as one line
``panoptic-flow <command>: error: ...`` without argparse's usage block, a bare ``panoptic-flow`` prints its help
and exits 2. Run as a user runs them: a new process, stderr counted line by line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS
from tests.synthetic_output import make_images, write_output

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _one_error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"panoptic-flow {command}: error: "), lines[0]
    assert "usage:" not in done.stderr and "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("usage")
    write_output(root / "out", make_images(root / "inputs"))
    return root / "out"


def test_a_bare_panoptic_flow_prints_help_and_exits_2() -> None:
    done = _run()
    assert done.returncode == 2 and "usage: panoptic-flow COMMAND" in done.stderr and done.stdout == ""
    helped = _run("--help")
    assert helped.returncode == 0 and "usage: panoptic-flow COMMAND" in helped.stdout
    unknown = _run("segmnt")
    assert unknown.returncode == 2 and unknown.stderr.splitlines() == [
        "panoptic-flow: error: unknown command 'segmnt'; commands: segment, query, show, export-coco, evaluate, "
        "register"
    ]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_keeps_the_full_usage(command: str) -> None:
    done = _run(command, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: panoptic-flow {command}") and done.stderr == ""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--batch-size", "0"], "panoptic-flow segment: error: --batch-size: must be positive, got 0"),
        (["--threshold", "1.5"], "panoptic-flow segment: error: --threshold: must be in [0, 1), got 1.5"),
        (["--min-actors", "3", "--max-actors", "2"], "error: --min-actors: need 1 <= --min-actors <= --max-actors"),
        (["--batch-size", "x"], "error: --batch-size: invalid int value: 'x'"),
        (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
    ],
)
def test_segment_validation_errors_are_one_line_naming_the_flag(argv: list[str], expected: str) -> None:
    line = _one_error_line(_run("segment", "--input", "in/", "--output", "out/", *argv), "segment")
    assert expected in line and "batch_size" not in line


def test_an_unknown_job_file_key_is_one_line(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input: [in/]\noutput: out/\nbatch-sise: 4\n")
    line = _one_error_line(_run("segment", "--config", str(job)), "segment")
    assert f"--config {job}: unknown option 'batch-sise' (did you mean 'batch-size'?)" in line


def test_query_sql_errors_are_the_users_mistake(output: Path) -> None:
    line = _one_error_line(_run("query", str(output), "SELEC image_id FROM images"), "query")
    assert "error: SQL: Parser Error: syntax error" in line and "views: segments, images" in line
    line = _one_error_line(_run("query", str(output), "SELECT nope FROM images"), "query")
    assert "error: SQL: Binder Error" in line
    line = _one_error_line(_run("query", str(output), "SELECT * FROM imagez"), "query")
    assert "Catalog Error" in line
    _one_error_line(_run("query", str(output), "SELECT 1", "--limit", "-1"), "query")
    ok = _run("query", str(output), "SELECT count(*) AS n FROM images")
    assert ok.returncode == 0 and ok.stderr == "" and "(1 row)" in ok.stdout


def test_show_mistakes_are_one_line(output: Path, tmp_path: Path) -> None:
    png = str(tmp_path / "x.png")
    line = _one_error_line(_run("show", str(output), "--grid", "2", "--where", "num_segments > 100", "-o", png), "show")
    assert "--where: no image matches" in line
    line = _one_error_line(_run("show", str(output), "nope.jpg", "-o", png), "show")
    assert "'nope.jpg' is not in" in line and f'query {output} "select image_id from images limit 5"' in line
    line = _one_error_line(_run("show", str(output), "--grid", "2", "--where", "nope > 1", "-o", png), "show")
    assert "--where: Binder Error" in line
    line = _one_error_line(_run("show", str(output), "-o", png), "show")
    assert "give either IMAGE_ID or --grid N" in line
    line = _one_error_line(_run("show", str(output), "x.jpg", "--alpha", "2", "-o", png), "show")
    assert "error: --alpha: must lie in [0, 1], got 2.0" in line
    assert not Path(png).exists()


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("query", ["{missing}", "SELECT 1"]),
        ("show", ["{missing}", "x.jpg"]),
        ("export-coco", ["{missing}", "{tmp}/coco"]),
        ("evaluate", ["{missing}", "--gt-json", "{tmp}/gt.json", "--gt-folder", "{tmp}/gt"]),
        ("evaluate", ["{output}"]),  # --gt-json and --gt-folder missing
        ("evaluate", ["{output}", "--gt-json", "{tmp}/gt.json", "--gt-folder", "{tmp}/gt"]),  # no such file
        ("export-coco", ["{output}"]),  # DEST missing
    ],
)
def test_every_command_reports_a_mistake_in_one_line(
    command: str, argv: list[str], output: Path, tmp_path: Path
) -> None:
    values = {"missing": str(tmp_path / "no-output"), "output": str(output), "tmp": str(tmp_path)}
    _one_error_line(_run(command, *(a.format(**values) for a in argv)), command)
    assert not (tmp_path / "coco").exists()


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": warning: " in line]


def test_every_reading_command_warns_once_of_demo_weights(
    tmp_path: Path, output: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.evaluate import main as evaluate
    from jobs.export_coco import main as export_coco
    from jobs.query import main as query

    demo = tmp_path / "demo"
    write_output(demo, make_images(tmp_path / "inputs"), weights="synthetic")
    warning = f"{demo} was made with demo weights (--weights synthetic): its segments are meaningless"
    assert query([str(demo), "SELECT count(*) FROM segments"]) == 0
    assert _warnings(capsys.readouterr().err) == [f"panoptic-flow query: warning: {warning}"]
    assert export_coco([str(demo), str(tmp_path / "coco")]) == 0
    assert _warnings(capsys.readouterr().err) == [f"panoptic-flow export-coco: warning: {warning}"]
    gt = ["--gt-json", str(tmp_path / "coco" / "panoptic.json"), "--gt-folder", str(tmp_path / "coco" / "panoptic")]
    assert evaluate([str(demo), *gt, "--match", "uri"]) == 0
    assert _warnings(capsys.readouterr().err) == [f"panoptic-flow evaluate: warning: {warning}"]
    # show: tests/jobs/test_show.py; an output of real weights: no warning
    assert query([str(output), "SELECT 1"]) == 0
    assert _warnings(capsys.readouterr().err) == []
    # partly: one of two runs used the demo weights
    record = {"run_id": "later", "weights": {"uri": "s3://b/w.pth", "sha256": "ab" * 32}}
    (demo / "_runs" / "later.json").write_text(json.dumps(record))
    assert query([str(demo), "SELECT 1"]) == 0
    assert _warnings(capsys.readouterr().err) == [
        f"panoptic-flow query: warning: {demo} was made with demo weights (--weights synthetic) "
        "(partly: 1 of its 2 runs): its segments are meaningless"
    ]


@pytest.mark.slow
def test_a_job_on_an_embedded_ray_prints_no_ray_start_up_lines(tmp_path: Path) -> None:
    """Ray's "Started a local Ray instance", its note that token authentication is on by default, and its
    ERROR that the model actor's constructor arguments are in the object store (Ray Data's own, held for the
    whole run: `pipeline.run.RESTART_NOTICE`) are shown with --verbose only (its other errors are not hidden)."""
    import shutil
    import tempfile

    from tests.pipeline.images import photo_bytes

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"img{i}.jpg").write_bytes(photo_bytes(48, 64, seed=i))
    ray_tmp = tempfile.mkdtemp(prefix="pf-q-", dir="/tmp")  # its own Ray: short socket paths, nothing shared
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    flags = ["--weights", "synthetic", "--device", "cpu", "--min-size", "64", "--max-size", "107", "--no-progress"]
    command = [sys.executable, "-m", "jobs.cli", "segment", "--input", str(folder), "--output", str(tmp_path / "out")]
    command += flags
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("done: 2 images ok")], done.stdout
    noise = ("Started a local Ray instance", "Token authentication is enabled", "constructor arguments in the object")
    assert [line for line in done.stderr.splitlines() if any(n in line for n in noise)] == [], done.stderr
