"""Fault-test script: the write stage on a multi-node cluster, and write tasks killed mid-commit.

Run in its own process by tests/pipeline/test_write_stage.py with a private RAY_TMPDIR::

    RAY_TMPDIR=/tmp/pf-XXXX python -m tests.pipeline.fault_write_stage --input DIR --output-root DIR

Topology (`ray.cluster_utils.Cluster`, all on this machine): a head with no CPUs for tasks and two worker
nodes, so every task and actor runs on a worker node. The driver here has
`pipeline.exactly_once.commit.OutputCommitter.write_part`
replaced by a function that fails: the job succeeds only if no part is written by the driver.

Scenarios, one Ray job each (``worker_process_setup_hook`` installs `tests.pipeline.fault_hooks` in the
job's workers): ``between`` (the first write task is killed after its segments file, before its images file);
``after`` (killed after both files, before it returns); ``actor`` (the model actor is killed in the middle of
its second batch). Each checks where the parts were written as well. Ray retries a task whose worker died and
restarts a dead actor. The last stdout line is a JSON report: per scenario the summary, the parts by node, the struck
path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

import pipeline.exactly_once.commit
from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig

REPO = Path(__file__).resolve().parents[2]
WORKER_CPUS = 3
SCENARIOS = ("between", "after", "actor")


def _driver_must_not_write(*args: object, **kwargs: object) -> None:
    raise AssertionError("the driver tried to write a part")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output-root", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not os.environ.get("RAY_TMPDIR") or os.environ.get("RAY_ADDRESS"):
        parser.error("run with a private RAY_TMPDIR and no RAY_ADDRESS")
    temp_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray")
    os.makedirs(temp_dir, exist_ok=True)
    pipeline.exactly_once.commit.OutputCommitter.write_part = _driver_must_not_write  # type: ignore[assignment,method-assign]
    from pipeline.run import run_job

    report: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir,
                                                            "include_dashboard": False})  # fmt: skip
    try:
        workers = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(2)]
        cluster.wait_for_nodes()
        report["head_node"] = cluster.head_node.node_id
        report["worker_nodes"] = [w.node_id for w in workers]
        for scenario in SCENARIOS:
            marker = os.path.join(tempfile.mkdtemp(prefix="pf-marker-"), "struck")
            runtime_env = {
                "worker_process_setup_hook": "tests.pipeline.fault_hooks.install",
                # the hook's module must import in the workers, whatever their working directory
                "env_vars": {"PF_FAULT": scenario, "PF_FAULT_MARKER": marker, "PYTHONPATH": str(REPO)},
            }
            ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env)
            config = JobConfig(
                input=InputConfig((args.input,)),
                output=os.path.join(args.output_root, scenario),
                model=ModelSpec(weights="synthetic"),
                inference=InferenceConfig(min_size=64, max_size=107),
                resources=ResourceConfig(batch_size=4, device="cpu", rows_per_file=4, max_actors=1),  # one actor
            )
            try:
                summary = run_job(config, show_progress=False)
                report[scenario] = {
                    "images_ok": summary.images_ok,
                    "images_error": summary.images_error,
                    "parts": summary.parts,
                    "parts_by_node": summary.parts_by_node,
                    "totals_images": summary.totals.images,
                }
            except BaseException as exc:  # reported to the test, which fails on it
                report[scenario] = {"error": repr(exc)}
            finally:
                ray.shutdown()
            report[scenario]["struck"] = Path(marker).read_text() if os.path.exists(marker) else None
            print(json.dumps({scenario: report[scenario]}), file=sys.stderr, flush=True)  # progress
    finally:
        cluster.shutdown()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
