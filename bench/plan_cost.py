"""The job's plan before and after "one call per shard" (issue 17), side by side in one run, same inputs.

1. ``job``: the driver's CPU per 1,000 images over `pipeline.run.run_job` of each tree (the previous commit's
   checkout, ``--before``, and this one, ``--after``), with the stand-in model (`bench/stand_in_model.py`:
   precomputed results at a fixed rate, installed in every Ray worker by a ``worker_process_setup_hook``), on
   ``--images`` tiny JPEGs (32×32) listed from a local folder; wall time, images/s, Ray Data tasks and blocks
   per operator; and the object-store bytes per image per operator (Ray Data's operator metrics,
   ``bytes_task_outputs_generated``, of the dataset `run_job` executed, captured by wrapping
   `pipeline.run.build_dataset`), with the compressed input and the committed parts per image alongside.
2. ``photos``: the same job at the reference input size (``--photos`` 800×1066 JPEGs, default inference
   size), for the object-store bytes of real pixels.
3. ``stages``: worker CPU (thread CPU time) per image by stage of the current plan at 800×1066, in this process
   without Ray: read (`read_ref`), decode (`decode_input`, with and without ``device_preprocess``: a header
   check), the actor's own work around the model (`decoded_batch`, the segmenter's `_prepare`,
   `prediction_table`), RLE (`encode_results` of 25-segment id maps), write (`write_part`, parts of
   ``--rows-per-file``); CPUs per GPU at 1,000 images/s.
4. On paper: the cluster rate at which one driver core is the limit, from the current plan's driver CPU per
   shard.

Each job runs in a child process with its own local Ray (4 logical CPUs, own temp dir, the tree first on
``PYTHONPATH``), each child under ``flock /tmp/pf-ray-tests.lock`` (never two Rays at once on the shared machine).
With ``--no-lock`` the caller holds the lock for the whole run instead. One JSON line goes to stdout (and ``--out``)::

    .venv/bin/python -m bench.plan_cost --before /work/wt-before --after . --images 20000 \
        --out bench/results/plan_cost.json
    flock /tmp/pf-ray-tests.lock .venv/bin/python -m bench.plan_cost --no-lock ...   # one lock for all
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
LOCK = "/tmp/pf-ray-tests.lock"
INPUTS = Path("/tmp/pfb-plan-inputs")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------------------- child


def _operator_metrics(dataset) -> list[dict]:
    """Per operator of an executed dataset: name, output rows / bytes / blocks, tasks (Ray Data's metrics)."""
    keys = ("bytes_task_outputs_generated", "num_task_outputs_generated", "rows_task_outputs_generated",
            "num_tasks_finished", "bytes_inputs_received", "num_inputs_received", "obj_store_mem_spilled",
            "bytes_outputs_of_finished_tasks")  # fmt: skip
    out: list[dict] = []
    seen: set[int] = set()

    def walk(summary) -> None:
        for parent in summary.parents:
            walk(parent)
        if id(summary) in seen:
            return
        seen.add(id(summary))
        names = [op.operator_name for op in summary.operators_stats]
        if not names:
            return
        extra = summary.extra_metrics or {}
        blocks_bytes = sum(op.output_size_bytes.sum for op in summary.operators_stats[-1:] if op.output_size_bytes)
        out.append({"operator": "->".join(names), **{k: extra.get(k) for k in keys},
                    "stats_output_bytes_sum": blocks_bytes})  # fmt: skip

    walk(dataset._get_stats_summary())
    return out


def child_job(args: argparse.Namespace) -> dict:
    import ray

    tree = str(Path(args.tree).resolve())
    temp_dir = tempfile.mkdtemp(prefix="pf-b-", dir="/tmp")
    env = {"PYTHONPATH": f"{tree}:{BENCH_DIR}", "PFB_STAND_IN_MS": str(args.stand_in_ms)}
    started = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "stand_in_model.install"})  # fmt: skip
    ray_init_s = time.perf_counter() - started
    output = tempfile.mkdtemp(prefix="pfb-plan-out-")
    try:
        import pipeline.run as run
        from model.config import InferenceConfig
        from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig

        assert run.__file__.startswith(tree), (run.__file__, tree)
        captured = []
        build = run.build_dataset

        def capture(*a, **k):
            dataset = build(*a, **k)
            captured.append(dataset)
            return dataset

        run.build_dataset = capture
        sized = args.min_size > 0
        inference = InferenceConfig(min_size=args.min_size, max_size=args.max_size) if sized else InferenceConfig()
        config = JobConfig(
            input=InputConfig(uris=(args.input,)),
            output=output,
            model=ModelSpec(weights="synthetic"),
            inference=inference,
            resources=ResourceConfig(batch_size=args.batch_size, rows_per_file=args.rows_per_file, device="cpu"),
        )
        arrivals: list[tuple[float, float, int]] = []  # (wall, driver cpu, images) at each part row

        part_rows: list[dict] = []

        def on_part(row: dict) -> None:
            part_rows.append({k: v for k, v in row.items()})
            arrivals.append((time.perf_counter(), _cpu_seconds(), row["images_ok"] + row["images_error"]))

        cpu, start = _cpu_seconds(), time.perf_counter()
        summary = run.run_job(config, show_progress=False, on_part=on_part)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        images = summary.this_run.images
        operators = _operator_metrics(captured[0]) if captured else []
        written = sum(p.stat().st_size for p in Path(output).glob("*/part-*.parquet"))
        input_bytes = sum(p.stat().st_size for p in Path(args.input).iterdir())
        steady = None
        if len(arrivals) >= 3:  # first part row to last: the plan's steady cost, without start-up and listing
            (t0, c0, _), (t1, c1, _) = arrivals[0], arrivals[-1]
            n = sum(a[2] for a in arrivals[1:])
            steady = {"images": n, "seconds": round(t1 - t0, 2), "images_per_s": round(n / (t1 - t0), 1),
                      "driver_cpu_s_per_1000_images": round(1000 * (c1 - c0) / n, 4)}  # fmt: skip
        # Ray Data's metrics of the last operator are a snapshot taken before its last outputs (1 task, 1 block in
        # every run here): its outputs are the part rows the driver received, counted here instead.
        received = sum(len(json.dumps(a)) for a in part_rows)  # ~ their Arrow size (8 small columns)
        if operators:
            operators[-1]["part_rows_received_bytes_json"] = received
        store = sum(max(op["bytes_task_outputs_generated"] or 0, op["stats_output_bytes_sum"] or 0)
                    for op in operators[:-1]) + received  # fmt: skip
        summary_stats = captured[0]._get_stats_summary() if captured else None
        return {
            "tree": tree,
            "images": images,
            "images_ok": summary.this_run.images_ok,
            "segments": summary.this_run.segments,
            "stand_in_used": summary.this_run.segments == 4 * summary.this_run.images_ok,
            "parts": summary.parts,
            "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1),
            "driver_cpu_s": round(cpu, 3),
            "driver_cpu_s_per_1000_images": round(1000 * cpu / images, 4),
            "steady": steady,
            "part_arrivals_s": [round(a[0] - start, 2) for a in arrivals],
            "operators": operators,
            "object_store_bytes_per_image": round(store / images, 1),
            "input_bytes_per_image": round(input_bytes / images, 1),
            "written_bytes_per_image": round(written / images, 1),
            "ray_init_s": round(ray_init_s, 2),
            "streaming_exec_schedule_s": getattr(summary_stats, "streaming_exec_schedule_s", None),
            "stand_in_ms": args.stand_in_ms,
            "steady_driver_cpu_s": round(arrivals[-1][1] - arrivals[0][1], 3) if len(arrivals) >= 2 else None,
            "shards_in_steady_window": len(arrivals) - 1,
        }
    finally:
        ray.shutdown()
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


