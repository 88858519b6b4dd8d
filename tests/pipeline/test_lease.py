"""One writer per output: the lease on local folders (flock) and on S3 (conditional writes, moto on loopback).

Another holder is a real other process where it matters (a lock held by a subprocess, released when it is
killed); expiry is tested with a lease record whose renewal time lies in the past, not by waiting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import s3fs

from pipeline.exactly_once.lease import Lease, LeaseHeld, LeaseLost, check_holder
from pipeline.schema import LEASE_FILE

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from pipeline.exactly_once.lease import Lease
lease = Lease.acquire(sys.argv[1], "holder-run")
print("held", flush=True)
time.sleep(600)
"""


def _hold_in_subprocess(output: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, output], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_local_lease_is_held_while_its_process_lives_and_free_once_it_is_killed(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    holder = _hold_in_subprocess(output)
    try:
        with pytest.raises(LeaseHeld) as held:
            Lease.acquire(output, "second-run")
        message = str(held.value)
        assert "\n" not in message and "holder-run" in message and f"pid {holder.pid}" in message
        assert "started" in message
        check_holder(output, "holder-run")  # the holder's write tasks may commit
        with pytest.raises(LeaseLost):
            check_holder(output, "second-run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with Lease.acquire(output, "second-run"):  # the kernel dropped the dead holder's lock: no waiting
        check_holder(output, "second-run")
    with pytest.raises(LeaseLost):  # released: nobody may commit
        check_holder(output, "second-run")


def test_local_lease_on_an_output_that_is_a_file_or_read_only(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OSError):
        Lease.acquire(str(a_file), "r1")
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        with pytest.raises(PermissionError):
            Lease.acquire(str(read_only / "out"), "r1")


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    name = "pf-lease"
    client = boto3.client("s3")
    if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name


def _put_record(bucket: str, key: str, **record: object) -> None:
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode())


def test_s3_lease_one_creator_wins_and_a_renewal_fails_after_a_take_over(bucket: str) -> None:
    output = f"s3://{bucket}/race"
    first = Lease.acquire(output, "first")
    try:
        with pytest.raises(LeaseHeld) as held:
            Lease.acquire(output, "second")
        assert "first" in str(held.value) and "--take-over-lease" in str(held.value)
        first.renew()  # If-Match on its own ETag: fine
        second = Lease.acquire(output, "second", take_over=True)  # on purpose
        with pytest.raises(LeaseLost):
            first.renew()  # the ETag changed under it
        check_holder(output, "second")
        with pytest.raises(LeaseLost):
            check_holder(output, "first")
        second.release()
    finally:
        first.release()  # lost: it leaves the other's lease alone (already gone here)
    assert not s3fs.S3FileSystem().exists(f"{bucket}/race/{LEASE_FILE}")


def test_s3_lease_expired_or_of_a_dead_local_process_is_taken_over(bucket: str) -> None:
    key = f"stale/{LEASE_FILE}"
    other_host = {"host": "elsewhere", "pid": 1, "pid_start": "1", "started": "earlier", "ttl_s": 120.0}
    # expired by the store's clock: not rewritten for its ttl (0 s here, so that the test need not wait)
    _put_record(bucket, key, run_id="expired", renewed=time.time(), **{**other_host, "ttl_s": 0.0})
    with Lease.acquire(f"s3://{bucket}/stale", "taker"):
        check_holder(f"s3://{bucket}/stale", "taker")

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid of this host that no longer runs
    _put_record(bucket, key, run_id="dead", renewed=time.time(), host=socket.gethostname(), pid=dead.pid,
                pid_start="123", started="now", ttl_s=120.0)  # fmt: skip
    with Lease.acquire(f"s3://{bucket}/stale", "taker-2"):
        check_holder(f"s3://{bucket}/stale", "taker-2")

    _put_record(bucket, key, run_id="alive", renewed=time.time(), **other_host)
    with pytest.raises(LeaseHeld, match="alive"):
        Lease.acquire(f"s3://{bucket}/stale", "taker-3")


def test_s3_lease_two_takers_of_one_expired_lease_one_wins(bucket: str) -> None:
    """Both read the expired lease; both try the conditional write on its ETag: exactly one succeeds."""
    key = f"two/{LEASE_FILE}"
    _put_record(bucket, key, run_id="expired", renewed=time.time() - 600, host="elsewhere", pid=1, ttl_s=120.0)
    etag = boto3.client("s3").head_object(Bucket=bucket, Key=key)["ETag"]
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{bucket}/{key}", b'{"run_id": "A"}', IfMatch=etag)
    with pytest.raises(OSError):
        fs.pipe_file(f"{bucket}/{key}", b'{"run_id": "B"}', IfMatch=etag)
    assert json.loads(fs.cat_file(f"{bucket}/{key}"))["run_id"] == "A"


def test_best_effort_lease_on_a_store_without_conditional_writes() -> None:
    output = "memory://pf-lease-test/out"
    with Lease.acquire(output, "r1"):
        with pytest.raises(LeaseHeld, match="r1"):
            Lease.acquire(output, "r2")
        check_holder(output, "r1")
    with Lease.acquire(output, "r2"):
        check_holder(output, "r2")
