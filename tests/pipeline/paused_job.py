"""``python -m tests.pipeline.paused_job ARGS``: `jobs.segment` with ARGS, joined to ``RAY_ADDRESS``, whose workers
hold right after the job's first commit until the file ``PF_FAULT_RELEASE`` exists (`tests.pipeline.fault_hooks`,
``PF_FAULT=pause``; the commit's path goes to ``PF_FAULT_MARKER``). A test can then act "mid-run" without racing
the job's speed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    env_vars = {name: os.environ[name] for name in ("PF_FAULT_MARKER", "PF_FAULT_RELEASE")}
    ray.init(
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "tests.pipeline.fault_hooks.install",
            "env_vars": {"PF_FAULT": "pause", "PYTHONPATH": str(REPO), **env_vars},
        },
    )
    from jobs.segment import main as segment

    return segment(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
