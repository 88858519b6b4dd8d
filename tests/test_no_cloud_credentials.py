"""The test session never reaches for cloud credentials outside loopback (set up in tests/conftest.py).

Proved by asking botocore's real credential chain for credentials with no keys set, in a fresh process
that inherits the session's environment (as every subprocess and Ray worker does) and whose sockets
record every address they are asked to connect to: no address outside 127.0.0.0/8 is ever tried. Without
the conftest settings, botocore would ask the EC2 instance metadata service at 169.254.169.254.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AWS_VARIABLES_REMOVED, AWS_VARIABLES_SET

# Runs in a fresh interpreter: record connection attempts, refuse them all, resolve credentials.
_PROBE = """
import json, os, socket, sys
for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    os.environ.pop(name, None)  # the s3 fixtures' dummy keys would end the chain before any network source
tried = []
def refuse(self, address, *args, **kwargs):
    tried.append(str(address[0]) if isinstance(address, tuple) else str(address))
    raise OSError("connection refused by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
import botocore.session
credentials = botocore.session.Session().get_credentials()
print(json.dumps({"tried": tried, "found": credentials is not None}))
"""


def _probe(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_session_environment_cuts_the_credential_chain() -> None:
    for name, value in AWS_VARIABLES_SET.items():
        assert os.environ.get(name) == value, name
    assert not Path(os.environ["AWS_CONFIG_FILE"]).exists()
    assert not Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).exists()
    assert not set(AWS_VARIABLES_REMOVED) & set(os.environ) - {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_credential_lookup_tries_no_address_outside_loopback() -> None:
    result = _probe(dict(os.environ))
    assert result["found"] is False
    assert [a for a in result["tried"] if not a.startswith("127.")] == []


def test_the_probe_sees_the_metadata_service_without_the_settings() -> None:
    """The probe can fail: with the settings undone, botocore does try the EC2 metadata address."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES_SET}
    result = _probe(env)
    assert "169.254.169.254" in result["tried"]


def test_ray_workers_inherit_the_settings(ray_session: None) -> None:
    import ray

    @ray.remote
    def worker_environment() -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in [*AWS_VARIABLES_SET, "AWS_PROFILE"]}

    assert ray.get(worker_environment.remote()) == {**AWS_VARIABLES_SET, "AWS_PROFILE": None}


@pytest.mark.parametrize("name", ["AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ROLE_ARN"])
def test_profile_and_role_variables_are_unset(name: str) -> None:
    assert name in AWS_VARIABLES_REMOVED and name not in os.environ
