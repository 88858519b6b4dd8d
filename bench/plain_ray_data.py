"""The job vs the plain Ray Data script a user would write instead, each at its steady state inside one long run,
on the real model on CPU and on a GPU-like stand-in, side by side in one invocation.

The plain script (`plain_script`, ~20 lines): ``ray.data.read_images`` -> ``map_batches`` with one actor ->
``write_parquet``; the actor runs the model on its batch and RLE-encodes each segment with the job's own
`pipeline.segmenting.rle.encode_segments`, in series, as a user would. The job is `pipeline.run.run_job` of this
checkout (one actor, device cpu, `bench.throughput.job`) with parts of exactly ``--*-rows-per-file`` images.

**Steady state inside one run, the same rule on both sides** (`bench.in_run.in_run_rate`: from the first event at
which ≥ 10 % of the images are done to the last at which ≤ 90 % are): the job's events are its committed parts
reaching the driver, the plain script's are its actor's model batches as it finished them (``(time, images)``
lines appended to a file in this Ray's bench folder). Never a marginal between two runs of different sizes: the
job's fixed cost depends on its size (`pipeline.run.block_refs`). ``--rounds`` rounds, each job then plain
(then the bare loop); each round's ratio and the median.

Regimes (``--regime``, default both):

- ``cpu``: the real model (variant detr-r50-panoptic, synthetic weights, ``--min-size``, ``--batch-size``) on
  ``--cpu-size`` images (`bench.inputs.write_image_set`), the plain actor reserving the job actor's CPUs (its
  torch threads); and the bare model loop (`bench.throughput.bare_model`, ``predict_prepared`` on pre-decoded
  images) at the same batch and threads, in the driver while Ray idles: job / bare.
- ``gpu-like``: the stand-in model (`bench/stand_in_model.py`: sleeps ``--stand-in-ms`` per image with the GIL
  released) on ``--gpu-images`` 800×1066 JPEGs at the default inference size. The job gets it in every Ray
  worker (`bench.local_ray`'s ``stand_in_ms``); the plain actor (`StandInActor`) sleeps the same per image, then
  RLE-encodes `bench.stand_in_model.fixed_result`. Beside it the actor's CPU budget: the CPUs its actor reserves
  × 1000 ÷ the worker's core-ms per image beside the model (read, decode, the actor's own work incl. the
  stand-in's `prediction_table`, RLE, write: `bench.plan_cost.stage_core_ms` in this process without Ray, on the
  first ``--stage-images`` of the same photos; the stand-in's sleep is no CPU), and the job's share of it.

One local Ray per regime (4 logical CPUs, own temp dir); run it under ``flock /tmp/pf-ray-tests.lock`` on the
shared machine. One JSON document to stdout (and ``--out``), a markdown table to stderr (and ``--markdown``)::

    flock /tmp/pf-ray-tests.lock .venv/bin/python -m bench.plain_ray_data --rounds 3 \\
        --out bench/results/plain_ray_data.json --markdown bench/results/plain_ray_data.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

REGIMES = ("cpu", "gpu-like")
PHOTO_HEIGHT, PHOTO_WIDTH = 800, 1066  # the GPU-like regime's photos


# ------------------------------------------------------------------------------------------ the plain script


def _segment_rows(results: list) -> list[str]:
    """Each `PanopticResult` -> its segments with COCO RLE counts, as one JSON string per image."""
    from pipeline.segmenting.rle import encode_segments

    rows = []
    for r in results:
        encoded = encode_segments(r.id_map, [s.id for s in r.segments])
        rows.append(
            json.dumps([{**s._asdict(), "bbox": list(s.bbox), "rle": e.counts} for s, e in zip(r.segments, encoded)])
        )
    return rows


def _record(events: str, images: int) -> None:
    with open(events, "a") as f:
        f.write(f"{time.time():.6f} {images}\n")


class ModelActor:
    """The plain script's actor on CPU: the job's predictor (same variant, weights, `InferenceConfig`)."""

    def __init__(self, *, min_size: int, events: str) -> None:
        import torch

        from model.checkpoint import build_model
        from model.config import InferenceConfig, get_variant
        from model.predictor import PanopticPredictor
        from pipeline.segmenting.predict import load_weights

        model = build_model(get_variant("detr-r50-panoptic").config, load_weights("detr-r50-panoptic", "synthetic"))
        self.predictor = PanopticPredictor(model, InferenceConfig(min_size=min_size), torch.device("cpu"))
        self.events = events

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        results = self.predictor.predict([Image.fromarray(image) for image in batch["image"]])
        out = {"path": batch["path"], "segments": np.array(_segment_rows(results), dtype=object)}
        _record(self.events, len(results))
        return out


class StandInActor:
    """The plain script's actor for a GPU: the model's time slept (GIL released), then the stand-in's results."""

    def __init__(self, *, ms_per_image: float, events: str) -> None:
        self.ms_per_image = ms_per_image
        self.events = events

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from bench.stand_in_model import fixed_result

        time.sleep(self.ms_per_image * len(batch["image"]) / 1000)  # the model on the device
        results = [fixed_result(*image.shape[:2]) for image in batch["image"]]
        out = {"path": batch["path"], "segments": np.array(_segment_rows(results), dtype=object)}
        _record(self.events, len(results))
        return out


