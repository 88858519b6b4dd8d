"""End to end on real S3 over HTTP (moto on 127.0.0.1): folders, tar shards and Parquet shards from s3://,
Parquet written to s3:// and read back."""

from __future__ import annotations

import contextlib
import io

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.inputs.sources import InputError
from pipeline.reading.output_tables import open_table
from tests.pipeline.images import photo_bytes, tar_bytes

INFERENCE = InferenceConfig(min_size=64, max_size=107)


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    name = "pf-e2e"
    client = boto3.client("s3")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)
    return name


def _config(inputs: tuple[str, ...], output: str, **input_options: object) -> JobConfig:
    return JobConfig(
        input=InputConfig(inputs, **input_options),  # type: ignore[arg-type]
        output=output,
        model=ModelSpec(weights="synthetic"),
        inference=INFERENCE,
        resources=ResourceConfig(batch_size=4, device="cpu", rows_per_file=3, max_actors=1),
    )


def test_s3_folder_tar_and_parquet_to_s3(ray_session: None, bucket: str) -> None:
    from pipeline.run import run_job

    s3 = boto3.client("s3")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"imgs/p{i}.jpg", Body=photo_bytes(60, 80, seed=20 + i))
    s3.put_object(Bucket=bucket, Key="imgs/bad.png", Body=b"<html>not a png</html>")
    shard = tar_bytes(
        [
            ("k1.jpg", photo_bytes(50, 70, seed=30)),
            ("k1.cls", b"3"),
            ("k2.png", photo_bytes(70, 50, fmt="PNG", seed=31)),
        ]
    )
    s3.put_object(Bucket=bucket, Key="shards/shard-000.tar", Body=shard)
    table = pa.table({"image": [photo_bytes(64, 64, seed=40), b"\x00\x01"]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3.put_object(Bucket=bucket, Key="pq/part-0.parquet", Body=buffer.getvalue())

    inputs = (f"s3://{bucket}/imgs/", f"s3://{bucket}/shards/shard-000.tar", f"s3://{bucket}/pq/part-0.parquet")
    output = f"s3://{bucket}/out/run1"
    summary = run_job(_config(inputs, output), show_progress=False)
    assert (summary.images_ok, summary.images_error) == (6, 2)

    images = open_table(output, "images").to_table().to_pylist()
    expected_ids = {f"s3://{bucket}/imgs/p{i}.jpg" for i in range(3)} | {
        f"s3://{bucket}/imgs/bad.png",
        f"s3://{bucket}/shards/shard-000.tar#k1.jpg",
        f"s3://{bucket}/shards/shard-000.tar#k2.png",
        f"s3://{bucket}/pq/part-0.parquet#row=0",
        f"s3://{bucket}/pq/part-0.parquet#row=1",
    }
    assert sorted(r["image_id"] for r in images) == sorted(expected_ids)
    errors = {r["image_id"]: r["error"] for r in images if r["status"] == "error"}
    assert set(errors) == {f"s3://{bucket}/imgs/bad.png", f"s3://{bucket}/pq/part-0.parquet#row=1"}
    segments = open_table(output, "segments").to_table()
    ok_rows = {r["image_id"]: r for r in images if r["status"] == "ok"}
    per_image = {}
    for image_id in segments.column("image_id").to_pylist():
        per_image[image_id] = per_image.get(image_id, 0) + 1
    assert per_image == {k: v["num_segments"] for k, v in ok_rows.items() if v["num_segments"]}
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="out/run1/")["Contents"]
    keys = {o["Key"] for o in listing}
    assert "out/run1/_SUCCESS" in keys and f"out/run1/_runs/{summary.run_id}.json" in keys
    assert "out/run1/_lease.json" not in keys  # released at the end

    # Re-running the same command commits nothing new.
    again = run_job(_config(inputs, output), show_progress=False)
    assert (again.images_ok, again.images_error, again.skipped_committed) == (0, 0, 8)
    assert again.parts == 0 and again.totals.images == 8
    assert open_table(output, "images").count_rows() == 8


def test_canary_secret_appears_in_no_log_or_output(ray_session: None, ray_temp_dir: str, bucket: str) -> None:
    """The secret key (set only in the environment) is in no Ray log and no output object of the S3 run."""
    from pathlib import Path

    from tests.conftest import CANARY_SECRET

    secret = CANARY_SECRET.encode()
    s3 = boto3.client("s3")
    outputs = s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    assert outputs, "runs after test_s3_folder_tar_and_parquet_to_s3 and scans its output"
    for obj in outputs:
        assert secret not in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read(), obj["Key"]
    logs = [p for p in Path(ray_temp_dir).rglob("*") if p.is_file() and "logs" in p.parts]
    assert logs
    for path in logs:
        assert secret not in path.read_bytes(), path


def test_bad_inputs_fail_before_any_work(s3_env: dict[str, str], bucket: str) -> None:
    from pipeline.inputs.sources import resolve_inputs

    with pytest.raises(InputError, match="no-such-bucket"):
        resolve_inputs(InputConfig(("s3://no-such-bucket-pf/x/",)))
    boto3.client("s3").put_object(Bucket=bucket, Key="texts/readme.txt.bak", Body=b"x")
    with pytest.raises(InputError, match="no images found"):
        resolve_inputs(InputConfig((f"s3://{bucket}/texts/",)))
