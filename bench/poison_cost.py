"""What poison isolation's in-flight bookkeeping (`pipeline.segmenting.poison`) costs, side by side in one process.

1. **Per image**: from a Ray actor (where the block call runs), the calling thread's CPU time for what a shard
   call does with its rows (announced a chunk ahead, ``done`` per model batch, sent along), over
   ``--calls-images`` rows: the serial work the model thread pays. Its wall time here, with no work between
   chunks, is round trips (in a job a chunk's answer arrives while the chunk before it is handled); beside it,
   the same announcements each waited for.
2. **In a job**: the job on the GPU-like stand-in model (`bench/stand_in_model.py`: sleeps ``--stand-in-ms`` per
   image with the GIL released) with the recorder and without it (``pipeline.run.start_flight_recorder``
   patched to give None), alternating, ``--rounds`` times each; the rate is measured *inside* each run, between
   the first and the last part's arrival at the driver (no fixed costs in it).

    .venv/bin/python -m bench.poison_cost --images 960 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
TREE = BENCH_DIR.parent


def per_call(images: int, batch_size: int) -> dict[str, float]:
    """The caller's time per image for what a block call does (`pipeline.segmenting.block_call._announced` over its
    rows, then
    ``done`` per model batch), from an actor, against the run's recorder; and the old blocking pattern."""
    import ray

    from pipeline.segmenting.poison import ANNOUNCE_CHUNK, start_flight_recorder

    @ray.remote(num_cpus=0)
    class Caller:
        def run(self, recorder: object, images: int, batch_size: int) -> dict[str, float]:
            from pipeline.inputs.readers import ImageRow
            from pipeline.segmenting.block_call import _announced
            from pipeline.segmenting.poison import Flight

            uris = [f"s3://bucket/prefix/{i:09d}.jpg" for i in range(images)]
            rows = [ImageRow(uri, uri, None, 1, "v", b"", "", False) for uri in uris]
            flight = Flight(recorder, "bench-shard")
            flight.begin()
            started, cpu = time.perf_counter(), time.thread_time()
            batch: list[str] = []
            for row in _announced(iter(rows), flight):
                batch.append(row.image_id)
                if len(batch) == batch_size:
                    flight.done(batch)
                    batch = []
            flight.flush()
            shard_call_s, shard_call_cpu_s = time.perf_counter() - started, time.thread_time() - cpu
            flight.finish()
            flight = Flight(recorder, "bench-blocking")
            flight.begin()
            started = time.perf_counter()
            for start in range(0, images, ANNOUNCE_CHUNK):
                flight.announce([r.image_id for r in rows[start : start + ANNOUNCE_CHUNK]])  # waited for
            blocking_s = time.perf_counter() - started
            flight.begin()  # waits for everything sent before it (one caller's calls run in order)
            return {
                "cpu_ms_per_image": shard_call_cpu_s / images * 1e3,  # the calling thread's own work
                "wall_ms_per_image": shard_call_s / images * 1e3,  # with no work between chunks: round trips
                "blocking_announce_ms_per_image": blocking_s / images * 1e3,
            }

    recorder = start_flight_recorder()
    result = ray.get(Caller.remote().run.remote(recorder, images, batch_size))
    result.update(chunk=ANNOUNCE_CHUNK, batch_size=batch_size, images=images)
    return result


def job_rate(folder: Path, *, recorder: bool, batch_size: int, rows_per_file: int) -> dict[str, float]:
    """One job on ``folder``: images/s between the first and the last part's arrival."""
    import pipeline.run as run
    from model.config import InferenceConfig
    from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig

    arrivals: list[tuple[float, int]] = []

    def on_part(row: dict) -> None:
        arrivals.append((time.perf_counter(), row["images_ok"] + row["images_error"]))

    original = run.start_flight_recorder
    if not recorder:
        run.start_flight_recorder = lambda: None  # type: ignore[assignment]
    try:
        config = JobConfig(
            input=InputConfig((str(folder),)),
            output=tempfile.mkdtemp(prefix="pfb-poison-out-"),
            model=ModelSpec(weights="synthetic"),
            inference=InferenceConfig(),
            resources=ResourceConfig(batch_size=batch_size, device="cpu", rows_per_file=rows_per_file),
        )
        started = time.perf_counter()
        summary = run.run_job(config, allow_synthetic=True, show_progress=False, on_part=on_part)
        whole = time.perf_counter() - started
    finally:
        run.start_flight_recorder = original  # type: ignore[assignment]
    steady_images = sum(n for _, n in arrivals[1:])
    steady_s = arrivals[-1][0] - arrivals[0][0]
    return {"steady_images_per_s": steady_images / steady_s, "parts": len(arrivals), "whole_s": whole,
            "images_ok": summary.images_ok}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls-images", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-file", type=int, default=64)
    parser.add_argument("--stand-in-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import ray

    from bench.inputs import write_photo_set
    from bench.machine import describe

    folder = Path(tempfile.mkdtemp(prefix="pfb-poison-in-"))
    write_photo_set(folder, args.images)
    env = {"PYTHONPATH": f"{TREE}:{BENCH_DIR}", "PFB_STAND_IN_MS": str(args.stand_in_ms)}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="pfb-", dir="/tmp"),
             runtime_env={"env_vars": env, "worker_process_setup_hook": "stand_in_model.install"})  # fmt: skip
    try:
        report: dict = {"machine": describe(), "args": vars(args) | {"out": str(args.out)}}
        report["per_call"] = per_call(args.calls_images, args.batch_size)
        rounds: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.rounds):
            for side in ("with", "without"):
                rate = job_rate(folder, recorder=side == "with", batch_size=args.batch_size,
                                rows_per_file=args.rows_per_file)  # fmt: skip
                assert rate["images_ok"] == args.images, rate
                rounds[side].append(rate["steady_images_per_s"])
        report["job"] = rounds
        ratios = [w / o for w, o in zip(rounds["with"], rounds["without"])]
        report["with_over_without"] = {"median": statistics.median(ratios), "all": ratios}
    finally:
        ray.shutdown()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