def plain_script(folder: str, output: str, *, actor: type, kwargs: dict, batch_size: int, cpus: float) -> int:
    """What a user would write: read_images -> map_batches(actor) -> write_parquet. Returns rows written."""
    import pyarrow.parquet as pq
    import ray

    ds = ray.data.read_images(folder, include_paths=True, mode="RGB")
    ds = ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=batch_size, concurrency=1, num_cpus=cpus)
    ds.write_parquet(output)
    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(output).glob("*.parquet"))


def shard_call_in_process(
    folder: Path, *, images: int, rows_per_file: int, batch_size: int, cpus: float, stand_in_ms: float
) -> dict:
    """The job's block call without Ray, in this process (the stand-in model patched in, its threads as an actor
    reserving ``cpus`` gets), on the same photos in one call; its rate inside the run by the same window rule,
    from its parts' commit times, and the process's CPU use over the call (what the call's threads obtained)."""
    import pyarrow as pa

    from bench import stand_in_model
    from bench.in_run import in_run_rate
    from model.predictor import InferenceConfig
    from pipeline.config import InputConfig, ResourceConfig
    from pipeline.exactly_once.commit import OutputCommitter
    from pipeline.exactly_once.lease import Lease
    from pipeline.inputs.sources import REF_SCHEMA
    from pipeline.segmenting.block_call import BlockSegmenter
    from pipeline.segmenting.predict import PanopticSegmenter

    os.environ[stand_in_model.MS_PER_IMAGE_ENV] = str(stand_in_ms)
    stand_in_model.install()
    uris = sorted(str(p) for p in folder.iterdir())[:images]
    n = len(uris)
    refs = pa.table({"uri": uris, "kind": ["file"] * n, "skip": [[]] * n, "size": [None] * n, "version": [None] * n},
                    schema=REF_SCHEMA)  # fmt: skip
    inference = InferenceConfig()
    model = PanopticSegmenter(variant="detr-r50-panoptic", weights="synthetic", inference=inference, device="cpu",
                              encode_rle=False)  # fmt: skip
    output = tempfile.mkdtemp(prefix="pfb-inproc-")
    call = BlockSegmenter.with_model(
        model,
        inference=inference,
        input=InputConfig(uris=(str(folder),)),
        resources=ResourceConfig(rows_per_file=rows_per_file, batch_size=batch_size),
        cpus=cpus,
        committer=OutputCommitter(output, "in-process"),
    )
    try:
        with Lease.acquire(output, "in-process"):
            cpu, started = time.process_time(), time.perf_counter()
            parts = call(refs).to_pylist()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - started
    finally:
        shutil.rmtree(output, ignore_errors=True)
    events = [(p["committed_at"], p["images_ok"] + p["images_error"]) for p in parts]
    return {**in_run_rate(events), "process_cpus_used": cpu / wall, "wall_s": wall}


def plain_in_run(folder: Path, *, images: int, actor: type, kwargs: dict, batch_size: int, cpus: float) -> dict:
    """One run of `plain_script` (Ray up); its in-run rate from the actor's batch completions."""
    from bench.in_run import in_run_rate
    from bench.local_ray import BENCH_DIR_ENV

    events = Path(os.environ[BENCH_DIR_ENV], f"plain-events-{time.time_ns()}.txt")
    output = Path(tempfile.mkdtemp(prefix="pfb-plain-out-"))
    try:
        started = time.time()
        rows = plain_script(
            str(folder),
            str(output / "out"),
            actor=actor,
            kwargs={**kwargs, "events": str(events)},
            batch_size=batch_size,
            cpus=cpus,
        )
        total = time.time() - started
    finally:
        shutil.rmtree(output, ignore_errors=True)
    if rows != images:
        raise RuntimeError(f"the plain script wrote {rows} of {images} rows")
    done = [(float(t), int(n)) for t, n in (line.split() for line in events.read_text().splitlines())]
    events.unlink()
    return {**in_run_rate(done), "total_s": total, "startup_s": min(t for t, _ in done) - started}


