"""The S3 test support itself: moto over loopback, the environment, and each fault of the proxy as seen by
boto3, s3fs and pyarrow (which of them retry, which raise what, and that none returns short bytes).

Client retry settings used here, checked below:
- botocore `Config(retries={"total_max_attempts": N, "mode": "standard"})`: N attempts in all;
  `retries={"max_attempts": N}` counts *retries* (N + 1 attempts). Timeouts: `connect_timeout`, `read_timeout`.
- s3fs: botocore's options go in `config_kwargs` (`{"retries": ..., "connect_timeout": ..., "read_timeout": ...}`;
  s3fs fills in 5 s and 15 s for the timeouts). Around each call *and the read of its body*, s3fs's own loop makes
  `fs.retries` attempts (an attribute, default 5, not a constructor argument) on transport errors (connection,
  timeout, cut body) and SlowDown, sleeping min(0.1 * 1.7**i, 15) s after each failure.
- pyarrow: `S3FileSystem(retry_strategy=AwsStandardS3RetryStrategy(max_attempts=N), connect_timeout=...,
  request_timeout=...)`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.s3_server import FaultProxy, MotoServer, s3_env

boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from botocore.config import Config  # noqa: E402  (after the importorskip guards)
from botocore.exceptions import (  # noqa: E402
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)

DATA = os.urandom(300_000)  # several TCP segments and pyarrow read chunks
NO_RETRIES: dict[str, Any] = {"total_max_attempts": 1, "mode": "standard"}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(moto.endpoint_url) as fault_proxy:
        yield fault_proxy


@pytest.fixture(scope="module")
def direct(moto: MotoServer) -> Iterator[Any]:
    """A boto3 client that talks to moto directly."""
    client = _client(moto.endpoint_url)
    yield client
    client.close()


@pytest.fixture
def bucket(direct: Any) -> str:
    """A fresh bucket holding `DATA` at key `obj` (moto's state is shared by the whole process)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=name)
    direct.put_object(Bucket=name, Key="obj", Body=DATA)
    return name


def _client(endpoint_url: str, **config: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(**config),
    )


def _s3fs(endpoint_url: str, *, s3fs_retries: int = 5, **config_kwargs: Any) -> Any:
    """An uncached s3fs filesystem; `config_kwargs` go to botocore's Config."""
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint_url,
        key="testing",
        secret="testing",
        skip_instance_cache=True,
        config_kwargs=config_kwargs,
    )
    fs.retries = s3fs_retries  # s3fs's own attempts; a class attribute, not an __init__ argument
    return fs


# -- the moto server ------------------------------------------------------------------------------------


