"""Only regular files are read, and never more than they hold or than ``--max-bytes``: a FIFO, a socket or a
device (also behind a symbolic link) is an error row found without opening it, an oversized object an error row
read no further than the cap, and files left out by their extension are counted and named.

A hang is a failure here, not a blocked test run: the job runs as a subprocess with a timeout, and the unit
reads of FIFOs run in a thread that the test waits on with a timeout.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow.dataset as pads
import pytest
import s3fs

from pipeline.config import InputConfig
from pipeline.inputs.readers import read_refs
from pipeline.inputs.sources import resolve_inputs
from pipeline.inputs.storage import TooLarge, read_object
from tests.pipeline.images import photo_bytes, tar_bytes

REPO = Path(__file__).resolve().parents[2]
READ_TIMEOUT_S = 20.0  # a read that blocks (on a FIFO's open) fails the test after this
JOB_TIMEOUT_S = 300.0
JOB_FLAGS = ["--weights", "synthetic", "--device", "cpu", "--min-size", "64", "--max-size", "107",
             "--batch-size", "2", "--max-actors", "1", "--no-progress"]  # fmt: skip


def _read(uris: list[str], *, kind: str = "file", max_bytes: int = 1 << 30) -> dict[str, np.ndarray]:
    """`read_refs` in a worker thread: a read that blocks fails the test instead of hanging it."""
    batch = {"uri": np.array(uris, dtype=object), "kind": np.array([kind] * len(uris), dtype=object)}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(read_refs, batch, bytes_column="image", id_column=None, max_bytes=max_bytes)
    try:
        return future.result(timeout=READ_TIMEOUT_S)
    finally:
        pool.shutdown(wait=False)


def _hostile_folder(folder: Path) -> dict[str, Path]:
    """A good image beside a FIFO, a link to /dev/zero, a socket, and files of other kinds."""
    folder.mkdir()
    paths = {name: folder / name for name in ("a.jpg", "f.jpg", "z.jpg", "s.jpg")}
    paths["a.jpg"].write_bytes(photo_bytes(48, 64, seed=1))
    os.mkfifo(paths["f.jpg"])
    paths["z.jpg"].symlink_to("/dev/zero")
    for name in ("b.avif", "c.heic", "notes.txt"):
        (folder / name).write_bytes(b"not listed")
    return paths


def test_fifos_sockets_and_devices_are_error_rows_never_opened(tmp_path: Path) -> None:
    paths = _hostile_folder(tmp_path / "in")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(paths["s.jpg"]))
    try:
        rows = _read([str(paths[n]) for n in ("a.jpg", "f.jpg", "z.jpg", "s.jpg")])
    finally:
        server.close()
    assert list(rows["error"]) == [
        "",
        "not a regular file (a FIFO); not read",
        "not a regular file (a character device); not read",
        "not a regular file (a socket); not read",
    ]
    assert rows["data"][0] == paths["a.jpg"].read_bytes() and list(rows["retryable"]) == [False] * 4
    shard = _read([str(paths["f.jpg"])], kind="tar")  # a shard's name on a FIFO: its shard row says so
    assert list(shard["error"]) == ["not a regular file (a FIFO); not read"]


def test_listing_counts_and_names_files_left_out_by_extension(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = _hostile_folder(tmp_path / "in")
    with caplog.at_level(logging.WARNING, logger="pipeline.inputs.sources"):
        inputs = resolve_inputs(InputConfig((str(tmp_path / "in"),)))
    assert sorted(r["uri"] for r in inputs.refs) == sorted(str(paths[n]) for n in ("a.jpg", "f.jpg", "z.jpg"))
    assert all(set(r) == {"uri", "kind", "size", "version"} for r in inputs.refs)
    assert (inputs.left_out, inputs.not_regular) == (3, 2)
    assert inputs.left_out_examples == [str(tmp_path / "in" / n) for n in ("b.avif", "c.heic", "notes.txt")]
    text = caplog.text
    assert "left out 3 files" in text and "b.avif" in text and "--input-format files" in text
    assert "2 inputs are not regular files" in text
    forced = resolve_inputs(InputConfig((str(tmp_path / "in"),), format="files"))
    assert len(forced.refs) == 6 and forced.left_out == 0


def test_reads_stop_at_max_bytes(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(photo_bytes(48, 64))
    size = image.stat().st_size
    assert read_object(str(image), max_bytes=size)[0] == image.read_bytes()
    with pytest.raises(TooLarge, match=f"larger than --max-bytes \\({size} > {size - 1} bytes\\)"):
        read_object(str(image), max_bytes=size - 1)
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes([("x.jpg", image.read_bytes())]))
    rows = _read([str(image), str(shard)], kind="file", max_bytes=size - 1)
    assert [e.split(" (")[0] for e in rows["error"]] == ["larger than --max-bytes"] * 2
    rows = _read([str(shard)], kind="tar", max_bytes=size)
    assert list(rows["error"]) == [f"larger than --max-bytes ({shard.stat().st_size} > {size} bytes); not read"]


def test_s3_reads_stop_at_max_bytes(s3_env: dict[str, str]) -> None:
    bucket = "pf-max-bytes"
    boto3.client("s3").create_bucket(Bucket=bucket)
    data = photo_bytes(48, 64)
    boto3.client("s3").put_object(Bucket=bucket, Key="a.jpg", Body=data)
    boto3.client("s3").put_object(Bucket=bucket, Key="empty.jpg", Body=b"")
    s3fs.S3FileSystem.clear_instance_cache()
    assert read_object(f"s3://{bucket}/a.jpg", max_bytes=len(data))[0] == data
    assert read_object(f"s3://{bucket}/empty.jpg")[0] == b""
    with pytest.raises(TooLarge):
        read_object(f"s3://{bucket}/a.jpg", max_bytes=len(data) - 1)


def test_a_job_over_a_fifo_and_a_link_to_dev_zero_ends_with_their_error_rows(ray_session: None, tmp_path: Path) -> None:
    import ray

    paths = _hostile_folder(tmp_path / "in")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.segment", "--input", str(tmp_path / "in"), "--output", str(output),
               *JOB_FLAGS]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    job = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, job.stderr[-3000:]
    rows = {r["image_id"]: r for r in pads.dataset(str(output / "images")).to_table().to_pylist()}
    assert set(rows) == {str(paths[n]) for n in ("a.jpg", "f.jpg", "z.jpg")}
    assert rows[str(paths["a.jpg"])]["status"] == "ok"
    for name, kind in (("f.jpg", "a FIFO"), ("z.jpg", "a character device")):
        row = rows[str(paths[name])]
        assert (row["status"], row["error"], row["retryable"]) == ("error", f"not a regular file ({kind}); not read",
                                                                   False)  # fmt: skip
    assert "left out 3 files" in job.stderr and "notes.txt" in job.stderr
    summary = [line for line in job.stdout.splitlines() if line.startswith("done:")]
    assert len(summary) == 1 and "1 images ok, 2 errors" in summary[0], job.stdout
    named = ", ".join(str(tmp_path / "in" / n) for n in ("b.avif", "c.heic", "notes.txt"))
    left_out = f"; left out 3 files whose names end in no image, .tar or .parquet extension (e.g. {named}); "
    errors = "; errors: 2 not a regular file (the images table's error column says why, image by image)"
    assert summary[0].endswith(left_out + "`--input-format files` reads every listed file as an image" + errors), (
        summary[0]
    )