# -------------------------------------------------------------------------------------------------- regimes


def cpu_regime(args: argparse.Namespace, root: Path) -> dict:
    import torch

    from bench.in_run import alternate, job_in_run, ratios
    from bench.inputs import write_image_set
    from bench.local_ray import local_ray
    from bench.throughput import bare_model, prepare_files
    from model.checkpoint import build_model
    from model.config import InferenceConfig, get_variant
    from model.predictor import PanopticPredictor
    from pipeline.segmenting.predict import load_weights

    folder = root / "cpu"
    paths = write_image_set(folder, args.cpu_images, args.cpu_size)
    predictor = PanopticPredictor(
        build_model(get_variant("detr-r50-panoptic").config, load_weights("detr-r50-panoptic", "synthetic")),
        InferenceConfig(min_size=args.min_size),
        torch.device("cpu"),
    )
    prepared = prepare_files(paths[: args.bare_images], predictor)
    with local_ray():
        from pipeline.config import ResourceConfig
        from pipeline.segmenting.resources import actor_layout, cpu_actor_cpus

        threads = int(cpu_actor_cpus(1))  # one CPU actor's reservation (= its torch threads)
        job = partial(job_in_run, folder, images=args.cpu_images, rows_per_file=args.cpu_rows_per_file,
                      min_size=args.min_size, batch_size=args.batch_size, actors=1,
                      cpus_per_actor=float(threads))  # fmt: skip
        # the default CPU layout (`pipeline.segmenting.resources.actor_layout`: 1-CPU actors in half the cluster's CPUs)
        layout = actor_layout(ResourceConfig(device="cpu"), use_gpu=False)
        job_layout = partial(job_in_run, folder, images=args.cpu_images, rows_per_file=args.cpu_rows_per_file,
                             min_size=args.min_size, batch_size=args.batch_size, actors=layout.max_actors,
                             cpus_per_actor=layout.cpus)  # fmt: skip
        plain = partial(plain_in_run, folder, images=args.cpu_images, actor=ModelActor,
                        kwargs={"min_size": args.min_size}, batch_size=args.batch_size, cpus=threads)  # fmt: skip

        def bare() -> dict:
            run = bare_model(predictor, prepared, configs=((args.batch_size, threads),), repeats=1)
            return {"images_per_s": run["runs"][0]["images_per_s"], "images": run["images"],
                    "kept_queries_per_image": run["kept_queries_per_image"]}  # fmt: skip

        rounds = alternate({"job": job, "job_layout": job_layout, "plain": plain, "bare": bare}, args.rounds)
    got = {j["actor_torch_threads"] for j in rounds["job"]}
    if got != {threads}:
        raise RuntimeError(f"the job's actor ran {got} torch threads, the plain actor and the bare loop {threads}")
    rate = {side: [run["images_per_s"] for run in runs] for side, runs in rounds.items()}
    return {
        "settings": {
            "images": args.cpu_images,
            "size": args.cpu_size,
            "min_size": args.min_size,
            "batch_size": args.batch_size,
            "part_rows": args.cpu_rows_per_file,
            "torch_threads": threads,
            "bare_images": len(prepared),
            "default_layout": {"actors": layout.max_actors, "cpus_per_actor": layout.cpus},
        },
        "images_per_s": rate,
        "job_over_plain": ratios(rate["job"], rate["plain"]),
        "job_layout_over_plain": ratios(rate["job_layout"], rate["plain"]),
        "job_layout_over_job": ratios(rate["job_layout"], rate["job"]),
        "job_over_bare": ratios(rate["job"], rate["bare"]),
        "rounds": rounds,
    }


