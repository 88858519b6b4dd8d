"""Nothing touches an output without its lease, and run records are written from what the run knows.

A driver stalled past its lease's expiry (as under SIGSTOP: neither its main thread nor its renewer runs) while
another run takes the output over and finishes, then resumed, must change nothing: no clean-up, no record, no
``_SUCCESS`` removed or written, no part. The stall is held deterministically: the stalled run blocks at its
first step under the lease until the test releases it. On S3 (moto on loopback), where leases expire.

A second run on an S3 output whose ``_runs/`` listing a client has cached still completes its record (s3fs's
listing cache once made ``exists`` say no, and the record stayed "running").
"""

from __future__ import annotations

import contextlib
import json
import threading

import boto3
import pytest
import s3fs

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.exactly_once.lease import Lease, LeaseLost
from tests.pipeline.images import photo_bytes

pytestmark = pytest.mark.slow


def _config(inputs: str, output: str) -> JobConfig:
    return JobConfig(
        input=InputConfig((inputs,)),
        output=output,
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(batch_size=2, device="cpu", rows_per_file=2, max_actors=1),
    )


def _bucket(name: str, images: int) -> str:
    client = boto3.client("s3")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)
    for i in range(images):
        client.put_object(Bucket=name, Key=f"in/img{i}.jpg", Body=photo_bytes(48, 64, seed=i))
    s3fs.S3FileSystem.clear_instance_cache()
    return name


def _objects(bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys if not k.endswith("_lease.json")}


def test_a_driver_stalled_past_its_lease_touches_nothing(
    ray_session: None, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.run as run

    bucket = _bucket("pf-stalled", 4)
    output = f"s3://{bucket}/out"
    config = _config(f"s3://{bucket}/in/", output)
    stalled, release = threading.Event(), threading.Event()
    taken: list[Lease] = []
    check_settings = run.run_records.check_settings

    def take_lease(output: str, run_id: str, *, take_over: bool) -> Lease:
        lease = Lease.acquire(output, run_id, take_over=take_over, ttl_s=1.0)
        lease._stop.set()  # stalled: its renewer stops as the whole process would
        taken.append(lease)
        return lease

    def stall(*args: object, **kwargs: object) -> None:  # the first step under the lease
        if threading.current_thread().name == "stalled":
            stalled.set()
            release.wait(120)
        check_settings(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(run, "take_lease", take_lease)
    monkeypatch.setattr(run.run_records, "check_settings", stall)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            run.run_job(config, show_progress=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first, name="stalled")
    thread.start()
    try:
        assert stalled.wait(120), "the first run never reached its lease"
        monkeypatch.setattr(run, "take_lease", lambda output, run_id, *, take_over: Lease.acquire(
            output, run_id, take_over=True))  # fmt: skip
        second = run.run_job(config, show_progress=False)  # takes the expired lease over, does the work
        assert second.images_ok == 4
        after_second = _objects(bucket)
    finally:
        release.set()
        thread.join(120)
    assert len(errors) == 1 and isinstance(errors[0], LeaseLost), errors
    assert _objects(bucket) == after_second  # not one object changed or added by the stalled run
    success = json.loads(after_second["out/_SUCCESS"])
    assert success["run_id"] == second.run_id
    records = {k: json.loads(v) for k, v in after_second.items() if k.startswith("out/_runs/")}
    assert [r["run_id"] for r in records.values()] == [second.run_id]  # the stalled run left no record
    assert taken[0].run_id != second.run_id


def test_a_second_run_completes_its_record_despite_a_cached_listing(ray_session: None, s3_env: dict[str, str]) -> None:
    from pipeline.run import run_job

    bucket = _bucket("pf-records", 2)
    output = f"s3://{bucket}/out"
    first = run_job(_config(f"s3://{bucket}/in/", output), show_progress=False)
    fs = s3fs.S3FileSystem()  # the instance every s3fs user in this process shares
    assert fs.ls(f"{bucket}/out/_runs/") == [f"{bucket}/out/_runs/{first.run_id}.json"]  # listing now cached
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="in/img9.jpg", Body=photo_bytes(48, 64, seed=9))  # another client
    second = run_job(_config(f"s3://{bucket}/in/", output), show_progress=False)
    assert second.images_ok == 1
    for run in (first, second):
        record = json.loads(client.get_object(Bucket=bucket, Key=f"out/_runs/{run.run_id}.json")["Body"].read())
        assert record["status"] == "finished", record
        assert record["this_run"]["images_ok"] == run.images_ok
