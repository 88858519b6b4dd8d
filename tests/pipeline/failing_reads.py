"""``python -m tests.pipeline.failing_reads ARGS``: `jobs.segment` with ARGS, joined to ``RAY_ADDRESS``, whose reads
all fail after the first few: a systematic failure (credentials expired mid-run, a bucket policy changed).

`install` is the jobs' ``worker_process_setup_hook`` (nothing in the product): in each worker process,
`pipeline.inputs.readers`' ``read_object`` reads the first ``PF_FAIL_READS_AFTER`` objects and then raises
``PermissionError`` (access denied: a transient storage error, so a retryable error row) for every other one,
each failure logged as one line ``<pid> <uri>`` in ``PF_FAIL_READS_MARKER`` (so that a test sees the fault struck).
Reads are counted per process: run it with one model actor.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENVIRONMENT = ("PF_FAIL_READS_MARKER", "PF_FAIL_READS_AFTER")


def install() -> None:
    marker = os.environ.get("PF_FAIL_READS_MARKER")
    if not marker:
        return
    after = int(os.environ.get("PF_FAIL_READS_AFTER", "0"))
    import pipeline.inputs.readers as readers

    original = readers.read_object
    lock = threading.Lock()  # the block call reads on a pool of threads
    reads = [0]

    def read_object(uri: str, *args: Any, **kwargs: Any) -> Any:
        with lock:
            reads[0] += 1
            fail = reads[0] > after
            if fail:
                with open(marker, "a") as log:
                    log.write(f"{os.getpid()} {uri}\n")
        if fail:
            raise PermissionError(13, "Access Denied (injected by tests.pipeline.failing_reads)", uri)
        return original(uri, *args, **kwargs)

    readers.read_object = read_object  # type: ignore[assignment]


def main(argv: list[str]) -> int:
    import ray

    ray.init(
        log_to_driver=True,  # as the job runs under `ray job submit`: whatever its workers print shows here
        runtime_env={
            "worker_process_setup_hook": "tests.pipeline.failing_reads.install",
            "env_vars": {"PYTHONPATH": str(REPO), **{name: os.environ[name] for name in ENVIRONMENT}},
        },
    )
    from jobs.segment import main as segment

    return segment(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