def gpu_like_regime(args: argparse.Namespace, root: Path) -> dict:
    from bench.in_run import alternate, job_in_run, ratios
    from bench.inputs import write_photo_set
    from bench.local_ray import local_ray
    from bench.plan_cost import stage_core_ms
    from bench.stand_in_model import fixed_result

    folder = root / "photos"
    paths = write_photo_set(folder, args.gpu_images, height=PHOTO_HEIGHT, width=PHOTO_WIDTH)
    stage_uris = [str(p) for p in paths[: args.stage_images]]
    stages = stage_core_ms(
        stage_uris, [fixed_result(PHOTO_HEIGHT, PHOTO_WIDTH)] * len(stage_uris), batch_size=args.batch_size
    )
    with local_ray(stand_in_ms=args.stand_in_ms):
        from pipeline.segmenting.resources import cpu_actor_cpus

        cpus = cpu_actor_cpus(1)  # what the job's (device cpu) actor reserves
        job = partial(job_in_run, folder, images=args.gpu_images, rows_per_file=args.gpu_rows_per_file,
                      min_size=None, batch_size=args.batch_size, actors=1, cpus_per_actor=cpus)  # fmt: skip
        plain = partial(plain_in_run, folder, images=args.gpu_images, actor=StandInActor,
                        kwargs={"ms_per_image": args.stand_in_ms}, batch_size=args.batch_size, cpus=cpus)  # fmt: skip
        sides = {"job": job} if args.job_only else {"job": job, "plain": plain}
        if args.in_process:  # the same call without Ray: what Ray's processes cost on this machine
            sides["in_process"] = partial(
                shard_call_in_process, folder, images=args.gpu_images, rows_per_file=args.gpu_rows_per_file,
                batch_size=args.batch_size, cpus=cpus, stand_in_ms=args.stand_in_ms,
            )  # fmt: skip
        rounds = alternate(sides, args.rounds)
    segments = {j["segments_total"] for j in rounds["job"]}
    if segments != {4 * args.gpu_images}:  # the stand-in's 4 segments per image: it ran, not the CPU model
        raise RuntimeError(f"the job's segments {segments} are not the stand-in's 4 per image")
    rate = {side: [run["images_per_s"] for run in runs] for side, runs in rounds.items()}
    core_ms = stages["core_ms_per_image_total"]
    budget = cpus * 1000 / core_ms
    limit = min(budget, 1000 / args.stand_in_ms)  # what the CPUs and the one model thread allow together
    seconds = [run["stages"]["seconds"] for run in rounds["job"]]
    n = args.gpu_images
    return {
        "settings": {
            "images": args.gpu_images,
            "size": f"{PHOTO_HEIGHT}x{PHOTO_WIDTH}",
            "min_size": "default",
            "batch_size": args.batch_size,
            "part_rows": args.gpu_rows_per_file,
            "stand_in_ms": args.stand_in_ms,
            "stage_images": len(stage_uris),
        },
        "images_per_s": rate,
        "job_over_plain": ratios(rate["job"], rate["plain"]) if "plain" in rate else None,
        "stages": stages,
        "reserved_cpus": cpus,
        "core_ms_per_image": core_ms,
        "cpu_budget_images_per_s": budget,
        "model_thread_cap_images_per_s": 1000 / args.stand_in_ms,  # one model thread sleeping per image
        "job_share_of_cpu_budget": {
            "per_round": [x / budget for x in rate["job"]],
            "median": statistics.median(rate["job"]) / budget,
        },
        "in_process_share_of_cpu_budget": {
            "per_round": [x / budget for x in rate["in_process"]],
            "median": statistics.median(rate["in_process"]) / budget,
        }
        if "in_process" in rate
        else None,
        "in_process_cpus_used": [r["process_cpus_used"] for r in rounds["in_process"]]
        if "in_process" in rate
        else None,
        "job_share_of_limit": {  # min(CPU budget, model thread cap)
            "per_round": [x / limit for x in rate["job"]],
            "median": statistics.median(rate["job"]) / limit,
        },
        # the model thread's own serial time per image beside the model's (its wall time minus the stand-in's
        # sleep), and the block call's orchestrating thread's CPU time per image (`pipeline.segmenting.stage_clock`)
        "model_thread_serial_ms_per_image": [1000 * s["model"] / n - args.stand_in_ms for s in seconds],
        "call_thread_cpu_ms_per_image": [1000 * s["call_cpu"] / n for s in seconds],
        "model_idle_share": [run["stages"]["shares"]["model_idle"] for run in rounds["job"]],
        "verdicts": [run["stages"]["verdict"] for run in rounds["job"]],
        "rounds": rounds,
    }


