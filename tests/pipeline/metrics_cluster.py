"""Test script: `pipeline.segmenting.metrics.PartMetrics` in a Ray actor, read back from the node's Prometheus endpoint.

Run in its own process by tests/pipeline/test_metrics.py with a private RAY_TMPDIR::

    RAY_TMPDIR=/tmp/pf-XXXX python -m tests.pipeline.metrics_cluster ROWS_JSON

A one-node `ray.cluster_utils.Cluster` with its own ports (other Ray instances on this machine hold the defaults)
and a short metrics report interval; one actor creates a `PartMetrics` tagged ``run_id`` = `RUN_ID` and records
the rows given as JSON. The script then scrapes ``http://127.0.0.1:<metrics_export_port>/metrics`` until the
parts counter has counted every row (`PartMetrics` counts a part last), and once more after two report intervals.
The last stdout line is a JSON list of ``[sample name, labels, value]`` for each ``ray_panoptic_flow_`` sample
with this run id, summed over Ray's own labels (node, worker, session, ...).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray
from prometheus_client.parser import text_string_to_metric_families
from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "metrics-test-run"
EXPORTED_PREFIX = "ray_panoptic_flow_"
REPORT_INTERVAL_MS = 300
WAIT_S = 30.0
OUR_LABELS = ("status", "kind", "stage", "run_id")  # every other label is Ray's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
class _Recorder:
    def record(self, rows: list[dict[str, object]]) -> None:
        from pipeline.segmenting.metrics import PartMetrics

        metrics = PartMetrics(tags={"run_id": RUN_ID})
        for row in rows:
            metrics.record(row)


def scrape(port: int) -> list[list[Any]]:
    """This run's samples at ``port``, summed over Ray's own labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(EXPORTED_PREFIX) and sample.labels.get("run_id") == RUN_ID:
                labels = {k: v for k, v in sorted(sample.labels.items()) if k in OUR_LABELS}
                sums[sample.name, json.dumps(labels)] += sample.value
    return [[name, json.loads(labels), value] for (name, labels), value in sorted(sums.items())]


def main(argv: list[str]) -> int:
    rows = json.loads(argv[0])
    if not os.environ.get("RAY_TMPDIR") or os.environ.get("RAY_ADDRESS"):
        raise SystemExit("run with a private RAY_TMPDIR and no RAY_ADDRESS")
    temp_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray")
    os.makedirs(temp_dir, exist_ok=True)
    port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "temp_dir": temp_dir,
            "include_dashboard": False,
            "dashboard_agent_listen_port": _free_port(),
            "runtime_env_agent_port": _free_port(),
            "metrics_agent_port": _free_port(),
            "metrics_export_port": port,
            "_system_config": {"metrics_report_interval_ms": REPORT_INTERVAL_MS},
        },
    )
    samples: list[list[Any]] = []
    try:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        recorder = _Recorder.remote()  # type: ignore[attr-defined]
        ray.get(recorder.record.remote(rows), timeout=WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                samples = scrape(port)
            except OSError as exc:  # the metrics agent may still be starting
                print(f"scrape: {exc}", file=sys.stderr, flush=True)
            parts = sum(value for name, _, value in samples if name == f"{EXPORTED_PREFIX}parts_total")
            if parts >= len(rows):
                time.sleep(2 * REPORT_INTERVAL_MS / 1000)
                samples = scrape(port)
                break
            time.sleep(REPORT_INTERVAL_MS / 1000)
        ray.shutdown()
    finally:
        cluster.shutdown()
    print(json.dumps(samples), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
