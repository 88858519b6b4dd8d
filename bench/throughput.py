"""Images per second: the bare model loop vs the whole Ray job on the same files, start-up apart.

Bare: `PanopticPredictor.predict_prepared` on images already decoded and resized (`pipeline.inputs.decode`), in
batches of 1 and of 4 (``exact`` mode; every bench image has the same size, so a batch runs as one
forward). Passes over all images are timed interleaved (shuffled order each repeat), median pass kept.

Job: `pipeline.run.run_job` on the folder of the same files (synthetic weights, device cpu, one actor), on
a local Ray the caller started. The writer is wrapped to timestamp each result block reaching the driver
(blocks of 16 images: the pipeline's read partition). Start-up = job start -> first result block (listing,
planning, actor start incl. its model construction, and the compute of the first block(s)). Steady state =
images per second between result blocks, which is the number to hold against the bare loop; the driver's
``iter_batches`` prefetches one block, so the last two blocks arrive together and the last one is left out
of the window. Fixed overhead = whole job - N / steady rate: what a job pays once, whatever its size. The
ratio job/bare uses the bare loop at the job's batch size. Needs >= 3 result blocks (48 images).

Ray gives an actor that reserves ``num_cpus = n`` ``OMP_NUM_THREADS = n``, and torch runs that many threads;
on CPU the pipeline sizes the actor itself (`pipeline.segmenting.resources.cpu_actor_cpus`). The segmenter is
subclassed here only to report the thread count it actually got, so the job is compared with the bare loop at the same
batch size and thread count.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import pipeline.run
from bench.local_ray import BENCH_DIR_ENV
from model.predictor import InferenceConfig, PanopticPredictor, PreparedImage
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.inputs.decode import decode_image
from pipeline.inputs.storage import read_bytes
from pipeline.schema import SYNTHETIC_WEIGHTS
from pipeline.segmenting.block_call import BlockSegmenter

_ARRIVALS: list[tuple[float, int]] = []  # (perf_counter, images) of each committed part reaching the driver


class _ThreadReportingSegmenter(BlockSegmenter):
    """`BlockSegmenter` (the job's actor) that reports its torch threads (and OMP_NUM_THREADS) in $PFB_BENCH_DIR."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        directory = os.environ.get(BENCH_DIR_ENV)
        if directory:
            record = {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
            Path(directory, f"actor-threads-{os.getpid()}.json").write_text(json.dumps(record))


def _actor_reports() -> list[dict]:
    directory = os.environ.get(BENCH_DIR_ENV)
    if not directory:
        return []
    reports = []
    for path in sorted(Path(directory).glob("actor-threads-*.json")):
        reports.append(json.loads(path.read_text()))
        path.unlink()
    return reports


def _timestamp(part: dict) -> None:
    """`run_job`'s ``on_part``: when each committed part's row reached the driver, and its images."""
    _ARRIVALS.append((time.perf_counter(), part["images_ok"] + part["images_error"]))


def prepare_files(paths: list[Path], predictor: PanopticPredictor) -> list[PreparedImage]:
    """Read and decode + resize each file as the pipeline does -> the model's prepared inputs."""
    prepared = []
    for path in paths:
        pixels, width, height = decode_image(
            read_bytes(str(path)), max_pixels=InputConfig.max_pixels, inference=predictor.config
        )
        prepared.append(PreparedImage(pixels, (height, width)))
    return prepared


def bare_model(
    predictor: PanopticPredictor,
    images: list[PreparedImage],
    *,
    configs: tuple[tuple[int, int], ...],
    repeats: int,
    seed: int = 0,
) -> dict:
    """Median images/s of the bare loop per (batch size, torch threads), first (cold) batch times, kept queries.

    Passes of the configurations are interleaved, in a shuffled order each repeat; torch's thread count is
    restored afterwards.
    """
    kept: list[int] = []
    hook = predictor.model.register_forward_hook(lambda _m, _a, out: kept.extend(out.keep.sum(1).tolist()))
    threads_before = torch.get_num_threads()
    first: dict[tuple[int, int], float] = {}
    times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    try:
        for b, threads in configs:  # warm-up; the very first call is the cold start
            torch.set_num_threads(threads)
            start = time.perf_counter()
            predictor.predict_prepared(images[:b])
            first[(b, threads)] = time.perf_counter() - start
        kept.clear()
        order = list(configs)
        rng = random.Random(seed)
        for _ in range(repeats):
            rng.shuffle(order)
            for b, threads in order:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                results = _in_batches(predictor, images, b)
                times[(b, threads)].append(time.perf_counter() - start)
    finally:
        hook.remove()
        torch.set_num_threads(threads_before)
    n = len(images)
    kept_per_image = kept[:n]  # same per image in every pass (exact mode: batch companions do not matter)
    segments = [len(r.segments) for r in results]
    return {
        "images": n,
        "processed_size": list(images[0].pixels.shape[:2]),
        "kept_queries_per_image": statistics.mean(kept_per_image),
        "kept_queries_min_max": [min(kept_per_image), max(kept_per_image)],
        "kept_queries": kept_per_image,
        "segments_per_image": statistics.mean(segments),
        "segments_total": sum(segments),
        "runs": [
            {
                "batch": b,
                "torch_threads": threads,
                "first_batch_s": first[(b, threads)],
                "pass_s": t,
                "median_pass_s": statistics.median(t),
                "images_per_s": n / statistics.median(t),
                "best_images_per_s": n / min(t),  # least disturbed pass, for shared machines
            }
            for (b, threads), t in times.items()
        ],
    }


def merge_bare(parts: list[dict]) -> dict:
    """One `bare_model` result from several rounds of it: pass times pooled, first-batch times of the first."""
    n = parts[0]["images"]
    runs = []
    for i, run in enumerate(parts[0]["runs"]):
        times = [t for part in parts for t in part["runs"][i]["pass_s"]]
        median = statistics.median(times)
        runs.append(
            {
                **run,
                "pass_s": times,
                "median_pass_s": median,
                "images_per_s": n / median,
                "best_images_per_s": n / min(times),
            }
        )
    return {**parts[0], "runs": runs}


def _in_batches(predictor: PanopticPredictor, images: list[PreparedImage], b: int) -> list:
    results = []
    for i in range(0, len(images), b):
        results.extend(predictor.predict_prepared(images[i : i + b]))
    return results


def job(
    folder: Path,
    *,
    min_size: int | None,
    batch_size: int,
    rows_per_file: int = 2048,
    actors: int = 1,
    cpus_per_actor: float | None = None,
) -> dict:
    """Run `pipeline.run.run_job` once on ``folder`` (Ray must be up) and time its committed parts (the driver
    sees one row per part: give ``rows_per_file`` small enough for several parts). ``min_size`` None: the
    default inference sizes; ``actors`` model actors from the start (min = max), each reserving
    ``cpus_per_actor`` (None: the pipeline's own choice)."""
    with tempfile.TemporaryDirectory(prefix="pfb-out-") as out:
        config = JobConfig(
            input=InputConfig((str(folder),)),
            output=out,
            model=ModelSpec(weights=SYNTHETIC_WEIGHTS),
            inference=InferenceConfig() if min_size is None else InferenceConfig(min_size=min_size),
            resources=ResourceConfig(
                batch_size=batch_size,
                device="cpu",
                rows_per_file=rows_per_file,
                min_actors=actors,
                max_actors=actors,
                cpus_per_actor=cpus_per_actor,
            ),
        )
        _ARRIVALS.clear()
        _actor_reports()  # clear
        start = time.perf_counter()
        with mock.patch.object(pipeline.run, "BlockSegmenter", _ThreadReportingSegmenter):
            summary = pipeline.run.run_job(config, show_progress=False, on_part=_timestamp)
        end = time.perf_counter()
        actors = _actor_reports()
    arrivals = list(_ARRIVALS)
    images = sum(rows for _, rows in arrivals)
    t_first, t_last = arrivals[0][0], arrivals[-1][0]
    # The last two parts tend to arrive together (the driver's iterator prefetches one): the window runs from
    # the first to the second-to-last arrival and counts the parts in between (equal-sized parts).
    window = arrivals[:-1]
    steady_images = sum(rows for _, rows in window[1:])
    steady_s = window[-1][0] - window[0][0] if len(window) >= 2 else 0.0
    steady_ips = steady_images / steady_s if steady_s > 0 else None
    return {
        "images": images,
        "images_ok": summary.images_ok,
        "images_error": summary.images_error,
        "segments_total": summary.segments,
        "stages": summary.stages,  # the run's stage seconds, shares and verdict (`pipeline.bottleneck`)
        "batch_size": batch_size,
        "result_batches": len(arrivals),
        "actors": actors,  # one record per segmenter actor: its torch threads and OMP_NUM_THREADS
        "actor_torch_threads": actors[0]["torch_threads"] if actors else None,
        "total_s": end - start,
        "startup_s": t_first - start,
        "steady_images": steady_images,
        "steady_s": steady_s,
        "commit_s": end - t_last,
        # what the job took beyond N images at the steady rate: paid once per job, whatever its size
        "fixed_overhead_s": (end - start) - images / steady_ips if steady_ips else None,
        "steady_images_per_s": steady_ips,
        "arrivals": [[t - start, rows] for t, rows in arrivals],  # (seconds since job start, rows)
        "overall_images_per_s": images / (end - start),
    }
