"""How the driver's memory moves during one job, sampled as results arrive.

    python -m bench.driver_memory [--images 8000] [--samples 8] [--compare-uncapped] [--cap 2048]
                                [--out FILE.json]

Runs `pipeline.run.run_job` on N tiny JPEGs (as `bench.scaling`) and samples, each time another N/samples
results have reached the driver's writer: the process's anonymous resident memory (``RssAnon``, its own heap;
``RssShmem`` is Ray's object store mapped in), glibc's heap (bytes in use and bytes freed but kept), Python's
allocated blocks and gc-tracked objects, and the `BlockStats` objects alive (Ray Data keeps one per output
block and operator, `_retained_block_stats`).
The slope between the second sample and the last is the growth per image once the pipeline is full.

Nothing here uses tracemalloc: its snapshots are themselves large Python objects, and holding one while
sampling RSS makes the RSS grow by the snapshot's size (an earlier version of this script read ~16 KB per
image of "native growth" that was its own first snapshot).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from ray.data import DataContext

import pipeline.block_stats
import pipeline.run
from bench.inputs import write_tiny_set
from bench.local_ray import local_ray
from bench.machine import contention
from model.predictor import InferenceConfig
from pipeline.block_stats import install
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig


class _MallInfo2(ctypes.Structure):
    _FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS.split()]


def _glibc_heap() -> tuple[float, float]:
    """(MiB in use, MiB freed but kept) of glibc's malloc, all arenas; (nan, nan) without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return float("nan"), float("nan")
    info = libc.mallinfo2()
    return info.uordblks / 2**20, info.fordblks / 2**20


def _status_mib(*fields: str) -> dict[str, float]:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {name: int(status[name].split()[0]) / 1024 for name in fields}


def _retained_block_stats() -> int:
    """BlockStats objects alive in this process: Ray Data keeps one per output block of every operator
    until the dataset's execution ends (`MapOperator._output_blocks_stats`)."""
    from ray.data.block import BlockStats

    return sum(1 for obj in gc.get_objects() if type(obj) is BlockStats)


def sample(images_seen: int) -> dict:
    in_use, kept = _glibc_heap()
    return {
        "images": images_seen,
        **_status_mib("RssAnon", "RssShmem"),
        "glibc_in_use_mib": in_use,
        "glibc_free_kept_mib": kept,
        "python_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
        "block_stats": _retained_block_stats(),
        "arrow_allocated_mib": pa.total_allocated_bytes() / 2**20,
    }


def run(images: int, *, samples: int, cap_block_stats: bool = True) -> dict:
    """One job over ``images`` tiny JPEGs, sampled ``samples`` times; ``cap_block_stats=False`` runs it without
    `pipeline.block_stats` (as before it existed) for the comparison."""
    marks = [images * k // samples for k in range(1, samples)] + [images - 20]
    rows: list[dict] = []

    seen = [0]

    def on_part(part: dict) -> None:  # `run_job` calls it for each committed part's row
        before = seen[0]
        seen[0] += part["images_ok"] + part["images_error"]
        if any(before < mark <= seen[0] for mark in marks):
            rows.append(sample(seen[0]))

    with tempfile.TemporaryDirectory(prefix="pfb-in-") as tmp, tempfile.TemporaryDirectory(prefix="pfb-out-") as out:
        write_tiny_set(Path(tmp), images, size=32)
        config = JobConfig(
            input=InputConfig((tmp,)),
            output=out,
            model=ModelSpec(weights="synthetic"),
            inference=InferenceConfig(min_size=32),
            resources=ResourceConfig(batch_size=8, device="cpu", rows_per_file=256),
        )
        context = DataContext.get_current()
        context.custom_execution_callback_classes = []
        with local_ray():
            if not cap_block_stats:
                pipeline.block_stats.install = lambda context: None  # type: ignore[assignment]
            started = time.perf_counter()
            try:
                pipeline.run.run_job(config, show_progress=False, on_part=on_part)
            finally:
                pipeline.block_stats.install = install  # type: ignore[assignment]
                context.custom_execution_callback_classes = []
            seconds = time.perf_counter() - started
            load = contention()
    first, last = rows[1], rows[-1]
    span = last["images"] - first["images"]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "images": images,
        "cap_block_stats": cap_block_stats,
        "cap": pipeline.block_stats.CAP,
        "seconds": seconds,
        "load": load,
        "samples": rows,
        "per_image_from_second_sample": {
            "RssAnon_bytes": (last["RssAnon"] - first["RssAnon"]) * 2**20 / span,
            "glibc_heap_bytes": (
                (last["glibc_in_use_mib"] + last["glibc_free_kept_mib"])
                - (first["glibc_in_use_mib"] + first["glibc_free_kept_mib"])
            )
            * 2**20
            / span,
            "python_blocks": (last["python_blocks"] - first["python_blocks"]) / span,
            "block_stats": (last["block_stats"] - first["block_stats"]) / span,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument(
        "--compare-uncapped",
        action="store_true",
        help="then run the same job again without pipeline.block_stats, in this process (the capped run goes "
        "first: the uncapped one starts on a heap already grown, which can only flatter it)",
    )
    parser.add_argument(
        "--cap",
        type=int,
        default=pipeline.block_stats.CAP,
        help="entries per operator at which pipeline.block_stats trims (half are kept); lower it to see the cap "
        "act within a short run",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the result(s) as JSON here")
    args = parser.parse_args(argv)
    pipeline.block_stats.CAP, pipeline.block_stats.KEEP = args.cap, args.cap // 2
    results = [run(args.images, samples=args.samples)]
    if args.compare_uncapped:
        results.append(run(args.images, samples=args.samples, cap_block_stats=False))
    for result in results:
        print(f"cap_block_stats={result['cap_block_stats']}: {result['seconds']:.0f} s, load {result['load']}")
        print(
            f"{'images':>8} {'RssAnon':>9} {'RssShmem':>9} {'glibc use':>10} {'glibc kept':>10} {'py blocks':>10} "
            f"{'gc objs':>9} {'BlockStats':>10}"
        )
        for row in result["samples"]:
            print(
                f"{row['images']:>8} {row['RssAnon']:>9.1f} {row['RssShmem']:>9.1f} {row['glibc_in_use_mib']:>10.1f} "
                f"{row['glibc_free_kept_mib']:>10.1f} {row['python_blocks']:>10} {row['gc_objects']:>9} "
                f"{row['block_stats']:>10}"
            )
        print("per image, second sample to last:", json.dumps(result["per_image_from_second_sample"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
