"""Test script: start a local Ray head node with its dashboard, run `ray job submit --working-dir .` of the
segment job against it, and shut the node down by its own handle.

Run in its own process by tests/jobs/test_job_submit.py with a private RAY_TMPDIR (the cluster's address
file and sockets stay out of other sessions' way); `ray stop` is never used. The last stdout line is JSON.

    RAY_TMPDIR=/tmp/pf-XXXX python -m tests.jobs.job_submit_cluster --input DIR --output DIR
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not os.environ.get("RAY_TMPDIR") or os.environ.get("RAY_ADDRESS"):
        parser.error("run with a private RAY_TMPDIR and no RAY_ADDRESS")
    temp_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray")
    os.makedirs(temp_dir, exist_ok=True)
    dashboard_port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "temp_dir": temp_dir,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            # Own ports for every agent: other Ray instances on this machine hold the defaults.
            "dashboard_agent_listen_port": _free_port(),
            "runtime_env_agent_port": _free_port(),
            "metrics_agent_port": _free_port(),
            "metrics_export_port": _free_port(),
        },
    )
    report: dict = {}
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
            "--working-dir", str(ROOT), "--",
            sys.executable, "-m", "jobs.segment", "--input", args.input, "--output", args.output,
            "--weights", "synthetic", "--device", "auto", "--min-size", "64", "--max-size", "107", "--no-progress",
        ]  # fmt: skip
        for _ in range(15):  # the node's dashboard agent may still be starting: "No available agent"
            done = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=ROOT)
            if "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        report = {"returncode": done.returncode, "stdout_tail": done.stdout[-3000:], "stderr_tail": done.stderr[-2000:]}
    finally:
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
