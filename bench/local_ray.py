"""A local Ray owned by one bench process: own short temp dir, shut down by its own handle.

Never ``ray stop`` (it would kill every Ray on the host, other people's included); the context returned by
``ray.init`` shuts down exactly the processes this driver started.

With ``stand_in_ms`` every worker runs the stand-in model (`bench/stand_in_model.py`, installed by a
``worker_process_setup_hook``, ``bench/`` on the workers' ``PYTHONPATH`` after this tree) at that many ms per image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NUM_CPUS = 4  # logical CPUs, as the pipeline's own local start: some Ray Data operators stall with fewer
BENCH_DIR_ENV = "PFB_BENCH_DIR"  # set for the workers: a folder of this Ray's own where bench code may report
BENCH_DIR = Path(__file__).resolve().parent


@contextmanager
def local_ray(num_cpus: int = NUM_CPUS, *, stand_in_ms: float | None = None) -> Iterator[dict[str, float]]:
    """Start a local Ray for the block; yields {"ray_init_s": seconds ``ray.init`` took}.

    Workers inherit ``$PFB_BENCH_DIR`` (= this Ray's temp dir), where bench code running in them may write; with
    ``stand_in_ms``, every worker's `pipeline.segmenting.predict.PanopticSegmenter` is the stand-in at that rate.
    """
    import ray

    from bench.stand_in_model import MS_PER_IMAGE_ENV

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; the bench starts its own local Ray")
    temp_dir = tempfile.mkdtemp(prefix="pfb-", dir="/tmp")  # short: Ray's socket paths have a length limit
    previous = os.environ.get(BENCH_DIR_ENV)
    os.environ[BENCH_DIR_ENV] = temp_dir  # before ray.init: the raylet and its workers inherit it
    runtime_env = None
    if stand_in_ms is not None:
        env = {"PYTHONPATH": f"{BENCH_DIR.parent}:{BENCH_DIR}", MS_PER_IMAGE_ENV: str(stand_in_ms)}
        runtime_env = {"env_vars": env, "worker_process_setup_hook": "stand_in_model.install"}
    start = time.perf_counter()
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        runtime_env=runtime_env,
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
