"""A user's mistake is one line on stderr and exit code 2, before any cluster work: weights that are no
checkpoint of the variant, S3 without credentials or with an unreachable endpoint, an output that cannot be
written, GPUs asked of a cluster that can never have one."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
import s3fs
import torch

from jobs.segment import main
from tests.pipeline.images import photo_bytes

FLAGS = ["--device", "cpu", "--min-size", "64", "--max-size", "107", "--no-progress"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.jpg").write_bytes(photo_bytes(48, 64))
    return images


@pytest.fixture
def no_cluster_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting or joining Ray fails the test: the error must come before."""
    import ray

    import pipeline.run

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cluster work started before the error")

    monkeypatch.setattr(pipeline.run, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("panoptic-flow segment: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _weights_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["text"] = tmp_path / "notes.pth"
    files["text"].write_text("these are not weights\n")
    buffer = io.BytesIO()
    torch.save({"model": {"backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7)}}, buffer)
    files["truncated"] = tmp_path / "cut.pth"
    files["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["wrong_keys"] = tmp_path / "other-model.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(4, 4)}}, files["wrong_keys"])
    return files


def test_weights_that_are_no_checkpoint_of_the_variant(
    tmp_path: Path, folder: Path, no_cluster_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = {
        "text": "notes.pth: not a PyTorch/safetensors checkpoint; accepted: torch.save state dicts",
        "truncated": "not a loadable weights file",
        "wrong_keys": "does not fit the model: ",
    }
    for case, path in _weights_files(tmp_path).items():
        output = tmp_path / f"out-{case}"
        assert main(["--input", str(folder), "--output", str(output), "--weights", str(path), *FLAGS]) == 2
        line = _one_error_line(capsys)
        assert expected[case] in line and "IndexError" not in line, (case, line)
        assert not output.exists()  # nothing written, not even a run record
    assert "missing" in line and "unexpected" in line


def test_s3_without_credentials_or_endpoint(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, folder: Path, no_cluster_work: None,
    capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["--input", "s3://pf-any/in/", "--output", str(folder / "out"), "--weights", "synthetic", *FLAGS]) == 2
    line = _one_error_line(capsys)
    assert "cannot access s3://pf-any/in/: no AWS credentials found" in line and "AWS_PROFILE" in line

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["--input", str(folder), "--output", "s3://pf-any/out/", "--weights", "synthetic", *FLAGS]) == 2
    line = _one_error_line(capsys)
    assert f"cannot reach {dead}" in line and "the output s3://pf-any/out/" in line
    s3fs.S3FileSystem.clear_instance_cache()


def _dead_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_an_output_that_is_a_file(
    tmp_path: Path, folder: Path, no_cluster_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(["--input", str(folder), "--output", str(a_file), "--weights", "synthetic", *FLAGS]) == 2
    assert f"--output: the output {a_file} is a file" in _one_error_line(capsys)
    # checked before the weights: unreachable weights do not hide it
    weights = f"{_dead_url()}/detr-r50-panoptic-00ce5173.pth"
    assert main(["--input", str(folder), "--output", str(a_file), "--weights", weights, *FLAGS]) == 2
    assert f"--output: the output {a_file} is a file" in _one_error_line(capsys)
    # and missing inputs are reported before the weights too
    assert (
        main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--weights", weights, *FLAGS]) == 2
    )
    line = _one_error_line(capsys)
    assert str(tmp_path / "nothing") in line and "--weights" not in line


def test_unreachable_weights_name_the_uri_without_credentials_and_the_ways_out(
    tmp_path: Path, folder: Path, no_cluster_work: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    monkeypatch.setenv("PANOPTIC_FLOW_CACHE", str(tmp_path / "cache"))
    dead = _dead_url()
    weights = f"{dead.replace('://', '://user:SECRET@')}/detr-r50-panoptic-00ce5173.pth?X-Amz-Signature=abc123"
    output = tmp_path / "out"
    assert main(["--input", str(folder), "--output", str(output), "--weights", weights, *FLAGS]) == 2
    line = _one_error_line(capsys)
    assert f"--weights: {dead}/detr-r50-panoptic-00ce5173.pth could not be reached" in line and "offline?" in line
    assert "--weights PATH" in line and "--weights synthetic" in line
    assert "SECRET" not in line and "abc123" not in line and "user" not in line
    assert not output.exists()


def test_gpus_asked_of_a_cluster_that_can_never_have_one(
    ray_session: None, tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """This session's cluster has no GPU and no autoscaler: waiting would last until the no-progress timeout."""
    output = tmp_path / "out"
    flags = [f for f in FLAGS if f not in ("--device", "cpu")]
    assert main(["--input", str(folder), "--output", str(output), "--weights", "synthetic", "--device", "cuda",
                 *flags]) == 2  # fmt: skip
    line = _one_error_line(capsys)
    assert "--device cuda: this cluster has no GPU and no autoscaler that could add one" in line
    assert not (output / "images").exists() and '"released"' in (output / "_lease.json").read_text()
