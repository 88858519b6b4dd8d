"""The write path, side by side: the driver writing every part (as before) vs write tasks on the workers.

Both commit the same result rows (`RESULT_SCHEMA`, made once and materialised in the object store before the
clock starts, so that neither side pays for producing them) to a local folder in parts of ``--rows-per-file``
images, with the same file code (`pipeline.write.split_results`, `parquet_bytes`, `pipeline.storage.publish`).

- ``driver``: the driver pulls every result block (`iter_batches`) and writes the parts itself, as
  `pipeline.write.OutputWriter` did before the write stage existed (its buffering is kept here, in the
  benchmark only).
- ``workers``: `pipeline.run`'s write stage (`repartition(rows_per_file, strict)` + `write_stage`); the driver
  receives one `PART_ROW_SCHEMA` row per part.
- ``executor``: the same plan with a stage that writes nothing: what Ray Data's executor alone costs the
  driver for these blocks (the floor of the ``workers`` figure).

Reported per mode: wall time, driver CPU seconds per 1,000 images (user + system of the driver process,
`resource.getrusage`), result bytes the driver received. Then write-stage throughput with at most 1, 2 and 4
write tasks at once (a fresh local Ray each, with 4 logical CPUs at least). Results are synthetic rows
shaped like 800×1066 photos with 25 segments (real RLE strings of a real id map). One JSON line goes to
stdout (and ``--out``)::

    python -m bench.write_path --images 8192 --rows-per-file 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa

from bench.local_ray import local_ray
from bench.machine import describe
from pipeline.rle import encode_segments
from pipeline.schema import RESULT_SCHEMA, SEGMENT_STRUCT
from pipeline.storage import publish
from pipeline.write import parquet_bytes, part_counts, part_name, split_results

if TYPE_CHECKING:
    import ray.data

HEIGHT, WIDTH, SEGMENTS = 800, 1066, 25
DISTINCT_PHOTOS = 256  # images cycle through this many different segmentations (~14 MB of RLE: beyond zstd's
# window, so parts compress like real ones)


def _segments_of_a_photo(seed: int = 0) -> list[dict]:
    """25 segments of an 800×1066 id map of blobs: real RLE strings of a realistic length."""
    rng = np.random.default_rng(seed)
    cell = int(rng.integers(30, 50))
    small = rng.integers(0, SEGMENTS, size=(HEIGHT // cell + 1, WIDTH // cell + 1))
    id_map = np.kron(small, np.ones((cell, cell), dtype=np.int64))[:HEIGHT, :WIDTH].astype(np.uint8)
    shifts = rng.integers(-4, 5, size=WIDTH)  # ragged boundaries, as real masks have: runs of varied lengths
    id_map = id_map[(np.arange(HEIGHT)[:, None] + shifts[None, :]) % HEIGHT, np.arange(WIDTH)[None, :]]
    encoded = encode_segments(id_map, list(range(SEGMENTS)))
    return [
        {"segment_id": i, "category_id": 1 + i, "category": f"class_{1 + i}", "isthing": i < 15, "score": 0.9,
         "area": e.area, "bbox": list(e.bbox), "rle": {"size": [HEIGHT, WIDTH], "counts": e.counts}}
        for i, e in enumerate(encoded)
    ]  # fmt: skip


def result_block(start: int, n: int, photos: list[list[dict]]) -> pa.Table:
    """``n`` `RESULT_SCHEMA` rows (images ``start``..), image ``i`` with the segments of ``photos[i % len]``."""
    ids = [f"s3://bench/images/{i:09d}.jpg" for i in range(start, start + n)]
    segments = photos[0]
    values = pa.array([s for i in range(start, start + n) for s in photos[i % len(photos)]], SEGMENT_STRUCT)
    offsets = pa.array(np.arange(0, (n + 1) * len(segments), len(segments), dtype=np.int32))
    return pa.table(
        {
            "image_id": ids,
            "source": ids,
            "member": pa.nulls(n, pa.string()),
            "input_size": pa.array([150_000] * n, pa.int64()),
            "input_version": ["etag"] * n,
            "width": pa.array([WIDTH] * n, pa.int32()),
            "height": pa.array([HEIGHT] * n, pa.int32()),
            "error": pa.nulls(n, pa.string()),
            "retryable": [False] * n,
            "status": ["ok"] * n,
            "segments": pa.ListArray.from_arrays(offsets, values),
        },
        schema=RESULT_SCHEMA,
    )


class DriverWriter:
    """What the driver did before the write stage: buffer result blocks, write a part per ``rows_per_file``."""

    def __init__(self, output: Path, rows_per_file: int) -> None:
        self.output, self.rows_per_file = output, rows_per_file
        self.buffer: list[pa.Table] = []
        self.rows = 0

    def add(self, block: pa.Table) -> None:
        self.buffer.append(block)
        self.rows += block.num_rows
        if self.rows >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        images, segments = split_results(pa.concat_tables(self.buffer), run_id="bench")
        self.buffer, self.rows = [], 0
        name = part_name(images.column("image_id").to_pylist())
        fs = _local_fs()
        publish(fs, str(self.output / "segments" / name), parquet_bytes(segments))
        publish(fs, str(self.output / "images" / name), parquet_bytes(images, counts=part_counts(images)))


def _no_write(batch: pa.Table, **kwargs: object) -> pa.Table:
    """The ``executor`` mode's stage: the workers plan without its writes (one part row, no file)."""
    from pipeline.write import PART_ROW_SCHEMA

    row = {"part": "none", "images_ok": batch.num_rows, "images_error": 0, "images_retryable": 0, "segments": 0,
           "bytes": 0, "node_id": "", "seconds": 0.0}  # fmt: skip
    return pa.Table.from_pylist([row], schema=PART_ROW_SCHEMA)


