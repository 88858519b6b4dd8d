"""One entry point for the benchmarks: measures side by side in one process, prints a markdown report.

    python -m bench.run [--quick] [--only NAME ...] [--out bench/results/run.json]

Benchmarks (``--only`` picks; default: throughput, stages, rle):

- ``throughput``: bare model loop (batch 1 and 4; 2 and 1 torch threads) vs the whole Ray job on the same
  files, start-up apart, and their ratio (`bench.throughput`);
- ``stages``: where an image's time goes, stage by stage (`bench.stages`);
- ``rle``: one-pass RLE vs a pycocotools call per segment (`bench.rle`);
- ``scaling``: job time and driver memory vs number of tiny images (`bench.scaling`; a few minutes);
- ``hf``: our model + merge vs Hugging Face DetrForSegmentation (`bench.model_vs_hf`; slow).

The model uses the deterministic synthetic weights (`model.synthetic_weights`): timings are real, segments
meaningless, and the number of kept queries (which sets the mask-head and merge cost) is that of these weights
on these images, so it is reported next to every timing. The Ray benchmarks start their own local Ray
(``num_cpus=4``, own temp dir) and shut it down by its handle.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

NAMES = ("throughput", "stages", "rle", "scaling", "hf")
DEFAULT_NAMES = ("throughput", "stages", "rle")


@dataclass(frozen=True)
class Settings:
    min_size: int  # the model's input short side (InferenceConfig.min_size)
    images: int  # files in the throughput set (a multiple of the largest batch size)
    bare_configs: tuple[tuple[int, int], ...]  # (batch size, torch threads) of the bare loop
    bare_repeats: int  # timed passes of the bare loop per configuration
    job_repeats: int  # job runs (each starts its actor anew)
    job_batch_size: int
    stage_images: int
    stage_repeats: int
    rle_repeats: int
    scaling_sizes: tuple[int, ...]
    scaling_rows_per_file: tuple[int, ...]  # the writer's commit size: results are held until it is reached
    hf_kept: tuple[int, ...]
    hf_repeats: int


QUICK = Settings(
    min_size=256,
    images=48,
    bare_configs=((1, 2), (4, 2)),
    bare_repeats=1,
    job_repeats=1,
    job_batch_size=4,
    stage_images=4,
    stage_repeats=1,
    rle_repeats=5,
    scaling_sizes=(100, 400),
    scaling_rows_per_file=(2048, 64),
    hf_kept=(10,),
    hf_repeats=1,
)
FULL = Settings(
    min_size=512,
    images=48,
    bare_configs=((1, 2), (4, 2)),
    bare_repeats=2,
    job_repeats=2,
    job_batch_size=4,
    stage_images=6,
    stage_repeats=1,
    rle_repeats=30,
    scaling_sizes=(200, 1000, 2000),
    scaling_rows_per_file=(2048, 256),
    hf_kept=(0, 10, 30),
    hf_repeats=3,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small images and counts (about two minutes)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"any of {', '.join(NAMES)}")
    parser.add_argument("--min-size", type=int, help="override the model input short side (quick 320, full 512)")
    parser.add_argument("--images", type=int, help="override the number of files in the throughput set")
    parser.add_argument("--out", default="bench/results/run.json", help="JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    names = tuple(args.only or DEFAULT_NAMES)
    settings = QUICK if args.quick else FULL
    if args.min_size:
        settings = replace(settings, min_size=args.min_size)
    if args.images:
        settings = replace(settings, images=args.images)
    command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])

    from bench.machine import cpu_pressure, describe, load_average

    started = time.perf_counter()
    report: dict = {"command": command.strip(), "machine": describe(), "settings": asdict(settings), "results": {}}
    results = report["results"]
    with tempfile.TemporaryDirectory(prefix="pfb-") as tmp:
        if "throughput" in names or "stages" in names:
            _model_benchmarks(names, settings, Path(tmp), results)
        if "rle" in names:
            from bench import rle

            _log("rle")
            results["rle"] = rle.run(repeats=settings.rle_repeats)
        if "scaling" in names:
            from bench import scaling

            _log("scaling")
            results["scaling"] = scaling.run(settings.scaling_sizes, rows_per_file=settings.scaling_rows_per_file)
        if "hf" in names:
            from bench import model_vs_hf

            _log("hf (each measurement in its own subprocess)")
            out = Path(tmp) / "hf.json"
            kept = [str(k) for k in settings.hf_kept]
            model_vs_hf.main(["--kept", *kept, "--repeats", str(settings.hf_repeats), "--out", str(out)])
            results["hf"] = json.loads(out.read_text())
    report["machine"]["load_average_at_end"] = load_average()
    report["machine"]["cpu_pressure_at_end"] = cpu_pressure()
    report["seconds"] = time.perf_counter() - started

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nJSON written to {args.out}")
    return 0


def _log(what: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def _model_benchmarks(names: tuple[str, ...], settings: Settings, tmp: Path, results: dict) -> None:
    """Builds the model once (timed), then runs the stages and throughput benchmarks on one image set."""
    from bench import stages, throughput
    from bench.inputs import write_photo_set
    from bench.local_ray import local_ray
    from bench.machine import contention
    from model.checkpoint import build_model
    from model.config import VARIANTS
    from model.predictor import InferenceConfig, PanopticPredictor
    from model.synthetic_weights import synthetic_state_dict

    folder = tmp / "images"
    paths = write_photo_set(folder, settings.images)
    _log(f"building the model (synthetic weights), min_size {settings.min_size}")
    start = time.perf_counter()
    config = VARIANTS["detr-r50-panoptic"].config
    model = build_model(config, synthetic_state_dict(config))
    construction_s = time.perf_counter() - start
    predictor = PanopticPredictor(model, InferenceConfig(min_size=settings.min_size))

    if "stages" in names:
        _log(f"stages: {settings.stage_images} images × {settings.stage_repeats}")
        results["stages"] = {
            **stages.run(predictor, paths[: settings.stage_images], repeats=settings.stage_repeats),
            "contention": contention(),
        }
    if "throughput" in names:
        prepared = throughput.prepare_files(paths, predictor)
        bare_parts, jobs = [], []
        with local_ray() as ray_info:
            # Rounds of (bare passes, one job), so that both see the same machine, busy or not.
            for r in range(max(settings.bare_repeats, settings.job_repeats)):
                if r < settings.bare_repeats:
                    _log(f"bare model: {len(prepared)} images, (batch, threads) {settings.bare_configs} ({r + 1})")
                    part = throughput.bare_model(predictor, prepared, configs=settings.bare_configs, repeats=1, seed=r)
                    bare_parts.append({**part, "contention": contention()})
                if r < settings.job_repeats:
                    _log(f"job: {len(paths)} images, batch {settings.job_batch_size} ({r + 1})")
                    row = throughput.job(folder, min_size=settings.min_size, batch_size=settings.job_batch_size)
                    jobs.append({**row, "contention": contention()})
        bare = throughput.merge_bare(bare_parts)
        bare["model_construction_s"] = construction_s
        bare["contention"] = [part["contention"] for part in bare_parts]
        results["throughput"] = {
            "bare": bare,
            "jobs": jobs,
            "ray_init_s": ray_info["ray_init_s"],
            "ratios": _ratios(bare, jobs, settings),
        }


def _ratios(bare: dict, jobs: list[dict], settings: Settings) -> dict[str, float]:
    """Median steady job images/s ÷ bare images/s (same batch and threads as the actor; and the best bare)."""
    import statistics

    rows = [j for j in jobs if j["steady_images_per_s"]]
    if not rows:
        return {}
    steady = statistics.median(j["steady_images_per_s"] for j in rows)
    same = _bare_ips(bare, settings.job_batch_size, rows[0]["actor_torch_threads"])
    return {
        "job_steady_images_per_s": steady,
        "vs_bare_same_batch_and_threads": steady / same if same else float("nan"),
        "vs_best_bare": steady / max(r["images_per_s"] for r in bare["runs"]),
    }


def _bare_ips(bare: dict, batch: int, threads: int) -> float | None:
    for r in bare["runs"]:
        if r["batch"] == batch and r["torch_threads"] == threads:
            return r["images_per_s"]
    return None


# -- markdown ------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}` ({report['seconds']:.0f} s)",
        "",
        f"Machine: {m['platform']}, {m['cpu_model']}, {m['cpus_usable']} cores usable "
        f"({m['torch_threads']} torch threads); load average {m['load_average_at_start']} at start, "
        f"{m['load_average_at_end']} at end; CPU pressure (PSI some avg10) {m['cpu_pressure_at_start']} % at start, "
        f"{m['cpu_pressure_at_end']} % at end. Date: {m['date']}. "
        f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, numpy {m['numpy']}, pyarrow {m['pyarrow']}.",
        "",
    ]
    r = report["results"]
    s = report["settings"]
    if "throughput" in r:
        lines += _throughput_table(r["throughput"], s)
    if "stages" in r:
        lines += _stages_table(r["stages"], s)
    if "rle" in r:
        lines += _rle_table(r["rle"])
    if "scaling" in r:
        lines += _scaling_table(r["scaling"])
    if "hf" in r:
        lines += _hf_table(r["hf"])
    return "\n".join(lines)


def _throughput_table(t: dict, s: dict) -> list[str]:
    bare = t["bare"]
    h, w = bare["processed_size"]
    lines = [
        f"### Throughput: bare model vs the Ray job ({bare['images']} images of 640×480 → {h}×{w}, "
        f"{bare['kept_queries_per_image']:.1f} kept queries/image (min {bare['kept_queries_min_max'][0]}, "
        f"max {bare['kept_queries_min_max'][1]}), {bare['segments_per_image']:.1f} segments/image)",
        "",
        "| run | batch | torch threads | start-up s | steady images/s | overall images/s | job/bare same batch "
        "& threads | job/best bare | CPU pressure % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    pressure_bare = ", ".join(_pressure(c) for c in bare["contention"])
    for i, row in enumerate(bare["runs"]):
        note = f" (model construction {bare['model_construction_s']:.1f} + first batch)" if i == 0 else " (first batch)"
        startup = row["first_batch_s"] + (bare["model_construction_s"] if i == 0 else 0.0)
        lines.append(
            f"| bare `predict_prepared` | {row['batch']} | {row['torch_threads']} | {startup:.1f}{note} | "
            f"{row['images_per_s']:.2f} (best {row['best_images_per_s']:.2f}) | – | – | – | {pressure_bare} |"
        )
    best = max(r["images_per_s"] for r in bare["runs"])
    for j in t["jobs"]:
        steady = j["steady_images_per_s"]
        same = _bare_ips(bare, j["batch_size"], j["actor_torch_threads"])
        ratio_same = f"{steady / same:.2f}" if steady and same else "–"
        ratio_best = f"{steady / best:.2f}" if steady else "–"
        overhead = f" ({j['fixed_overhead_s']:.1f} fixed)" if steady else ""
        lines.append(
            f"| `run_job` | {j['batch_size']} | {j['actor_torch_threads']} | "
            f"{j['startup_s']:.1f}{overhead} | {f'{steady:.2f}' if steady else '– (too few result blocks)'} | "
            f"{j['overall_images_per_s']:.2f} | {ratio_same} | {ratio_best} | {_pressure(j['contention'])} |"
        )
    lines += [
        "",
        f"Bare passes: median of {s['bare_repeats']}, configurations interleaved, in rounds with the job runs "
        f"(bare, job, bare, job, ...; Ray up throughout). Job start-up = job start → "
        f"first result block at the driver (listing, planning, actor start incl. its own model construction, and "
        f"the compute of the first block(s): results arrive in blocks of 16 images, the pipeline's read "
        f"partition); fixed = whole job − images ÷ steady rate; steady = images per second between result blocks "
        f"(the last block, which `iter_batches` prefetching delivers together with the one before, is left out); "
        f"overall = images ÷ whole `run_job`. Ray init (not in any row): {t['ray_init_s']:.1f} s. The job's torch "
        f"threads are those its actor reported (Ray sets OMP_NUM_THREADS to the actor's num_cpus). CPU pressure = "
        f"share of the last 10 s in which a runnable task waited for a CPU, right after the measurement (per "
        f"round for the bare rows; the job row includes its own read/decode tasks): high values on a bare row "
        f"mean other processes competed and the row is unreliable.",
        "",
    ]
    return lines


def _pressure(contention: dict) -> str:
    value = contention.get("cpu_pressure_some_avg10")
    return "–" if value is None else f"{value:.0f}"


def _stages_table(st: dict, s: dict) -> list[str]:
    lines = [
        f"### Per-stage time per image ({st['images']} images × {st['repeats']}, min_size {s['min_size']}, "
        f"{st['kept_queries_per_image']:.1f} kept queries/image, {st['segments_per_image']:.1f} segments/image)",
        "",
        "| stage | ms/image (median) | share |",
        "| --- | ---: | ---: |",
    ]
    for name, sec in st["seconds_per_image"].items():
        lines.append(f"| {name} | {sec * 1e3:.1f} | {st['share'][name] * 100:.1f} % |")
    lines += [f"| **total** | **{st['total_seconds_per_image'] * 1e3:.1f}** | |", ""]
    return lines


def _rle_table(rle: dict) -> list[str]:
    lines = [
        f"### RLE per image: `encode_segments` vs a pycocotools call per segment ({rle['repeats']} repeats)",
        "",
        "| image | segments | pycocotools ms | encode_segments ms | runs+frPyObjects ms | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rle["rows"]:
        ms = row["seconds_per_image"]
        lines.append(
            f"| {row['height']}×{row['width']} | {row['segments']} | {ms['pycocotools'] * 1e3:.2f} | "
            f"{ms['encode_segments'] * 1e3:.2f} | {ms['runs+frPyObjects'] * 1e3:.2f} | "
            f"{row['speedup_vs_pycocotools']['encode_segments']:.1f}× |"
        )
    return [*lines, ""]


def _scaling_table(sc: dict) -> list[str]:
    lines = [
        f"### Scaling: tiny {sc['image_size']}×{sc['image_size']} images, min_size {sc['min_size']}, batch "
        f"{sc['batch_size']} (one subprocess and one local Ray per row)",
        "",
        "| rows_per_file | images | total s | start-up s | steady ms/image | total ms/image | driver RSS before "
        "job MiB | driver peak RSS MiB | CPU pressure % |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in sc["rows"]:
        lines.append(
            f"| {row['rows_per_file']} | {row['images']} | {row['total_s']:.1f} | {row['startup_s']:.1f} | "
            f"{row['steady_ms_per_image']:.1f} | {row['total_ms_per_image']:.1f} | "
            f"{row['driver_rss_before_mib']:.0f} | {row['driver_peak_rss_mib']:.0f} | {_pressure(row['contention'])} |"
        )
    lines.append("")
    for per_file in dict.fromkeys(row["rows_per_file"] for row in sc["rows"]):
        rows = [row for row in sc["rows"] if row["rows_per_file"] == per_file]
        if len(rows) < 2:
            continue
        first, last = rows[0], rows[-1]
        slope = (last["driver_peak_rss_mib"] - first["driver_peak_rss_mib"]) * 1024 / (last["images"] - first["images"])
        lines.append(
            f"rows_per_file {per_file}: driver peak RSS grows by {slope:.1f} KiB per image between {first['images']} "
            f"and {last['images']} images; steady time per image {first['steady_ms_per_image']:.1f} → "
            f"{last['steady_ms_per_image']:.1f} ms."
        )
    return [*lines, ""]


def _hf_table(hf: dict) -> list[str]:
    h, w = hf["image"]
    lines = [
        f"### Model + merge vs Hugging Face DetrForSegmentation ({h}×{w}, synthetic weights)",
        "",
        "| kept queries | ours s | ours peak GiB | HF s | HF peak GiB | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in hf["rows"]:
        o, f = row["ours"], row["hf"]
        lines.append(
            f"| {o['kept_queries']} | {o['seconds_per_image']:.2f} | {o['peak_rss_gib']:.2f} | "
            f"{f['seconds_per_image']:.2f} | {f['peak_rss_gib']:.2f} | {row['speedup']:.1f}× |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    sys.exit(main())
