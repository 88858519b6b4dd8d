"""Lease expiry never trusts the holder's clock: on S3 it is judged by the store's own times (the ``Date`` of its
response minus the lease object's ``Last-Modified``), so a lease written by a host whose clock runs an hour fast
or slow is neither kept an hour too long nor taken over while its holder lives; a recorded renewal time that
disagrees with the store is reported. Leases are hand-written; no test waits for an expiry (the store's age of a
lease is given to `_is_dead` directly, or the hand-written lease's ttl is 0 s)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pytest
import s3fs

from pipeline.exactly_once.lease import DEFAULT_TTL_S, Lease, LeaseHeld, _is_dead, check_holder
from pipeline.schema import LEASE_FILE

HOUR = 3600.0
OTHER_HOST = {"host": "elsewhere", "pid": 1, "pid_start": "1", "started": "earlier"}


@pytest.mark.parametrize("clock_error", [HOUR, -HOUR, 0.0])
def test_expiry_is_the_stores_age_of_the_lease_whatever_the_holders_clock(clock_error: float) -> None:
    holder = {"run_id": "r", **OTHER_HOST, "renewed": time.time() + clock_error, "ttl_s": DEFAULT_TTL_S}
    assert not _is_dead(holder, age_s=0.0)
    assert not _is_dead(holder, age_s=DEFAULT_TTL_S - 1)  # renewed within its ttl, by the store's clock: alive
    assert _is_dead(holder, age_s=DEFAULT_TTL_S)  # unchanged on the store for its ttl: expired
    assert _is_dead(holder, age_s=None, now=holder["renewed"] + DEFAULT_TTL_S + 1)  # a store that gives no age


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    name = "pf-lease-clock"
    client = boto3.client("s3")
    if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name


def _put(bucket: str, prefix: str, **record: object) -> str:
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{LEASE_FILE}", Body=json.dumps(record).encode())
    return f"s3://{bucket}/{prefix}"


def test_s3_lease_of_a_host_an_hour_ahead_is_reported_and_expires_by_the_stores_clock(bucket: str) -> None:
    output = _put(bucket, "ahead", run_id="fast-clock", renewed=time.time() + HOUR, ttl_s=DEFAULT_TTL_S, **OTHER_HOST)
    with pytest.raises(LeaseHeld) as held:
        Lease.acquire(output, "taker")
    message = str(held.value)
    assert "its host's clock looks wrong" in message and "ahead of the store's time" in message, message
    left = float(message.split("expires in ")[1].split(" s")[0])
    assert DEFAULT_TTL_S - 5 <= left <= DEFAULT_TTL_S, message  # not the hour and 2 minutes the record claims
    # The same lease once it stopped changing for its ttl (0 s here): taken over although it claims the future
    output = _put(bucket, "ahead", run_id="fast-clock", renewed=time.time() + HOUR, ttl_s=0.0, **OTHER_HOST)
    with Lease.acquire(output, "taker"):
        check_holder(output, "taker")


def test_s3_lease_of_a_live_host_an_hour_behind_is_not_taken_over(bucket: str) -> None:
    output = _put(bucket, "behind", run_id="slow-clock", renewed=time.time() - HOUR, ttl_s=DEFAULT_TTL_S, **OTHER_HOST)
    with pytest.raises(LeaseHeld) as held:
        Lease.acquire(output, "taker")
    message = str(held.value)
    assert "slow-clock" in message and "behind the store's time" in message, message
    check_holder(output, "slow-clock")  # still its holder's


def test_s3_lease_with_a_right_clock_says_nothing_about_clocks(bucket: str) -> None:
    output = _put(bucket, "right", run_id="good-clock", renewed=time.time(), ttl_s=DEFAULT_TTL_S, **OTHER_HOST)
    with pytest.raises(LeaseHeld) as held:
        Lease.acquire(output, "taker")
    assert "looks wrong" not in str(held.value) and "by the store's clock" in str(held.value)


@pytest.mark.parametrize("clock_error", [HOUR, -HOUR])
def test_local_lease_files_with_wrong_times_are_judged_by_the_lock_alone(tmp_path: Path, clock_error: float) -> None:
    """A local lease is a lock held by a live process: the times written in the file decide nothing."""
    output = tmp_path / "out"
    output.mkdir()
    record = {"run_id": "old", **OTHER_HOST, "renewed": time.time() + clock_error, "ttl_s": DEFAULT_TTL_S}
    (output / LEASE_FILE).write_text(json.dumps(record))
    with Lease.acquire(str(output), "taker"):  # nobody holds the lock: taken at once
        check_holder(str(output), "taker")