# ------------------------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    """Per regime and round: job, plain, job / plain; job / bare (cpu); the job's share of its CPU budget."""

    def f(x: float | None, digits: int = 1) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    lines = [
        "| regime | round | job (images/s) | plain (images/s) | job / plain | bare (images/s) | job / bare "
        "| job / CPU budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in REGIMES:
        regime = report.get(name)
        if regime is None:
            continue
        rate = regime["images_per_s"]
        plain = rate.get("plain")
        bare = rate.get("bare")
        share = regime.get("job_share_of_cpu_budget")
        for r in range(len(rate["job"])):
            lines.append(
                f"| {name} | {r + 1} | {f(rate['job'][r])} | {f(plain[r] if plain else None)} "
                f"| {f(regime['job_over_plain']['per_round'][r] if plain else None, 3)} "
                f"| {f(bare[r] if bare else None)} "
                f"| {f(regime['job_over_bare']['per_round'][r] if bare else None, 3)} "
                f"| {f(share['per_round'][r] if share else None, 3)} |"
            )
        median = statistics.median
        lines.append(
            f"| {name} | **median** | {f(median(rate['job']))} | {f(median(plain) if plain else None)} "
            f"| {'**' + f(regime['job_over_plain']['median'], 3) + '**' if plain else '–'} "
            f"| {f(median(bare) if bare else None)} "
            f"| {'**' + f(regime['job_over_bare']['median'], 3) + '**' if bare else '–'} "
            f"| {f(share['median'] if share else None, 3)} |"
        )
    notes = []
    if "cpu" in report:
        s = report["cpu"]["settings"]
        notes.append(
            f"cpu: {s['images']} images of {s['size']}, min_size {s['min_size']}, batch {s['batch_size']}, "
            f"{s['torch_threads']} torch threads, parts of {s['part_rows']}; bare loop on "
            f"{s['bare_images']} of them."
        )
    if "gpu-like" in report:
        g = report["gpu-like"]
        s, ms = g["settings"], g["stages"]["core_ms_per_image"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in ms.items() if k != "decode_device_preprocess_header_check")
        notes.append(
            f"gpu-like: {s['images']} JPEGs of {s['size']}, stand-in {s['stand_in_ms']:g} ms per image, "
            f"batch {s['batch_size']}, parts of {s['part_rows']}; CPU budget = {g['reserved_cpus']:g} "
            f"reserved CPUs × 1000 / {g['core_ms_per_image']:.2f} core-ms per image ({stages}) = "
            f"{g['cpu_budget_images_per_s']:.0f} images/s; one model thread's cap "
            f"{g['model_thread_cap_images_per_s']:.0f} images/s."
        )
        if g.get("in_process_share_of_cpu_budget"):
            inproc = g["images_per_s"]["in_process"]
            notes.append(
                f"gpu-like, the block call without Ray (same photos, one call): "
                f"{', '.join(f'{x:.1f}' for x in inproc)} images/s, "
                f"{g['in_process_share_of_cpu_budget']['median']:.3f} of the CPU budget, the process using "
                f"{', '.join(f'{x:.2f}' for x in g['in_process_cpus_used'])} CPUs."
            )
    return "\n".join([*lines, "", *notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", action="append", choices=REGIMES, help="repeatable; default: both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-size", type=int, default=64, help="cpu: the model's input size")
    parser.add_argument("--cpu-images", type=int, default=512)
    parser.add_argument("--cpu-size", default="480x640", help="cpu: 'tiny' (32×32) or HEIGHTxWIDTH")
    parser.add_argument("--cpu-rows-per-file", type=int, default=64)
    parser.add_argument("--bare-images", type=int, default=64, help="cpu: images per pass of the bare loop")
    parser.add_argument("--gpu-images", type=int, default=1024)
    parser.add_argument("--gpu-rows-per-file", type=int, default=128)
    parser.add_argument("--stand-in-ms", type=float, default=5.0)
    parser.add_argument("--in-process", action="store_true", help="gpu-like: also the block call without Ray")
    parser.add_argument("--job-only", action="store_true", help="gpu-like: the job and its CPU budget, no plain script")
    parser.add_argument("--stage-images", type=int, default=64, help="gpu-like: photos of the core-ms timing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    regimes = args.regime or list(REGIMES)

    from bench.in_run import check_cut, emit
    from bench.machine import contention, describe

    for name in regimes:  # sizes that would be cut into smaller parts fail now, not after a regime's runs
        sizes = {
            "cpu": (args.cpu_images, args.cpu_rows_per_file),
            "gpu-like": (args.gpu_images, args.gpu_rows_per_file),
        }
        check_cut(sizes[name][0], rows_per_file=sizes[name][1], actors=1)
    report: dict = {"machine": describe(), "settings": {k: str(v) for k, v in vars(args).items()}}
    root = Path(tempfile.mkdtemp(prefix="pfb-plain-"))
    try:
        for name in regimes:
            started = time.perf_counter()
            regime = (cpu_regime if name == "cpu" else gpu_like_regime)(args, root)
            report[name] = {**regime, "regime_s": time.perf_counter() - started}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["contention_after"] = contention()
    emit(report, markdown(report), out=args.out, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
