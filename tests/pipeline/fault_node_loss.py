"""Fault-test script: a two-node local Ray cluster loses the node running the model mid-job.

Run in its own process by tests/pipeline/test_faults.py (its `ray.init` must not meet the pytest
process's Ray), with RAY_TMPDIR set to a private short directory, so that the cluster's sockets and its
address file (which a bare `ray.init()` elsewhere would join) stay out of other sessions' way::

    RAY_TMPDIR=/tmp/pf-XXXX python -m tests.pipeline.fault_node_loss --input DIR --output DIR

Topology: a 1-CPU head (the driver's node) and a 4-CPU worker. The job sizes its CPU actor at 2 CPUs
(half the cluster's, and half the biggest node's), which only the worker can hold, so the model actor (and
decode tasks and their blocks) live on the worker. After the first part is committed the worker's
processes are all killed at once (as on a spot preemption), then a replacement worker joins (as from an
autoscaler). The job runs in a thread; the fault runs in the main thread (Ray starts nodes only there).
The last stdout line is a JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from tests.pipeline.fault_probes import committed_ids, committed_parts, segmenter_pids, wait_for

HEAD_CPUS = 1
WORKER_CPUS = 4
JOB_TIMEOUT_S = 150.0


def _raylet_pid(node: ray._private.node.Node) -> int:
    return node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _run(config: JobConfig, report: dict) -> None:
    from pipeline.run import run_job  # imports Ray Data

    try:
        summary = run_job(config, show_progress=False)
        report.update(images_ok=summary.images_ok, images_error=summary.images_error, job_s=round(summary.seconds, 1))
    except BaseException as exc:  # reported to the test, which fails on it
        report["job_error"] = repr(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not os.environ.get("RAY_TMPDIR") or os.environ.get("RAY_ADDRESS"):
        parser.error("run with a private RAY_TMPDIR and no RAY_ADDRESS")
    # Ray's default temp dir under RAY_TMPDIR: where the cluster's address file goes.
    temp_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray")
    os.makedirs(temp_dir, exist_ok=True)
    output = Path(args.output)
    config = JobConfig(
        input=InputConfig((args.input,)),
        output=args.output,
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(batch_size=2, device="cpu", rows_per_file=2, max_actors=1),  # the one actor lost
    )
    report: dict = {}
    t0 = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": HEAD_CPUS, "temp_dir": temp_dir, "include_dashboard": False},
    )
    try:
        worker = cluster.add_node(num_cpus=WORKER_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        job = threading.Thread(target=_run, args=(config, report), daemon=True)
        job.start()

        wait_for(lambda: committed_parts(output) or not job.is_alive(), timeout=120, what="the first commit")
        report["actors_on_lost_node"] = len(segmenter_pids(_raylet_pid(worker)))
        report["committed_before_loss"] = len(committed_ids(output))
        report["job_alive_at_loss"] = job.is_alive()
        cluster.remove_node(worker, allow_graceful=False)
        report["lost_at_s"] = round(time.monotonic() - t0, 1)
        report["job_alive_after_loss"] = job.is_alive()
        cluster.add_node(num_cpus=WORKER_CPUS)
        report["replaced_at_s"] = round(time.monotonic() - t0, 1)

        job.join(timeout=JOB_TIMEOUT_S)
        report["job_finished"] = not job.is_alive()
        report["total_s"] = round(time.monotonic() - t0, 1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
