"""Ray's autoscaler adds a GPU worker node for a GPU actor and removes it once idle (fake multi-node cluster).

This is the mechanism cluster.yaml and jobs/k8s/raycluster.yaml rely on: a head without GPUs, a GPU worker
type with ``min_workers: 0``, and an idle timeout. Ray's fake multi-node provider plays the cloud: each
"launched node" is one more raylet on this machine, advertising the node type's resources (so GPU 1 without a
GPU).

Why not ``ray.cluster_utils.AutoscalingCluster``: in ray 2.60.0 it cannot even be constructed from the
wheel (it reads ``autoscaler/_private/fake_multi_node/example.yaml``, which the wheel does not ship), and its
``start()``/``shutdown()`` run ``ray stop --force``, which kills every Ray process on the machine, a shared
test Ray included. Instead, a child process starts a head with ``ray.cluster_utils.Cluster`` and a complete
autoscaling config for the ``fake_multinode`` provider, in its own temp dir (RAY_TMPDIR) and on its own
GCS, dashboard and agent ports, and stops it through its own handle. The child runs in a session (process
group) of its own, with no RAY_* variables inherited, so a Ray that other tests started with
``ray.init(address="local")`` is neither joined nor touched. Afterwards the test looks for processes whose
command line mentions the temp dir, kills those by PID, and fails if there were any.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORT_PREFIX = "FAKE_AUTOSCALER_REPORT "
CHILD_TIMEOUT_S = 150  # typically 20-30 s on a 2-core machine
SCALE_UP_TIMEOUT_S = 60
SCALE_DOWN_TIMEOUT_S = 60
GPU_NODE_TYPE = "gpu_worker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _autoscaling_config(gcs_address: str) -> dict[str, Any]:
    """A complete config: the v1 autoscaler reads it as is (no defaults file is merged in)."""
    return {
        "cluster_name": "panoptic-flow-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,  # 3 s
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # where launched raylets join (the provider defaults to port 6379)
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
            GPU_NODE_TYPE: {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100 * 1024 * 1024},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class _GpuProbe:
    """Stands in for the model actor: it only reports where Ray placed it."""

    def where(self) -> tuple[str, list[str]]:
        import ray

        context = ray.get_runtime_context()
        return context.get_node_id(), [str(i) for i in context.get_accelerator_ids().get("GPU", [])]


def _alive_nodes() -> dict[str, dict[str, float]]:
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def _run_child(tmp: str) -> dict[str, Any]:
    """Start the fake cluster, scale a GPU node up and down, stop the cluster; return what was observed."""
    import ray
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    started = time.monotonic()
    port = _free_port()
    config_path = os.path.join(tmp, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(_autoscaling_config(f"{get_node_ip_address()}:{port}"), f)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "gcs_server_port": port,
            "temp_dir": os.path.join(tmp, "ray"),
            "autoscaling_config": config_path,
            "include_dashboard": False,
            "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
        },
    )
    report: dict[str, Any] = {}
    try:
        ray.init(address=cluster.address)
        head_id = ray.get_runtime_context().get_node_id()
        report["nodes_before"] = len(_alive_nodes())
        report["gpus_before"] = ray.cluster_resources().get("GPU", 0)
        report["ready_s"] = time.monotonic() - started

        probe = ray.remote(num_gpus=1, num_cpus=0)(_GpuProbe).remote()
        node_id, gpu_ids = ray.get(probe.where.remote(), timeout=SCALE_UP_TIMEOUT_S)
        report["scaled_up_s"] = time.monotonic() - started
        report["probe_on_head"] = node_id == head_id
        report["probe_gpu_ids"] = gpu_ids
        report["probe_node_gpus"] = _alive_nodes().get(node_id, {}).get("GPU", 0)

        ray.kill(probe)  # the node is now idle
        deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
        while node_id in _alive_nodes() and time.monotonic() < deadline:
            time.sleep(0.5)
        report["gpu_node_alive_after_idle"] = node_id in _alive_nodes()
        report["nodes_after"] = len(_alive_nodes())
        report["scaled_down_s"] = time.monotonic() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    return report


def _processes_mentioning(text: str) -> dict[int, str]:
    """PID -> command line of every process (but this one) whose command line contains ``text`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


def _kill_leftovers(tmp: str) -> dict[int, str]:
    """Terminate (then kill) the processes that still mention ``tmp``; return those found."""
    leftovers = _processes_mentioning(tmp)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_mentioning(tmp):
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while _processes_mentioning(tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
    return leftovers


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the leftover-process check reads /proc")
def test_gpu_node_scales_up_from_zero_and_back() -> None:
    # A short path: Ray's Unix socket paths under it must stay below the 107-byte limit.
    tmp = tempfile.mkdtemp(prefix="pf-fakeas-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS, auth mode, ...
    env.update(
        RAY_TMPDIR=tmp,  # also where Cluster writes its "current cluster" address file
        RAY_FAKE_CLUSTER="1",  # required by the fake_multinode provider
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    child = subprocess.Popen(
        [sys.executable, __file__, tmp],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killable as a whole, unreachable by others' signals
    )
    try:
        output, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        output += f"\n[timed out after {CHILD_TIMEOUT_S} s]"
    finally:
        leftovers = _kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    tail = "\n".join(output.splitlines()[-40:])
    assert not leftovers, f"processes survived the cluster's shutdown: {leftovers}"
    assert child.returncode == 0, f"child failed (rc={child.returncode}):\n{tail}"
    reports = [line[len(REPORT_PREFIX) :] for line in output.splitlines() if line.startswith(REPORT_PREFIX)]
    assert len(reports) == 1, tail
    report = json.loads(reports[0])

    assert report["nodes_before"] == 1 and report["gpus_before"] == 0, report  # head only, no GPU
    assert not report["probe_on_head"], report  # a worker node was launched for the GPU actor
    assert report["probe_node_gpus"] == 1 and report["probe_gpu_ids"] == ["0"], report
    assert not report["gpu_node_alive_after_idle"] and report["nodes_after"] == 1, report  # and removed when idle


if __name__ == "__main__":
    print(REPORT_PREFIX + json.dumps(_run_child(sys.argv[1])), flush=True)