def test_moto_serves_put_get_and_list_to_boto3_and_s3fs(moto: MotoServer, direct: Any, bucket: str) -> None:
    assert moto.endpoint_url.startswith("http://127.0.0.1:")
    client = direct
    client.put_object(Bucket=bucket, Key="dir/a.bin", Body=b"a")
    fs = _s3fs(moto.endpoint_url)
    fs.pipe(f"{bucket}/dir/b.bin", b"bb")
    fs.pipe(f"{bucket}/other/c.bin", b"ccc")

    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == DATA
    assert fs.cat(f"{bucket}/dir/a.bin") == b"a"
    assert client.get_object(Bucket=bucket, Key="dir/b.bin")["Body"].read() == b"bb"
    assert sorted(fs.ls(f"{bucket}/dir", detail=False)) == [f"{bucket}/dir/a.bin", f"{bucket}/dir/b.bin"]
    listed = client.list_objects_v2(Bucket=bucket, Prefix="dir/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("dir/a.bin", 1), ("dir/b.bin", 2)]


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_the_environment_alone_points_s3fs_and_boto3_at_the_server(
    moto: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    for key, value in s3_env(moto.endpoint_url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(({"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} - {variable}).pop())  # either one suffices
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    # Checked before any request, so a failure never sends traffic off the machine.
    assert fs.connect().meta.endpoint_url == moto.endpoint_url
    client = boto3.client("s3")
    assert client.meta.endpoint_url == moto.endpoint_url

    client.put_object(Bucket=bucket, Key="from-boto3", Body=b"via env")
    assert fs.cat(f"s3://{bucket}/from-boto3") == b"via env"
    client.close()


def test_pyarrow_from_uri_honours_the_environment(
    moto: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`FileSystem.from_uri` (what Ray Data uses for s3:// paths) reads AWS_ENDPOINT_URL; a bare
    `S3FileSystem()` does not (it would go to amazonaws.com, so that is not exercised here)."""
    pafs = pytest.importorskip("pyarrow.fs")
    for key, value in s3_env(moto.endpoint_url).items():
        monkeypatch.setenv(key, value)
    fs, path = pafs.FileSystem.from_uri(f"s3://{bucket}/obj")
    assert path == f"{bucket}/obj"
    assert fs.open_input_stream(path).read() == DATA
    explicit = pafs.S3FileSystem(endpoint_override=moto.endpoint_url)  # a scheme in the URL wins over https
    assert explicit.open_input_stream(path).read() == DATA


def test_reset_empties_the_server(moto: MotoServer, direct: Any, bucket: str) -> None:
    assert bucket in [b["Name"] for b in direct.list_buckets()["Buckets"]]
    moto.reset()
    assert direct.list_buckets()["Buckets"] == []
    with pytest.raises(ClientError, match="NoSuchBucket"):
        direct.get_object(Bucket=bucket, Key="obj")


# -- the fault proxy, through botocore ------------------------------------------------------------------


def test_proxy_without_faults_is_transparent(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES)
    body = os.urandom(2_000_000)
    client.put_object(Bucket=bucket, Key="big", Body=body)
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == body
    assert client.get_object(Bucket=bucket, Key="obj", Range="bytes=10-19")["Body"].read() == DATA[10:20]
    assert client.head_object(Bucket=bucket, Key="obj")["ContentLength"] == len(DATA)
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["big", "obj"]
    assert proxy.requests_seen == 5 and proxy.faults_injected == 0
    client.close()


def test_botocore_config_max_attempts_counts_retries_not_attempts() -> None:
    client = _client("http://127.0.0.1:9", retries={"max_attempts": 1, "mode": "standard"})
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 2}
    client.close()


def test_slowdown_503_is_retried_by_botocore_standard_mode(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries={"total_max_attempts": 3, "mode": "standard"})
    proxy.set_fault("slowdown_503", count=1)  # each throttling retry waits up to 2**attempt s: keep it to one
    response = client.get_object(Bucket=bucket, Key="obj")
    assert response["Body"].read() == DATA
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    assert proxy.faults_injected == 1 and proxy.faults_left == 0
    client.close()


def test_slowdown_503_without_retries_raises_slowdown(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES)
    proxy.set_fault("slowdown_503", count=1)
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=bucket, Key="obj")
    assert info.value.response["Error"]["Code"] == "SlowDown"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == DATA  # healed after one
    client.close()


@pytest.mark.parametrize("truncate_at", [0, 1000])
def test_truncated_body_raises_on_a_raw_botocore_read(proxy: FaultProxy, bucket: str, truncate_at: int) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES)
    proxy.set_fault("truncate", truncate_at=truncate_at)
    response = client.get_object(Bucket=bucket, Key="obj")  # the head arrived whole: the call succeeds
    with pytest.raises(ResponseStreamingError, match=f"IncompleteRead\\({truncate_at} bytes read"):
        response["Body"].read()
    assert proxy.faults_injected == 1
    client.close()


def test_reset_raises_without_retries_and_is_retried_with_them(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES)
    proxy.set_fault("reset", count=1)
    with pytest.raises(ConnectionClosedError):
        client.get_object(Bucket=bucket, Key="obj")
    assert proxy.faults_left == 0
    client.close()

    client = _client(proxy.endpoint_url, retries={"total_max_attempts": 3, "mode": "standard"})
    proxy.set_fault("reset", count=1)
    response = client.get_object(Bucket=bucket, Key="obj")
    assert response["Body"].read() == DATA
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    client.close()


def test_delay_past_read_timeout_raises_a_timeout(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES, read_timeout=0.3)
    proxy.set_fault("delay", delay_s=1.5)
    start = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        client.get_object(Bucket=bucket, Key="obj")
    assert time.monotonic() - start < 1.5
    client.close()


def test_stall_sends_the_head_and_then_no_body(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES, read_timeout=0.5)
    proxy.set_fault("stall", methods=["GET"])
    assert client.head_object(Bucket=bucket, Key="obj")["ContentLength"] == len(DATA)  # no body: not stalled
    response = client.get_object(Bucket=bucket, Key="obj")  # the head arrived whole: the call succeeds
    assert response["ContentLength"] == len(DATA) and proxy.faults_injected == 1
    start = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        response["Body"].read()
    assert 0.5 <= time.monotonic() - start < 3
    client.close()  # closes its connections: the proxy sees the client give up
    deadline = time.monotonic() + 3
    while not proxy.stalls_given_up_s and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(proxy.stalls_given_up_s) == 1 and 0.5 <= proxy.stalls_given_up_s[0] < 3
    client = _client(proxy.endpoint_url, retries=NO_RETRIES, read_timeout=0.5)
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == DATA  # healed after one
    client.close()


def test_stall_holds_the_connection_until_healed(proxy: FaultProxy, bucket: str) -> None:
    host, port = _host_port(proxy.endpoint_url)
    signer = _client(proxy.endpoint_url)
    url = signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "obj"})
    signer.close()
    proxy.set_fault("stall", count=1)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", url.removeprefix(proxy.endpoint_url))
    response = conn.getresponse()
    assert response.status == 200 and response.length == len(DATA)
    body: list[bytes | BaseException] = []
    reader = threading.Thread(target=lambda: body.append(_read_or_error(response)), daemon=True)
    reader.start()
    reader.join(1.0)
    assert reader.is_alive() and body == []  # nothing for a second: still held
    start = time.monotonic()
    proxy.heal()
    reader.join(5)
    assert not reader.is_alive() and time.monotonic() - start < 1  # healing ends it at once
    assert isinstance(body[0], http.client.IncompleteRead) and body[0].partial == b""
    assert proxy.stalls_given_up_s == []  # ended by the heal, not by the client
    conn.close()


def _read_or_error(response: http.client.HTTPResponse) -> bytes | BaseException:
    try:
        return response.read()
    except http.client.HTTPException as exc:
        return exc


def test_trickle_sends_the_whole_body_slowly(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES, read_timeout=0.5)
    proxy.set_fault("trickle", methods=["GET"], trickle_bytes=100_000, delay_s=0.3)
    start = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == DATA  # 3 pieces, 0.3 s before each
    assert time.monotonic() - start >= 0.9 and proxy.faults_injected == 1
    client.close()


def test_stopped_refuses_connections_until_healed(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint_url, retries=NO_RETRIES, connect_timeout=1)
    assert client.head_object(Bucket=bucket, Key="obj")["ContentLength"] == len(DATA)  # a pooled connection
    proxy.set_fault("stopped")
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket=bucket, Key="obj")
    proxy.heal()
    assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == DATA
    client.close()


def test_set_fault_rejects_bad_settings(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="explode"):
        proxy.set_fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count=2"):
        proxy.set_fault("stopped", count=2)
    with pytest.raises(ValueError, match="-1"):
        proxy.set_fault("reset", count=-1)
    with pytest.raises(ValueError, match="upstream_url"):
        FaultProxy("http://example.com:80")


# -- through s3fs and pyarrow: a cut body is retried to the full bytes or raised, never returned short ------


def test_s3fs_retries_a_truncated_body_to_the_full_bytes(proxy: FaultProxy, bucket: str) -> None:
    fs = _s3fs(proxy.endpoint_url, s3fs_retries=3)
    proxy.set_fault("truncate", count=2, truncate_at=1000, methods=["GET"])
    assert fs.cat(f"{bucket}/obj") == DATA
    proxy.set_fault("truncate", count=1, truncate_at=0, methods=["GET"])
    with fs.open(f"{bucket}/obj", "rb") as f:
        assert f.read() == DATA
    assert proxy.faults_injected == 3


def test_s3fs_raises_when_every_attempt_is_truncated(proxy: FaultProxy, bucket: str) -> None:
    aiohttp = pytest.importorskip("aiohttp")
    fs = _s3fs(proxy.endpoint_url, s3fs_retries=2)
    proxy.set_fault("truncate", count=2, truncate_at=1000, methods=["GET"])
    # The last read error comes out as it is (not translated to OSError).
    with pytest.raises(aiohttp.ClientPayloadError, match="received 1000 of 300000 bytes"):
        fs.cat(f"{bucket}/obj")
    assert proxy.faults_injected == 2


def test_s3fs_without_retries_raises_each_fault(proxy: FaultProxy, bucket: str) -> None:
    fs = _s3fs(proxy.endpoint_url, s3fs_retries=1, retries=NO_RETRIES, read_timeout=0.3)
    path = f"{bucket}/obj"
    proxy.set_fault("slowdown_503", count=1, methods=["GET"])
    with pytest.raises(OSError, match="Please reduce your request rate") as info:
        fs.cat_file(path)
    assert isinstance(info.value.__cause__, ClientError)
    proxy.set_fault("delay", count=1, delay_s=1.5, methods=["GET"])
    with pytest.raises(ReadTimeoutError):  # botocore's, not translated
        fs.cat_file(path)
    proxy.set_fault("reset", count=2, methods=["GET"])  # 2: aiohttp may retry a reused connection once itself
    with pytest.raises(EndpointConnectionError):  # aiobotocore's name for a reset connection
        fs.cat_file(path)
    proxy.heal()
    assert fs.cat_file(path) == DATA


def test_pyarrow_retries_a_truncated_body_or_raises(proxy: FaultProxy, bucket: str) -> None:
    pafs = pytest.importorskip("pyarrow.fs")
    fs = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        endpoint_override=proxy.endpoint_url.removeprefix("http://"),
        scheme="http",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    )
    proxy.set_fault("truncate", count=1, truncate_at=1000, methods=["GET"])
    assert fs.open_input_file(f"{bucket}/obj").read() == DATA
    assert proxy.faults_injected == 1

    proxy.set_fault("truncate", count=2, truncate_at=0, methods=["GET"])
    with pytest.raises(OSError, match="Transferred a partial file"):  # curl error 18
        fs.open_input_stream(f"{bucket}/obj").read()
    assert proxy.faults_injected == 3


# -- clean shutdown -------------------------------------------------------------------------------------


def test_no_thread_or_listener_survives_stop_and_close() -> None:
    before = set(threading.enumerate())
    server = MotoServer().start()
    fault_proxy = FaultProxy(server.endpoint_url).start()
    client = _client(fault_proxy.endpoint_url, retries=NO_RETRIES)
    client.create_bucket(Bucket=f"test-{uuid.uuid4().hex[:12]}")
    fault_proxy.set_fault("delay", delay_s=30)  # a handler thread asleep at close time
    waiter = threading.Thread(target=_swallow, args=(client.list_buckets,), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 5
    while fault_proxy.faults_injected == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fault_proxy.faults_injected == 1
    start = time.monotonic()
    fault_proxy.close()
    server.stop()
    waiter.join(5)
    client.close()
    assert time.monotonic() - start < 3

    deadline = time.monotonic() + 3
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [t.name for t in set(threading.enumerate()) - before] == []
    for url in (fault_proxy.endpoint_url, server.endpoint_url):
        with pytest.raises(ConnectionRefusedError), socket.create_connection(_host_port(url), timeout=1):
            pass


def _swallow(call: Any) -> None:
    with contextlib.suppress(Exception):  # the proxy closes under the request; any error is expected here
        call()


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)