def _local_fs() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _dataset(images: int, block_rows: int) -> ray.data.Dataset:
    import ray

    photos = [_segments_of_a_photo(seed) for seed in range(DISTINCT_PHOTOS)]
    blocks = [result_block(s, min(block_rows, images - s), photos) for s in range(0, images, block_rows)]
    return ray.data.from_arrow_refs([ray.put(b) for b in blocks]).materialize()  # in the object store, not the driver


def run_mode(mode: str, *, images: int, rows_per_file: int, block_rows: int, root: Path, tasks: int | None) -> dict:
    """One mode on the current Ray: wall seconds, driver CPU, bytes the driver received. ``tasks``: at most
    that many write tasks at once (the worker CPUs given to the write stage)."""
    from pipeline.lease import Lease
    from pipeline.write import write_stage

    dataset = _dataset(images, block_rows)
    output = root / mode
    lease = Lease.acquire(str(output), "bench")
    received, cpu, start = 0, _cpu_seconds(), time.perf_counter()
    task_seconds = 0.0  # workers: the write tasks' own seconds (split, compress, publish), from their part rows
    if mode == "driver":
        writer = DriverWriter(output, rows_per_file)
        for block in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            received += block.nbytes
            writer.add(block)
        writer.flush()
    else:
        stage = write_stage if mode == "workers" else _no_write
        parts = dataset.repartition(target_num_rows_per_block=rows_per_file, strict=True).map_batches(
            stage,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=1,
            concurrency=tasks,
            fn_kwargs={"output": str(output), "run_id": "bench", "run_record": "{}"},
        )
        for rows in parts.iter_batches(batch_format="pyarrow", batch_size=None):
            received += rows.nbytes
            task_seconds += sum(rows.column("seconds").to_pylist())
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    lease.release()
    written = sum(p.stat().st_size for p in output.glob("*/part-*.parquet"))
    committed = sum(1 for _ in (output / "images").glob("part-*.parquet"))
    return {"mode": mode, "images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds),
            "driver_cpu_s_per_1000_images": round(1000 * cpu / images, 3), "driver_bytes_received": received,
            "parts": committed, "bytes_written": written,
            "images_per_write_task_s": round(images / task_seconds) if task_seconds else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--rows-per-file", type=int, default=2048)
    parser.add_argument("--block-rows", type=int, default=8, help="rows per result block (the RLE stage's output)")
    parser.add_argument("--cpus", type=int, nargs="*", default=[1, 2, 4], help="write tasks at once, scaling runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", choices=["driver", "workers", "executor"], help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--tasks", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pfb-write-"))
    try:
        if args.one:  # one mode in this process, on its own Ray
            # 4 logical CPUs at least (some Ray Data operators stall with fewer); --tasks caps the write stage
            with local_ray(num_cpus=max(4, os.cpu_count() or 1)) as info:
                report = run_mode(args.one, images=args.images, rows_per_file=args.rows_per_file,
                                  block_rows=args.block_rows, root=root, tasks=args.tasks)  # fmt: skip
            print(json.dumps({**report, "write_tasks": args.tasks, **info}), flush=True)
            return 0
        import subprocess

        def child(mode: str, tasks: int | None) -> dict:
            command = [sys.executable, "-m", "bench.write_path", "--one", mode,
                       *(["--tasks", str(tasks)] if tasks else []),
                       "--images", str(args.images), "--rows-per-file", str(args.rows_per_file),
                       "--block-rows", str(args.block_rows)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

        side_by_side = [child("driver", None), child("workers", None), child("executor", None)]
        scaling = [child("workers", cpus) for cpus in args.cpus]
        report = {"machine": describe(), "side_by_side": side_by_side, "scaling": scaling,
                  "rows_per_file": args.rows_per_file, "block_rows": args.block_rows}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