CPU_STAGES = ("read", "decode", "actor_overhead", "rle", "write")  # a worker's CPU per image beside the model


def stage_core_ms(uris: list[str], results: list, *, batch_size: int, part=None) -> dict:
    """Worker thread-CPU ms per image by stage of the current plan over the local JPEGs ``uris``, in this process
    without Ray: read (`read_ref`), decode (`decode_input`; with ``device_preprocess`` a header check), the
    actor's own work around the model per batch of ``batch_size`` (`decoded_batch`, the segmenter's `_prepare`,
    `prediction_table` of ``results``: one `PanopticResult` per uri), RLE (`encode_results`), write (`write_part`
    of ``part``, a `RESULT_SCHEMA` table; None: the encoded rows of ``uris``, as one part). `CPU_STAGES` add up
    to what a worker's CPUs do per image beside the model."""
    import pyarrow as pa

    from model.config import InferenceConfig
    from pipeline.exactly_once.commit import OutputCommitter
    from pipeline.exactly_once.lease import Lease
    from pipeline.inputs.decode import decode_input, decoded_batch
    from pipeline.inputs.readers import ImageRow, read_ref
    from pipeline.segmenting.predict import PanopticSegmenter
    from pipeline.segmenting.prediction_tables import encode_results, prediction_table

    n = len(uris)
    tcpu = time.thread_time
    ms: dict[str, float] = {}

    def timed(name: str, fn, items):
        out, c = [], tcpu()
        for item in items:
            out.append(fn(item))
        ms[name] = 1000 * (tcpu() - c) / len(items)
        return out

    read_ref(uris[0], "file", [], bytes_column="image", id_column=None)  # warm
    rows = [r[0] for r in timed("read", lambda u: read_ref(u, "file", [], bytes_column="image", id_column=None), uris)]
    inference, on_device = InferenceConfig(), InferenceConfig(device_preprocess=True)
    max_pixels = 89_478_485
    decoded = timed("decode", lambda r: decode_input(r.data, max_pixels=max_pixels, inference=inference), rows)
    timed("decode_device_preprocess_header_check",
          lambda r: decode_input(r.data, max_pixels=max_pixels, inference=on_device), rows)  # fmt: skip

    # The actor's own work around the model, per batch: the batch dict, the segmenter's _prepare (PreparedImage
    # per row), the prediction table (id map bytes, segment columns).
    class _Holder:
        predictor = None

    segmenter = _Holder()
    tables = []
    c = tcpu()
    for start in range(0, n, batch_size):
        chunk = rows[start : start + batch_size]
        cols = {name: [getattr(r, name) for r in chunk] for name in ImageRow._fields}
        batch = decoded_batch(cols, decoded[start : start + batch_size])
        errors = [str(e) for e in batch["error"]]
        retryable = [bool(r) for r in batch["retryable"]]
        PanopticSegmenter._prepare(segmenter, batch, errors)
        got = {i: results[start + i] for i in range(len(chunk))}
        tables.append(prediction_table(batch, got, errors=errors, retryable=retryable))
    ms["actor_overhead"] = 1000 * (tcpu() - c) / n
    encoded = timed("rle", encode_results, tables)
    ms["rle"] = ms["rle"] * len(tables) / n
    if part is None:
        part = pa.concat_tables(encoded)
    output = tempfile.mkdtemp(prefix="pfb-stages-out-")
    lease = Lease.acquire(output, "bench-stages")
    try:
        c = tcpu()
        row = OutputCommitter(output, "bench-stages").write_part(part)
        ms["write"] = 1000 * (tcpu() - c) / part.num_rows
    finally:
        lease.release()
        shutil.rmtree(output, ignore_errors=True)
    return {
        "core_ms_per_image": ms,
        "core_ms_per_image_total": sum(ms[s] for s in CPU_STAGES),
        "jpeg_bytes_per_image": round(sum(len(r.data) for r in rows) / n),
        "part_rows": part.num_rows,
        "part_bytes_per_image": round(row["bytes"] / part.num_rows, 1),
    }


