"""Session fixtures shared by the pipeline and job tests: one local Ray per test run.

Ray workers inherit the environment of the process that starts Ray, so anything they need (the S3 test
endpoint and dummy credentials) is set before `ray.init`. Ray gets its own short temp dir and is shut
down by its own handle at the end; `ray stop` is never used.

No test may reach for cloud credentials outside loopback: at import (before any test, any Ray worker and
any subprocess starts) the AWS credential chain is cut down to what the tests set themselves. The EC2
instance metadata service is disabled, the container / web-identity providers and any profile are
unset, and the config and credentials files point to a path that does not exist (checked by
tests/test_no_cloud_credentials.py). The product itself keeps the standard chain.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

# Credential sources that would reach beyond loopback (IMDS at 169.254.169.254, the ECS/EKS container
# endpoint, STS for web identity) or read a developer's own keys and profiles.
AWS_VARIABLES_REMOVED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
)
NO_SUCH_FILE = "/nonexistent/panoptic-flow-tests/aws"
AWS_VARIABLES_SET = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": f"{NO_SUCH_FILE}/config",
    "AWS_SHARED_CREDENTIALS_FILE": f"{NO_SUCH_FILE}/credentials",
}
for _name in AWS_VARIABLES_REMOVED:
    os.environ.pop(_name, None)
os.environ.update(AWS_VARIABLES_SET)

if TYPE_CHECKING:
    from tests.s3_server import FaultProxy

# A secret that must never show up in a log or an output file (checked by tests/pipeline/test_job_s3.py).
CANARY_SECRET = "pf-canary-5ecret-7d1c0ffee"


@pytest.fixture(scope="session")
def ray_temp_dir() -> Iterator[str]:
    temp_dir = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")
    yield temp_dir
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(s3_env: dict[str, str], ray_temp_dir: str) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    temp_dir = ray_temp_dir
    ray.init(
        address="local",
        num_cpus=4,  # more logical CPUs than real cores: some Ray Data operators stall with 2
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_proxy() -> Iterator[FaultProxy]:
    """A moto S3 server on 127.0.0.1 for the whole session, behind a fault proxy (transparent unless a test
    sets a fault): the endpoint every client uses, Ray workers included."""
    from tests.s3_server import FaultProxy, MotoServer

    server = MotoServer()
    server.start()
    proxy = FaultProxy(server.endpoint_url, io_timeout_s=300.0)  # idle keep-alive connections stay open
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
        server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_proxy: FaultProxy) -> Iterator[dict[str, str]]:
    """The session's S3 endpoint (`s3_proxy`) and dummy keys in os.environ."""
    from tests.s3_server import s3_env as make_env

    env = {**make_env(s3_proxy.endpoint_url), "AWS_SECRET_ACCESS_KEY": CANARY_SECRET}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA is available (never in CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
