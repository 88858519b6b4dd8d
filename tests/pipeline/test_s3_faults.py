"""Reading from S3 through a loopback fault proxy: transient faults are retried to the full, correct bytes;
a gone object or a dead endpoint becomes an error row; nothing is short or lost silently."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import numpy as np
import pytest
import s3fs

from pipeline.config import InputConfig
from pipeline.inputs.readers import read_refs
from pipeline.inputs.sources import resolve_inputs
from tests.pipeline.images import photo_bytes
from tests.s3_server import FaultProxy, proxied_s3

BUCKET = "pf-faults"


@pytest.fixture
def proxy(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """S3 clients created in this test go through a fault proxy in front of the session's moto server."""
    with proxied_s3(s3_env["AWS_ENDPOINT_URL"], monkeypatch, bucket=BUCKET) as fault_proxy:
        yield fault_proxy


def _refs(*uris: str) -> dict[str, np.ndarray]:
    return {"uri": np.array(uris, dtype=object), "kind": np.array(["file"] * len(uris), dtype=object)}


def _read(*uris: str) -> dict[str, np.ndarray]:
    return read_refs(_refs(*uris), bytes_column="image", id_column=None)


@pytest.mark.parametrize(
    ("mode", "options"),
    [("truncate", {"truncate_at": 1000}), ("slowdown_503", {}), ("reset", {})],
)
def test_transient_faults_are_retried_to_the_full_bytes(proxy: FaultProxy, mode: str, options: dict) -> None:
    data = photo_bytes(200, 260, seed=1)
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"{mode}.jpg", Body=data)
    proxy.set_fault(mode, count=2, methods=["GET"], **options)  # type: ignore[arg-type]
    out = _read(f"s3://{BUCKET}/{mode}.jpg")
    assert proxy.faults_injected == 2
    assert out["error"].tolist() == [""]
    assert out["data"][0] == data


def test_key_deleted_between_listing_and_reading_is_an_error_row(proxy: FaultProxy) -> None:
    client = boto3.client("s3")
    for name in ("keep.jpg", "gone.jpg"):
        client.put_object(Bucket=BUCKET, Key=f"race/{name}", Body=photo_bytes(40, 40, seed=2))
    refs = resolve_inputs(InputConfig((f"s3://{BUCKET}/race/",))).refs
    assert sorted(r["uri"] for r in refs) == [f"s3://{BUCKET}/race/gone.jpg", f"s3://{BUCKET}/race/keep.jpg"]
    client.delete_object(Bucket=BUCKET, Key="race/gone.jpg")
    s3fs.S3FileSystem.clear_instance_cache()  # no cached listing: the read must see the object is gone
    out = _read(*sorted(r["uri"] for r in refs))
    by_id = dict(zip(out["image_id"].tolist(), out["error"].tolist()))
    assert by_id[f"s3://{BUCKET}/race/keep.jpg"] == ""
    assert by_id[f"s3://{BUCKET}/race/gone.jpg"].startswith("not found:")
    assert dict(zip(out["image_id"].tolist(), out["retryable"].tolist())) == {
        f"s3://{BUCKET}/race/keep.jpg": False,
        f"s3://{BUCKET}/race/gone.jpg": False,  # gone is final: a re-run would not find it either
    }


def test_dead_endpoint_gives_an_error_row_after_bounded_retries(proxy: FaultProxy) -> None:
    boto3.client("s3").put_object(Bucket=BUCKET, Key="dead.jpg", Body=b"x")
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.set_fault("stopped")
    out = _read(f"s3://{BUCKET}/dead.jpg")
    assert out["error"][0].startswith("unreadable:") and out["retryable"][0]  # the next run tries again
    assert out["data"][0] == b""