def child_stages(args: argparse.Namespace) -> dict:
    """Worker thread-CPU ms per image by stage of the current plan at 800×1066 (no Ray), 25-segment results."""
    import numpy as np
    from PIL import Image

    from bench.inputs import PHOTOS, _crop_resize, _jpeg, synthetic_photo
    from model.panoptic import PanopticResult, Segment

    height, width, n = 800, 1066, args.stage_images
    folder = Path(tempfile.mkdtemp(prefix="pfb-stages-"))
    photos = []
    for path in sorted(PHOTOS.iterdir()):
        with Image.open(path) as im:
            photos.append(_jpeg(_crop_resize(im.convert("RGB"), height, width)))
    for i in range(n):
        synthetic = Image.fromarray(synthetic_photo(height, width, seed=i))
        data = photos[(i // 2) % len(photos)] if i % 2 == 0 else _jpeg(synthetic)
        (folder / f"img-{i:04d}.jpg").write_bytes(data)
    uris = sorted(str(p) for p in folder.iterdir())

    # Realistic results: 25 blob segments with ragged boundaries (as bench/synthetic_results.py's id maps).
    def id_map_of(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        cell = int(rng.integers(30, 50))
        small = rng.integers(0, 25, size=(height // cell + 1, width // cell + 1))
        m = np.kron(small, np.ones((cell, cell), dtype=np.int64))[:height, :width].astype(np.uint8)
        shifts = rng.integers(-4, 5, size=width)
        rows_ = (np.arange(height)[:, None] + shifts[None, :]) % height
        return np.ascontiguousarray(m[rows_, np.arange(width)[None, :]])

    def result_of(seed: int) -> PanopticResult:
        m = id_map_of(seed)
        segments = []
        for s in range(25):
            ys, xs = np.nonzero(m == s)
            if len(ys):
                segments.append(Segment(s, 1 + s, s < 15, 0.9, int(len(ys)), (int(xs.min()), int(ys.min()),
                                int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))))  # fmt: skip
        return PanopticResult(m, segments)

    results = [result_of(i) for i in range(n)]
    # Write: one part of --rows-per-file rows of 256 distinct photo-like segmentations (bench/synthetic_results.py's
    # rows: 25 segments of 800×1066, real RLE; beyond zstd's window, so the part compresses like a real one).
    from bench.synthetic_results import DISTINCT_PHOTOS, result_block, segments_of_a_photo

    part = result_block(0, args.rows_per_file, [segments_of_a_photo(seed) for seed in range(DISTINCT_PHOTOS)])
    try:
        stages = stage_core_ms(uris, results, batch_size=args.batch_size, part=part)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ms = stages["core_ms_per_image"]
    total = stages["core_ms_per_image_total"]
    total_dp = total - ms["decode"] + ms["decode_device_preprocess_header_check"]
    return {
        "images": n,
        "size": [height, width],
        "jpeg_bytes_per_image": stages["jpeg_bytes_per_image"],
        "core_ms_per_image": {k: round(v, 3) for k, v in ms.items()},
        "segments_per_image": round(sum(len(r.segments) for r in results) / n, 1),
        "part_rows": stages["part_rows"],
        "part_bytes_per_image": stages["part_bytes_per_image"],
        "core_ms_per_image_total": round(total, 3),
        "core_ms_per_image_total_device_preprocess": round(total_dp, 3),
        "cpus_per_gpu_at_1000_images_per_s": round(total, 2),
        "cpus_per_gpu_at_1000_images_per_s_device_preprocess": round(total_dp, 2),
    }


# --------------------------------------------------------------------------------------------------------- parent


def _child(args: argparse.Namespace, *extra: str, tree: str, timeout: float, ray: bool = True) -> dict:
    """One child run of this file on ``tree``; one that starts Ray takes the shared lock first."""
    tree = str(Path(tree).resolve())
    lock = ["flock", LOCK] if ray and not args.no_lock else []
    command = [*lock, sys.executable, str(BENCH_DIR / "plan_cost.py"), "--tree", tree,
               "--batch-size", str(args.batch_size), "--rows-per-file", str(args.rows_per_file),
               "--stand-in-ms", str(args.stand_in_ms), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{tree}:{BENCH_DIR}", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree, timeout=timeout)
    if done.returncode != 0:
        return {"error": done.stderr[-3000:], "returncode": done.returncode, "tree": tree}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["child_wall_s"] = round(time.perf_counter() - started, 1)
    with open(INPUTS / "children.jsonl", "a") as log:  # each child's report as it comes (a long run's progress)
        log.write(json.dumps({"extra": extra, **report}) + "\n")
    return report


def _tiny_set(count: int) -> Path:
    from bench.inputs import write_tiny_set

    folder = INPUTS / f"tiny32-{count}"
    if not (folder.is_dir() and len(list(folder.iterdir())) == count):
        shutil.rmtree(folder, ignore_errors=True)
        write_tiny_set(folder, count)
    return folder


def _photo_set(count: int) -> Path:
    """``count`` 800×1066 JPEGs (bundled photos and synthetic ones, alternating)."""
    from PIL import Image

    from bench.inputs import PHOTOS, _crop_resize, _jpeg, synthetic_photo

    folder = INPUTS / f"photos800-{count}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = []
    for path in sorted(PHOTOS.iterdir()):
        with Image.open(path) as im:
            photos.append(_jpeg(_crop_resize(im.convert("RGB"), 800, 1066)))
    synthetic = [_jpeg(Image.fromarray(synthetic_photo(800, 1066, seed=j))) for j in range(8)]
    for i in range(count):
        data = photos[(i // 2) % len(photos)] if i % 2 == 0 else synthetic[(i // 2) % len(synthetic)]
        (folder / f"photo-{i:05d}.jpg").write_bytes(data)
    return folder


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="/work/wt-before", help="the previous commit's checkout")
    parser.add_argument("--after", default=str(BENCH_DIR.parent), help="the current checkout")
    parser.add_argument("--images", type=int, default=20_000, help="tiny JPEGs for the driver-CPU jobs")
    parser.add_argument("--photos", type=int, default=256, help="800×1066 JPEGs for the object-store jobs (0: skip)")
    parser.add_argument("--stage-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-file", type=int, default=2048)
    parser.add_argument("--stand-in-ms", type=float, default=2.0, help="the stand-in model's ms per image")
    parser.add_argument("--only", nargs="*", default=["job", "photos", "stages"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child")
    parser.add_argument(
        "--after-rates",
        type=float,
        nargs="*",
        default=[],
        help="also run the current plan at these stand-in ms per image (driver CPU per second vs per shard)",
    )
    parser.add_argument("--no-lock", action="store_true", help=f"the caller holds {LOCK} (children do not take it)")
    parser.add_argument("--out", type=Path, default=None)
    # a child run
    parser.add_argument("--child", choices=["job", "stages"], help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--min-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "job":
        print(json.dumps(child_job(args)), flush=True)
        return 0
    if args.child == "stages":
        print(json.dumps(child_stages(args)), flush=True)
        return 0

    from bench.machine import contention, describe

    report: dict = {"machine": describe(), "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    report["settings"]["out"] = str(args.out) if args.out else None
    if "photos" in args.only and args.photos:
        folder = _photo_set(args.photos)
        extra = ("--child", "job", "--input", str(folder))
        report["photos"] = {side: _child(args, *extra, tree=tree, timeout=args.timeout)
                            for side, tree in (("before", args.before), ("after", args.after))}  # fmt: skip
    if "job" in args.only:
        folder = _tiny_set(args.images)
        extra = ("--child", "job", "--input", str(folder), "--min-size", "32", "--max-size", "53")
        jobs = {side: _child(args, *extra, tree=tree, timeout=args.timeout)
                for side, tree in (("before", args.before), ("after", args.after))}  # fmt: skip
        jobs["contention_after"] = contention()
        report["job"] = jobs
        b, a = jobs["before"], jobs["after"]
        if "error" not in b and "error" not in a:
            # the steady window (first part row to last) holds whole shards of --rows-per-file: CPU per shard
            per_image = ((a["steady"] or {}).get("driver_cpu_s_per_1000_images")
                         or a["driver_cpu_s_per_1000_images"]) / 1000  # fmt: skip
            per_shard = per_image * args.rows_per_file
            report["summary"] = {
                "driver_cpu_ms_per_image": [b["driver_cpu_s_per_1000_images"], a["driver_cpu_s_per_1000_images"]],
                "driver_cpu_ratio_before_over_after": _ratio(b["driver_cpu_s_per_1000_images"],
                                                             a["driver_cpu_s_per_1000_images"]),
                "steady_driver_cpu_ratio": _ratio((b["steady"] or {}).get("driver_cpu_s_per_1000_images"),
                                                  (a["steady"] or {}).get("driver_cpu_s_per_1000_images")),
                "object_store_bytes_per_image": [b["object_store_bytes_per_image"], a["object_store_bytes_per_image"]],
                "after_driver_cpu_s_per_shard": round(per_shard, 4),
                "after_cluster_images_per_s_one_driver_core": round(args.rows_per_file / per_shard)
                if per_shard else None,
            }  # fmt: skip
    if "job" in args.only and args.after_rates:
        folder = _tiny_set(args.images)
        extra = ("--child", "job", "--input", str(folder), "--min-size", "32", "--max-size", "53")
        report["after_rates"] = []
        for ms in args.after_rates:
            rate_args = argparse.Namespace(**{**vars(args), "stand_in_ms": ms})
            report["after_rates"].append(_child(rate_args, *extra, tree=args.after, timeout=args.timeout))
    if "stages" in args.only:
        report["stages"] = _child(args, "--child", "stages", "--stage-images", str(args.stage_images),
                                  tree=args.after, timeout=args.timeout, ray=False)  # fmt: skip
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
