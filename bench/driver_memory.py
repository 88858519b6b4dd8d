"""What grows in the driver during a job: Python heap (tracemalloc), Arrow's pool, and the process RSS.

    python -m bench.driver_memory [--images 2000]

Runs `pipeline.run.run_job` on N tiny JPEGs (as `bench.scaling`) and takes two snapshots when a quarter and
nearly all of the results have reached the driver's writer; prints the RSS growth between them, the Python
heap growth (tracemalloc, the top allocation sites) and Arrow's allocated bytes. RSS growth without Python or
Arrow growth is native memory of the process (Ray's core worker, allocator retention).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pyarrow as pa

import pipeline.run
from bench.inputs import write_tiny_set
from bench.local_ray import local_ray
from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.write import OutputWriter


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(images: int) -> dict:
    marks = (images // 4, images - 50)
    snapshots: dict[int, tuple[tracemalloc.Snapshot, float, int]] = {}

    class SnapshottingWriter(OutputWriter):
        seen = 0

        def add(self, results: pa.Table) -> None:
            SnapshottingWriter.seen += results.num_rows
            for mark in marks:
                if mark not in snapshots and SnapshottingWriter.seen >= mark:
                    snapshots[mark] = (tracemalloc.take_snapshot(), _rss_mib(), pa.total_allocated_bytes())
            super().add(results)

    with tempfile.TemporaryDirectory(prefix="pfb-in-") as tmp, tempfile.TemporaryDirectory(prefix="pfb-out-") as out:
        write_tiny_set(Path(tmp), images, size=32)
        config = JobConfig(
            input=InputConfig((tmp,)),
            output=out,
            model=ModelSpec(weights="synthetic"),
            inference=InferenceConfig(min_size=32),
            resources=ResourceConfig(batch_size=8, device="cpu", rows_per_file=256),
        )
        with local_ray():
            tracemalloc.start(8)
            pipeline.run.OutputWriter = SnapshottingWriter  # type: ignore[misc]
            try:
                pipeline.run.run_job(config, show_progress=False)
            finally:
                pipeline.run.OutputWriter = OutputWriter  # type: ignore[misc]
                tracemalloc.stop()
    (first, rss_first, arrow_first), (last, rss_last, arrow_last) = (snapshots[m] for m in marks)
    top = last.compare_to(first, "lineno")
    return {
        "images_between": marks[1] - marks[0],
        "rss_growth_mib": rss_last - rss_first,
        "python_heap_growth_mib": sum(s.size_diff for s in top) / 2**20,
        "arrow_allocated_bytes": [arrow_first, arrow_last],
        "top_python_sites": [f"{s.size_diff / 2**10:+.0f} KiB {s.traceback}" for s in top[:5]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args(argv)
    result = run(args.images)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
