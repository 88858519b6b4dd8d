"""Secrets given on the command line are never printed, logged or recorded: each form goes through the real
command (`python -m jobs.segment` as a subprocess), and stderr, stdout and every file under the output are
searched for the secret.

Forms: ``user:password@`` whose password holds ``/`` (AWS secret keys do), ``@`` and ``:``; the ``--opt=URI``
spelling; repeated options; query-string signatures (``X-Amz-Signature``, ``X-Amz-Credential``, ``sig``,
``token``, ``X-Goog-Signature``).
"""

from __future__ import annotations

import http.server
import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch

from pipeline.config import check_output_uri, redact_uri
from tests.pipeline.images import photo_bytes

REPO = Path(__file__).resolve().parents[2]
SECRET = "Zq9/pf+SECRET/xyz"  # an AWS-like secret key: it holds "/"
SIGNATURE = "f00dfacef00dface5ign"
FLAGS = ["--device", "cpu", "--min-size", "64", "--max-size", "107", "--batch-size", "2", "--no-progress"]
TIMEOUT_S = 300.0


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"s3://KEY:abc/{SECRET}@bucket/x", "s3://bucket/x"),
        (f"--output=s3://KEY:{SECRET}@bucket/x", "--output=s3://bucket/x"),
        (f"s3://user:p@ss:{SECRET}@host/x", "s3://host/x"),
        (f"s3://{SECRET.replace('/', '')}@bucket/k", "s3://bucket/k"),
        (f"--weights=http://u:{SECRET}@h/w.pth?X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AK", "--weights=http://h/w.pth"),
        (f"cannot access 's3://K:{SECRET}@b/in/': NoSuchBucket", "cannot access 's3://b/in/': NoSuchBucket"),
        (f"https://acct.blob.core.windows.net/c/w.pth?sv=2024&sig={SIGNATURE}", "https://acct.blob.core.windows.net/c/w.pth"),
        (f"header X-Goog-Signature={SIGNATURE} token={SIGNATURE}", "header X-Goog-Signature=*** token=***"),
        ("s3://bucket/photos/me@home.jpg", "s3://bucket/photos/me@home.jpg"),  # no credentials: unchanged
        ("http://127.0.0.1:9000/bucket/w.pth", "http://127.0.0.1:9000/bucket/w.pth"),
        ("--max-actors=4", "--max-actors=4"),
    ],
)  # fmt: skip
def test_redaction_of_each_form(text: str, redacted: str) -> None:
    assert redact_uri(text) == redacted


def test_an_output_uri_with_credentials_is_refused_without_repeating_them() -> None:
    for uri in (f"s3://KEY:abc/{SECRET}@bucket/x", f"s3://bucket/x?X-Amz-Signature={SIGNATURE}"):
        with pytest.raises(ValueError, match="credentials must not be part of the output URI") as refused:
            check_output_uri(uri)
        assert SECRET not in str(refused.value) and SIGNATURE not in str(refused.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "jobs.segment", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _assert_nowhere(secrets: list[str], job: subprocess.CompletedProcess[str], *folders: Path) -> None:
    for secret in secrets:
        assert secret not in job.stdout and secret not in job.stderr, (secret, job.stderr[-3000:])
        for folder in folders:
            for path in folder.rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), (secret, path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.jpg").write_bytes(photo_bytes(48, 64, seed=1))
    (images / "b.jpg").write_bytes(photo_bytes(48, 64, seed=2))
    return images


def test_secrets_in_failing_commands_are_never_printed(s3_env: dict[str, str], tmp_path: Path, folder: Path) -> None:
    """Each command fails with one line (exit code 2) before any cluster work; none prints a secret."""
    dead = f"127.0.0.1:{_closed_port()}"
    out = tmp_path / "out"
    cases = {
        "output with a password holding /": ["--input", str(folder), "--output", f"s3://KEY:abc/{SECRET}@bucket/x"],
        "--opt=URI output": ["--input", str(folder), f"--output=s3://KEY:{SECRET}@bucket/x"],
        "input, repeated": ["--input", str(folder), f"--input=s3://KEY:{SECRET}@pf-no-bucket/imgs/",
                            "--output", str(out)],
        "input, separate argument": ["--input", f"s3://KEY:{SECRET}@pf-no-bucket/imgs/", "--output", str(out)],
        "signed weights URL": ["--input", str(folder), "--output", str(out),
                               f"--weights=http://user:{SECRET}@{dead}/w.pth?X-Amz-Signature={SIGNATURE}"
                               f"&X-Amz-Credential=AKIDEXAMPLE&token={SIGNATURE}"],
        "bad value of another flag": ["--input", str(folder), "--output", str(out),
                                      f"--max-actors=s3://u:{SECRET}@b/x"],
    }  # fmt: skip

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        weights = [] if any(a.startswith("--weights") for a in args) else ["--weights", "synthetic"]
        return _run([*args, *weights, *FLAGS])

    with ThreadPoolExecutor(max_workers=3) as pool:  # independent processes: their start-ups overlap
        jobs = dict(zip(cases, pool.map(run, cases.values())))
    for case, job in jobs.items():
        assert job.returncode == 2, (case, job.stderr[-3000:])
        errors = [line for line in job.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in job.stderr, (case, job.stderr[-3000:])
        _assert_nowhere([SECRET, SIGNATURE], job, tmp_path)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with ``Range: bytes=a-b`` requests answered (fsspec's HTTP files read in ranges), quietly."""

    def send_head(self):  # type: ignore[no-untyped-def]
        wanted = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not wanted.startswith("bytes=") or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        first, _, last = wanted[len("bytes=") :].partition("-")
        start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def weights_server(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving the synthetic weights as ``w.pth`` (it ignores credentials and query
    strings, as a pre-signed URL's server checks them): ``host:port``."""
    from model.config import get_variant
    from model.synthetic_weights import synthetic_state_dict

    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": synthetic_state_dict(get_variant("detr-r50-panoptic").config)}, served / "w.pth")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_secrets_in_a_finished_run_are_in_no_record(tmp_path: Path, folder: Path, weights_server: str) -> None:
    """A run that works, with weights given as ``--weights=URI`` with a password: its run record holds the command
    and the configuration, redacted. The job starts its own Ray so that its actors share the weights cache it
    sets. (Signed query strings are checked on failing commands above: `model.checkpoint.fetch` cannot read a
    URL with ``?`` yet, fsspec takes it for a glob.)"""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PANOPTIC_FLOW_CACHE"] = str(tmp_path / "cache")
    password = SIGNATURE  # an HTTP password cannot hold "/" (the URL would not parse)
    weights = f"http://user:{password}@{weights_server}/w.pth"
    job = _run(["--input", str(folder), f"--output={out}", f"--weights={weights}", *FLAGS], env=env)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "2 images ok" in job.stdout
    records = list((out / "_runs").glob("*.json"))
    assert len(records) == 1 and f"--weights=http://{weights_server}/w.pth" in records[0].read_text()
    _assert_nowhere([password], job, out)
