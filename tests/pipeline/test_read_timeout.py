"""The read timeout (``--read-timeout``, `pipeline.inputs.storage.read_object`): a read that receives nothing for that
long is given up with `ReadTimedOut` (a retryable error row), on S3 through a stalling proxy in front of moto
and on a local or fsspec filesystem whose read blocks; a read whose bytes keep coming never times out."""

from __future__ import annotations

import multiprocessing
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any, ClassVar

import boto3
import fsspec
import numpy as np
import pytest
from fsspec.spec import AbstractFileSystem

from pipeline.config import InputConfig
from pipeline.inputs import storage
from pipeline.inputs.readers import read_refs
from pipeline.inputs.sources import InputError, resolve_inputs
from pipeline.inputs.storage import ReadTimedOut, read_object
from tests.s3_server import FaultProxy, proxied_s3

BUCKET = "pf-read-timeout"
TIMEOUT_S = 2.0  # S3: botocore's timers
FS_TIMEOUT_S = 1.0  # the watched (thread) reads
MARGIN_S = 15.0  # generous for a loaded 2-core machine: the fault would otherwise hold the read for minutes


# -- S3 through a stalling proxy ----------------------------------------------------------------------------


@pytest.fixture
def proxy(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """S3 clients created in this test go through a fault proxy of their own in front of the session's moto."""
    with proxied_s3(s3_env["AWS_ENDPOINT_URL"], monkeypatch, bucket=BUCKET) as fault_proxy:
        yield fault_proxy


def _put(key: str, data: bytes) -> str:
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


@pytest.mark.parametrize(("mode", "options"), [("stall", {}), ("delay", {"delay_s": 60.0})])
def test_an_s3_read_that_receives_nothing_times_out_after_one_more_attempt(
    proxy: FaultProxy, mode: str, options: dict[str, Any]
) -> None:
    """``stall``: the head, then no body bytes; ``delay``: no response at all. Each attempt waits one timeout,
    and a timed-out read is retried once only (not `READ_ATTEMPTS` times)."""
    data = bytes(range(256)) * 400
    uri = _put(f"{mode}.bin", data)
    proxy.set_fault(mode, count=10, methods=["GET"], **options)  # type: ignore[arg-type]
    start = time.monotonic()
    with pytest.raises(ReadTimedOut, match=f"read timed out: no bytes for {TIMEOUT_S:g} s"):
        read_object(uri, read_timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert proxy.faults_injected == 2  # the first attempt and its one retry (botocore and s3fs retried nothing)
    assert 2 * TIMEOUT_S <= elapsed < 2 * TIMEOUT_S + MARGIN_S
    proxy.heal()
    assert read_object(uri, read_timeout_s=TIMEOUT_S)[0] == data  # the same object, healthy again


def test_an_s3_read_that_stalls_once_is_read_whole_on_its_retry(proxy: FaultProxy) -> None:
    data = bytes(range(256)) * 400
    uri = _put("stall-once.bin", data)
    proxy.set_fault("stall", count=1, methods=["GET"])
    start = time.monotonic()
    got, info = read_object(uri, read_timeout_s=TIMEOUT_S)
    assert proxy.faults_injected == 1
    assert got == data and info.size == len(data)
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + MARGIN_S


def test_an_s3_object_that_keeps_flowing_slowly_does_not_time_out(proxy: FaultProxy) -> None:
    """Five pieces, each arriving in under the timeout, the whole taking more than twice as long."""
    data = bytes(range(256)) * 1000  # 256,000 bytes
    uri = _put("trickle.bin", data)
    proxy.set_fault("trickle", methods=["GET"], trickle_bytes=len(data) // 5, delay_s=0.45 * TIMEOUT_S)
    start = time.monotonic()
    got, _ = read_object(uri, read_timeout_s=TIMEOUT_S)
    assert proxy.faults_injected == 1
    assert time.monotonic() - start > 2 * TIMEOUT_S  # a deadline on the whole object would have struck
    assert got == data


# -- an fsspec filesystem whose reads block or trickle ------------------------------------------------------


class _File:
    def __init__(self, fs: StallingFS, path: str) -> None:
        self.fs, self.path, self.pos = fs, path, 0

    def read(self, n: int = -1) -> bytes:
        data, behaviour = StallingFS.files[self.path]
        StallingFS.reads += 1
        if behaviour == "stall":
            StallingFS.release.wait(30)  # a hung mount: returns only once the test is over
            return b""
        time.sleep(StallingFS.trickle_s)  # "slow": each call takes a while, but bytes keep coming
        n = len(data) - self.pos if n < 0 else n
        chunk = data[self.pos : self.pos + min(n, StallingFS.trickle_bytes)]
        self.pos += len(chunk)
        return chunk

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class StallingFS(AbstractFileSystem):
    """``stallfs://NAME``: files whose reads block until `release` (``"stall"``) or return at most
    `trickle_bytes` per call after `trickle_s` (``"slow"``)."""

    protocol = "stallfs"
    files: ClassVar[dict[str, tuple[bytes, str]]] = {}
    release = threading.Event()
    reads = 0
    trickle_s = 0.0
    trickle_bytes = 1 << 30

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if path not in self.files:
            raise FileNotFoundError(path)
        return {"name": path, "size": len(self.files[path][0]), "type": "file"}

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        return _File(self, self._strip_protocol(path))


@pytest.fixture
def stallfs() -> Iterator[type[StallingFS]]:
    fsspec.register_implementation("stallfs", StallingFS, clobber=True)
    StallingFS.files, StallingFS.reads, StallingFS.release = {}, 0, threading.Event()
    yield StallingFS
    StallingFS.release.set()  # lets the abandoned reader threads finish


def test_an_fsspec_read_that_never_returns_times_out(stallfs: type[StallingFS]) -> None:
    stallfs.files["hung.jpg"] = (b"x" * 1000, "stall")
    start = time.monotonic()
    with pytest.raises(ReadTimedOut, match=f"no bytes for {FS_TIMEOUT_S:g} s"):
        read_object("stallfs://hung.jpg", read_timeout_s=FS_TIMEOUT_S)
    assert stallfs.reads == 2  # stuck twice: once more on a store that is not local
    assert 2 * FS_TIMEOUT_S <= time.monotonic() - start < 2 * FS_TIMEOUT_S + MARGIN_S


def test_a_hung_read_becomes_a_retryable_error_row(stallfs: type[StallingFS]) -> None:
    stallfs.files["hung.jpg"] = (b"x" * 1000, "stall")
    stallfs.files["fine.jpg"] = (b"fine", "slow")
    batch = {"uri": np.array(["stallfs://hung.jpg", "stallfs://fine.jpg"], dtype=object)}
    batch["kind"] = np.array(["file", "file"], dtype=object)
    out = read_refs(batch, bytes_column="image", id_column=None, read_timeout_s=FS_TIMEOUT_S)
    assert out["error"].tolist() == [f"unreadable: ReadTimedOut: read timed out: no bytes for {FS_TIMEOUT_S:g} s", ""]
    assert out["retryable"].tolist() == [True, False]
    assert out["data"].tolist() == [b"", b"fine"]
    assert stallfs.reads >= 2


def test_an_object_that_keeps_flowing_does_not_time_out(
    stallfs: type[StallingFS], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five chunks, each arriving in under the timeout, the whole taking more than twice as long."""
    monkeypatch.setattr(storage, "READ_CHUNK", 1000)
    monkeypatch.setattr(stallfs, "trickle_s", 0.45 * FS_TIMEOUT_S)
    monkeypatch.setattr(stallfs, "trickle_bytes", 1000)
    data = bytes(range(250)) * 20  # 5,000 bytes: five chunks
    stallfs.files["slow.jpg"] = (data, "slow")
    start = time.monotonic()
    got, info = read_object("stallfs://slow.jpg", read_timeout_s=FS_TIMEOUT_S)
    assert time.monotonic() - start > 2 * FS_TIMEOUT_S  # a deadline on the whole object would have struck
    assert got == data and info.size == len(data)
    assert stallfs.reads >= 5


# -- a local read that hangs (a hung NFS or FUSE mount) ----------------------------------------------------


def test_a_local_read_that_hangs_times_out_without_a_retry(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount whose ``stat`` never returns: given up after one timeout, not retried (the mount would hang
    again, and each try strands a thread)."""
    path = tmp_path / "on-a-hung-mount.jpg"
    path.write_bytes(b"x" * 100)
    release, calls = threading.Event(), []
    real_check = storage.check_regular

    def hung_check(p: str) -> Any:
        calls.append(p)
        release.wait(30)
        return real_check(p)

    monkeypatch.setattr(storage, "check_regular", hung_check)
    start = time.monotonic()
    try:
        with pytest.raises(ReadTimedOut, match=f"no bytes for {FS_TIMEOUT_S:g} s"):
            read_object(str(path), read_timeout_s=FS_TIMEOUT_S)
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert calls == [str(path)]  # one attempt
    assert FS_TIMEOUT_S <= elapsed < FS_TIMEOUT_S + MARGIN_S
    monkeypatch.setattr(storage, "check_regular", real_check)
    assert read_object(str(path), read_timeout_s=FS_TIMEOUT_S)[0] == b"x" * 100


def test_a_local_file_larger_than_a_chunk_is_read_whole(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "READ_CHUNK", 4096)
    data = bytes(range(256)) * 100  # 25,600 bytes: seven chunks
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    got, info = read_object(str(path), read_timeout_s=FS_TIMEOUT_S)
    assert got == data and info.size == len(data)
    with pytest.raises(storage.TooLarge):
        read_object(str(path), max_bytes=len(data) - 1, read_timeout_s=FS_TIMEOUT_S)


def test_a_chunked_read_holds_the_object_about_once(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak memory of a local read of 128 chunks: the bytes once (plus a little), not twice as a join would."""
    monkeypatch.setattr(storage, "READ_CHUNK", 64 * 1024)
    path = tmp_path / "shard.tar"
    path.write_bytes(bytes(range(256)) * 32 * 1024)  # 8 MiB
    tracemalloc.start()
    try:
        data, _ = read_object(str(path), read_timeout_s=FS_TIMEOUT_S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == 8 * 1024 * 1024
    assert peak < 1.25 * len(data), peak


def test_reads_after_a_fork_do_not_wait_for_the_parents_reader_threads(tmp_path: Any) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    assert read_object(str(path))[0] == b"abc"  # the parent now has an idle reader thread
    assert storage._READERS.started >= 1
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply(_read_in_child, (str(path),)) == (b"abc", 1)  # at once, by a thread of its own


def _read_in_child(path: str) -> tuple[bytes, int]:
    return read_object(path, read_timeout_s=5)[0], storage._READERS.started


# -- listing ------------------------------------------------------------------------------------------------


def test_an_s3_listing_that_gets_no_answer_fails_within_its_retries_of_the_timeout(proxy: FaultProxy) -> None:
    """The listing keeps s3fs's retries (5 attempts here, botocore's are off in the tests' environment), each
    giving up after the read timeout instead of s3fs's 15 s."""
    _put("listed/a.jpg", b"x")
    proxy.set_fault("delay", count=100, delay_s=60.0)
    start = time.monotonic()
    with pytest.raises(InputError, match=f"s3://{BUCKET}/listed/"):
        resolve_inputs(InputConfig((f"s3://{BUCKET}/listed/",)), read_timeout_s=0.5)
    assert proxy.faults_injected >= 2
    assert time.monotonic() - start < 5 * 0.5 + 2 + MARGIN_S  # 5 attempts and s3fs's backoff (~1.8 s)
    proxy.heal()
    assert [r["uri"] for r in resolve_inputs(InputConfig((f"s3://{BUCKET}/listed/",))).refs] == [
        f"s3://{BUCKET}/listed/a.jpg"
    ]
