"""``python -m tests.pipeline.fault_job ARGS``: `jobs.segment` with ARGS, joined to ``RAY_ADDRESS``, whose workers
install the fault ``PF_FAULT`` (`tests.pipeline.fault_hooks`; strikes logged to ``PF_FAULT_MARKER``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    names = ("PF_FAULT", "PF_FAULT_MARKER", "PF_FAULT_RELEASE")
    env_vars = {name: os.environ[name] for name in names if name in os.environ}
    ray.init(
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "tests.pipeline.fault_hooks.install",
            "env_vars": {"PYTHONPATH": str(REPO), **env_vars},
        },
    )
    from jobs.segment import main as segment

    return segment(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
