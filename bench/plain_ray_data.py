"""The job vs the plain Ray Data script a user would write instead, and vs the bare model, real model on CPU.

`plain_script` is that script, ~30 lines: ``ray.data.read_images`` -> ``map_batches`` with an actor holding the
same `PanopticPredictor` (same variant, same synthetic weights, same `InferenceConfig`, same torch threads as
the job's CPU actor) that RLE-encodes each segment with the job's own `pipeline.rle.encode_segments` ->
``write_parquet``. The job is `pipeline.run.run_job` of this checkout (one actor, device cpu).

Steady state is marginal, for all three alike: each is run on ``--small`` and on ``--large`` images (the same
640×480 bench photos, `bench.inputs.write_photo_set`), and steady images/s = (large - small) / (T_large -
T_small); start-up = T_small - small / steady rate (listing, planning, actor start incl. model construction).
The bare model is `bench.throughput.bare_model`'s loop (`predict_prepared` on pre-decoded images, the job's
batch size and thread count). One local Ray for the job and the script (4 logical CPUs, own temp dir); run it
under ``flock /tmp/pf-ray-tests.lock`` on the shared machine. One JSON line to stdout (and ``--out``)::

    flock /tmp/pf-ray-tests.lock .venv/bin/python -m bench.plain_ray_data --min-size 64 --small 48 --large 240
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def plain_script(folder: str, output: str, *, min_size: int, batch_size: int, threads: int) -> int:
    """What a user would write: read_images -> map_batches(actor) -> write_parquet. Returns rows written."""
    import pyarrow.parquet as pq
    import ray
    import torch
    from PIL import Image

    from model.checkpoint import build_model
    from model.config import InferenceConfig, get_variant
    from model.predictor import PanopticPredictor
    from pipeline.predict import load_weights
    from pipeline.rle import encode_segments

    class Segment:
        def __init__(self) -> None:
            model = build_model(get_variant("detr-r50-panoptic").config, load_weights("detr-r50-panoptic", "synthetic"))
            self.predictor = PanopticPredictor(model, InferenceConfig(min_size=min_size), torch.device("cpu"))

        def __call__(self, batch: dict) -> dict:
            results = self.predictor.predict([Image.fromarray(image) for image in batch["image"]])
            segments = []
            for r in results:
                encoded = encode_segments(r.id_map, [s.id for s in r.segments])
                rows = [{**s._asdict(), "bbox": list(s.bbox), "rle": e.counts} for s, e in zip(r.segments, encoded)]
                segments.append(rows)
            return {"path": batch["path"], "segments": [json.dumps(s) for s in segments]}

    ds = ray.data.read_images(folder, include_paths=True, mode="RGB")
    ds = ds.map_batches(Segment, batch_size=batch_size, concurrency=1, num_cpus=threads)
    ds.write_parquet(output)
    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(output).glob("*.parquet"))


def _marginal(small: int, t_small: float, large: int, t_large: float) -> dict:
    rate = (large - small) / (t_large - t_small) if t_large > t_small else None
    return {"small_s": round(t_small, 2), "large_s": round(t_large, 2),
            "steady_images_per_s": round(rate, 2) if rate else None,
            "startup_s": round(t_small - small / rate, 2) if rate else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--small", type=int, default=48)
    parser.add_argument("--large", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="job and script runs per size (best kept)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from bench.inputs import write_photo_set
    from bench.local_ray import local_ray
    from bench.machine import contention, describe
    from bench.throughput import bare_model, job, prepare_files
    from model.checkpoint import build_model
    from model.config import InferenceConfig, get_variant
    from model.predictor import PanopticPredictor
    from pipeline.predict import load_weights

    machine = describe()
    root = Path(tempfile.mkdtemp(prefix="pfb-plain-"))
    sets = {n: root / f"set-{n}" for n in (args.small, args.large)}
    for n, folder in sets.items():
        write_photo_set(folder, n)
    report: dict = {"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}}
    try:
        with local_ray() as info:
            import ray

            from pipeline.resources import cpu_actor_cpus

            threads = int(cpu_actor_cpus(1))  # the job's CPU actor reservation (= its torch threads)
            times: dict[str, dict[int, float]] = {"job": {}, "plain": {}}
            jobs: dict[int, dict] = {}
            for _ in range(args.repeats):
                for n, folder in sets.items():  # interleaved: job, script, job, script
                    started = time.perf_counter()
                    row = job(folder, min_size=args.min_size, batch_size=args.batch_size)
                    t = time.perf_counter() - started
                    if t < times["job"].get(n, float("inf")):
                        times["job"][n], jobs[n] = t, row
                    out = root / f"plain-{n}-{time.time_ns()}"
                    started = time.perf_counter()
                    rows = plain_script(str(folder), str(out), min_size=args.min_size, batch_size=args.batch_size,
                                        threads=threads)  # fmt: skip
                    t = time.perf_counter() - started
                    assert rows == n, (rows, n)
                    times["plain"][n] = min(t, times["plain"].get(n, float("inf")))
                    shutil.rmtree(out, ignore_errors=True)
            report["ray_init_s"] = info["ray_init_s"]
            report["actor_threads"] = threads
            del ray
        # The bare model after Ray is gone (its CPUs free), the job's batch size and thread count.
        predictor = PanopticPredictor(
            build_model(get_variant("detr-r50-panoptic").config, load_weights("detr-r50-panoptic", "synthetic")),
            InferenceConfig(min_size=args.min_size),
            torch.device("cpu"),
        )
        prepared = prepare_files(sorted(sets[args.large].iterdir()), predictor)
        bare = bare_model(predictor, prepared, configs=((args.batch_size, threads),), repeats=2)
        bare_rate = bare["runs"][0]["images_per_s"]
        job_m = _marginal(args.small, times["job"][args.small], args.large, times["job"][args.large])
        plain_m = _marginal(args.small, times["plain"][args.small], args.large, times["plain"][args.large])
        job_rate, plain_rate = job_m["steady_images_per_s"], plain_m["steady_images_per_s"]
        report.update({
            "bare": {"images_per_s": round(bare_rate, 2),
                     "best_images_per_s": round(bare["runs"][0]["best_images_per_s"], 2),
                     "segments_per_image": bare["segments_per_image"],
                     "kept_queries_per_image": bare["kept_queries_per_image"]},
            "job": {**job_m, "steady_images_per_s_from_part_arrivals": jobs[args.large]["steady_images_per_s"],
                    "segments_total_large": jobs[args.large]["segments_total"], "actors": jobs[args.large]["actors"]},
            "plain": plain_m,
            "job_over_bare": round(job_rate / bare_rate, 3) if job_rate else None,
            "job_over_plain": round(job_rate / plain_rate, 3) if job_rate and plain_rate else None,
            "contention_after": contention(),
        })  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
