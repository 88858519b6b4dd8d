"""``python -m tests.pipeline.paused_job ARGS``: `jobs.segment` with ARGS, joined to ``RAY_ADDRESS``, whose workers
hold right after the job's first commit until the file ``PF_FAULT_RELEASE`` exists (`tests.pipeline.fault_hooks`,
``PF_FAULT=pause``; the commit's path goes to ``PF_FAULT_MARKER``). A test can then act "mid-run" without racing
the job's speed.
"""

from __future__ import annotations

import os
import sys

from tests.pipeline import fault_job


def main(argv: list[str]) -> int:
    os.environ["PF_FAULT"] = "pause"
    return fault_job.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
