"""A job whose read of one image stalls (S3 through the session's fault proxy: the response head, then no bytes):
that image gets a retryable error row naming the timeout, the others are committed, the job finishes, and a
re-run after the fault redoes that image alone."""

from __future__ import annotations

import contextlib

import boto3
import pytest

from model.predictor import InferenceConfig
from pipeline.config import FailureConfig, InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.reading.output_tables import open_table
from tests.pipeline.images import photo_bytes
from tests.s3_server import FaultProxy

BUCKET = "pf-stalled-read"
NUM_IMAGES = 6
READ_TIMEOUT_S = 2.0
MARGIN_S = 15.0  # generous for a loaded 2-core machine: the fault would otherwise hold the read for minutes


def _config(output: str) -> JobConfig:
    return JobConfig(
        input=InputConfig((f"s3://{BUCKET}/imgs/",)),
        output=output,
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(batch_size=4, device="cpu", rows_per_file=4, max_actors=1),
        failures=FailureConfig(read_timeout_s=READ_TIMEOUT_S),
    )


def test_a_stalled_read_is_a_retryable_error_row_and_the_shard_goes_on(ray_session: None, s3_proxy: FaultProxy) -> None:
    from pipeline.run import run_job

    s3 = boto3.client("s3")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    for i in range(NUM_IMAGES):
        s3.put_object(Bucket=BUCKET, Key=f"imgs/p{i}.jpg", Body=photo_bytes(48, 64, seed=60 + i))
    stalled = f"s3://{BUCKET}/imgs/p2.jpg"
    injected, given_up = s3_proxy.faults_injected, len(s3_proxy.stalls_given_up_s)
    # Every GET of that one object stalls (the read and its one retry), in the Ray workers too: they reach S3
    # through this proxy.
    s3_proxy.set_fault("stall", count=100, methods=["GET"], paths=[f"/{BUCKET}/imgs/p2.jpg"])
    try:
        summary = run_job(_config(f"s3://{BUCKET}/out/run1"), show_progress=False)
        assert s3_proxy.faults_injected - injected == 2  # struck twice: the read and one retry, no more
    finally:
        s3_proxy.heal()
    stalls = s3_proxy.stalls_given_up_s[given_up:]
    assert len(stalls) == 2 and all(READ_TIMEOUT_S - 0.1 <= s < READ_TIMEOUT_S + MARGIN_S for s in stalls), stalls

    assert (summary.images_ok, summary.images_error, summary.this_run.images_retryable) == (NUM_IMAGES - 1, 1, 1)
    rows = {r["image_id"]: r for r in open_table(f"s3://{BUCKET}/out/run1", "images").to_table().to_pylist()}
    assert len(rows) == NUM_IMAGES
    assert rows[stalled]["status"] == "error" and rows[stalled]["retryable"]
    timed_out = f"unreadable: ReadTimedOut: read timed out: no bytes for {READ_TIMEOUT_S:g} s ("  # (its cause)
    assert rows[stalled]["error"].startswith(timed_out), rows[stalled]["error"]
    assert all(r["status"] == "ok" for image_id, r in rows.items() if image_id != stalled)

    # The fault gone, a re-run redoes the timed-out image alone.
    again = run_job(_config(f"s3://{BUCKET}/out/run1"), show_progress=False)
    assert (again.images_ok, again.images_error, again.skipped_committed) == (1, 0, NUM_IMAGES - 1)
    images = open_table(f"s3://{BUCKET}/out/run1", "images").to_table()
    assert images.num_rows == NUM_IMAGES  # the error row retracted, not kept beside the new one
    assert {r["image_id"]: r["status"] for r in images.to_pylist()}[stalled] == "ok"


@pytest.fixture(autouse=True)
def _no_stall_left(s3_proxy: FaultProxy) -> None:
    s3_proxy.heal()
