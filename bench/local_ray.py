"""A local Ray owned by one bench process: own short temp dir, shut down by its own handle.

Never ``ray stop`` (it would kill every Ray on the host, other people's included); the context returned by
``ray.init`` shuts down exactly the processes this driver started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

NUM_CPUS = 4  # logical CPUs, as the pipeline's own local start: some Ray Data operators stall with fewer
BENCH_DIR_ENV = "PFB_BENCH_DIR"  # set for the workers: a folder of this Ray's own where bench code may report


@contextmanager
def local_ray(num_cpus: int = NUM_CPUS) -> Iterator[dict[str, float]]:
    """Start a local Ray for the block; yields {"ray_init_s": seconds ``ray.init`` took}.

    Workers inherit ``$PFB_BENCH_DIR`` (= this Ray's temp dir), where bench code running in them may write.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; the bench starts its own local Ray")
    temp_dir = tempfile.mkdtemp(prefix="pfb-", dir="/tmp")  # short: Ray's socket paths have a length limit
    previous = os.environ.get(BENCH_DIR_ENV)
    os.environ[BENCH_DIR_ENV] = temp_dir  # before ray.init: the raylet and its workers inherit it
    start = time.perf_counter()
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    info = {"ray_init_s": time.perf_counter() - start}
    try:
        yield info
    finally:
        context.disconnect()  # = ray.shutdown() of this driver's own processes
        shutil.rmtree(temp_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(BENCH_DIR_ENV, None)
        else:
            os.environ[BENCH_DIR_ENV] = previous
