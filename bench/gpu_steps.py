"""The measurement steps of `bench.gpu`, and the sizes they run at (`Settings`: full, quick on CPU or CUDA).

Each step takes its deadline (or, for the two that run in their own process, the seconds left and a file for
partial results) and returns a JSON-ready record; `bench.gpu` gives each its share of the budget, runs them
in order and writes the report. The module docstring of `bench.gpu` says what each step measures.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.agreement import agreement, input_noise, judge
from bench.budget import Budget, run_killable
from bench.inputs import write_mixed_set, write_photo_set
from model.panoptic import PanopticResult
from model.predictor import InferenceConfig, PanopticPredictor, PreparedImage

ROOT = Path(__file__).resolve().parents[1]
TORCH_TF32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # torch's defaults
SUBPROCESS_MARGIN_S = 15.0  # a subprocess step stops itself this long before its share ends (then it is killed)


@dataclass(frozen=True)
class Settings:
    min_size: int  # the model's input short side (800: the reference)
    images: int  # uniform set: 640×480 JPEGs, one processed size
    mixed_images: int  # mixed-size set for exact vs bucketed batching
    batch_sizes: tuple[int, ...]
    repeats: int  # timed passes per row and batch size (median kept)
    job_images: int
    job_rows_per_file: int  # parts are the job's clock: several are needed for a steady rate
    compile_backend: str
    warm_up: bool = True  # an untimed pass per variant and batch size first (cudnn autotuning, first calls)


FULL = Settings(
    min_size=800,
    images=64,
    mixed_images=48,
    batch_sizes=(8, 16),
    repeats=3,
    job_images=1024,
    job_rows_per_file=128,
    compile_backend="inductor",
)
# Proves the command on CPU (CI): tiny images, one pass; torch.compile traced by dynamo only ("eager" backend:
# inductor's C++ compile of the backbone takes minutes on two cores).
QUICK_CPU = Settings(
    min_size=64,
    images=4,
    mixed_images=6,
    batch_sizes=(2, 4),
    repeats=1,
    job_images=32,
    job_rows_per_file=8,
    compile_backend="eager",
    warm_up=False,
)
QUICK_CUDA = replace(FULL, images=16, mixed_images=12, repeats=1, job_images=256, job_rows_per_file=32)


# -- helpers -------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(enabled: bool | None) -> None:
    """False: off (the fp32 reference); None: torch's defaults (what the job's actor runs with)."""
    matmul, cudnn = TORCH_TF32 if enabled is None else (enabled, enabled)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


@functools.lru_cache(maxsize=1)
def _build_model(weights: str | None) -> torch.nn.Module:
    """The R50 panoptic model, built once per process (predictors share it; channels-last ones copy it)."""
    from model.checkpoint import build_model, read_state_dict
    from model.config import VARIANTS
    from model.synthetic_weights import synthetic_state_dict

    config = VARIANTS["detr-r50-panoptic"].config
    return build_model(config, read_state_dict(weights) if weights else synthetic_state_dict(config))


def _decoded(paths: list[Path], config: InferenceConfig) -> list[PreparedImage]:
    """Pillow decode + resize, as the pipeline's CPU workers do -> numpy pixels for `predict_prepared`."""
    from bench.variants import prepare_bytes

    return prepare_bytes([p.read_bytes() for p in paths], replace(config, device_preprocess=False), torch.device("cpu"))


def _passes(predictor: PanopticPredictor, images: list[PreparedImage], batch: int) -> list[PanopticResult]:
    results: list[PanopticResult] = []
    for start in range(0, len(images), batch):
        results += predictor.predict_prepared(images[start : start + batch])
    return results


def _timed(
    predictor: PanopticPredictor, images: list[PreparedImage], batch: int, device: torch.device
) -> tuple[float, list[PanopticResult]]:
    _sync(device)
    start = time.perf_counter()
    results = _passes(predictor, images, batch)
    _sync(device)
    return time.perf_counter() - start, results


def _noisy(predictor: PanopticPredictor, images: list[PreparedImage], batch: int) -> list[PanopticResult]:
    """The fp32 path under ±0.5 grey level of seeded input noise: the gate's yardstick."""
    with input_noise(predictor.model, seed=0):
        return _passes(predictor, images, batch)


def _gated(name: str, reference: list, results: list, yardstick_results: list, floor: float) -> dict:
    agree, yardstick = agreement(reference, results), agreement(reference, yardstick_results)
    verdict = judge(name, agree, yardstick, floor=floor)
    return {
        "pixels_in_matching_segments": agree.pixels,
        "pixels_in_matching_segments_min": agree.pixels_min,
        "same_segment_lists": agree.same_segment_lists,
        "gate_passed": verdict.passed,
        "gate_message": verdict.message,
    }


def _yardstick_record(reference: list, yardstick_results: list) -> dict:
    a = agreement(reference, yardstick_results)
    return {
        "pixels_in_matching_segments": a.pixels,
        "pixels_in_matching_segments_min": a.pixels_min,
        "same_segment_lists": a.same_segment_lists,
    }


# -- steps ---------------------------------------------------------------------------------------------


def machine_step(device: torch.device) -> dict:
    from bench.machine import describe

    record: dict = {"host": describe(), "device": str(device), "cuda": torch.version.cuda}
    record["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    record["torch_tf32_defaults"] = {"matmul": TORCH_TF32[0], "cudnn": TORCH_TF32[1]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
        )
    return record


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no NVML: ask nvidia-smi
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            return None


def pytest_step(deadline: float, *, weights: str | None) -> dict:
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text() or "marks=pytest.mark.gpu" in p.read_text()
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    if weights:
        env["PANOPTIC_FLOW_TEST_WEIGHTS"] = weights
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    code, output, timed_out = run_killable(cmd, timeout=Budget.left(deadline), env=env, cwd=ROOT)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {k: _count(summary, k) for k in ("passed", "failed", "skipped", "error", "deselected")}
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "weights": bool(weights),
        "exit_code": code,
        "summary": "timed out" if timed_out else summary,
        **counts,
        "output_tail": output[-4000:],
        "note": "cut: the step's share ran out" if timed_out else "",
    }


def _count(summary: str, word: str) -> int:
    match = re.search(rf"(\d+) {word}", summary)
    return int(match.group(1)) if match else 0


def model_step(deadline: float, *, settings: Settings, device: torch.device, weights: str | None, tmp: Path) -> dict:
    base = InferenceConfig(min_size=settings.min_size, max_size=int(settings.min_size * 1333 / 800))
    fp32 = replace(base, channels_last=False)
    uniform = _decoded(write_photo_set(tmp / "uniform", settings.images), base)
    mixed = _decoded(write_mixed_set(tmp / "mixed", settings.mixed_images), base)
    model = _build_model(weights)
    # name -> (config, TF32: False = off / None = torch's defaults, image set); one shared model (the
    # channels-last predictors convert copies of it)
    rows: dict[str, tuple[InferenceConfig, bool | None, str]] = {
        "fp32": (fp32, False, "uniform"),
        "bf16": (replace(fp32, precision="bf16"), False, "uniform"),
        "channels_last": (replace(fp32, channels_last=True), False, "uniform"),
        "default config": (base, None, "uniform"),
        "exact, mixed sizes": (fp32, False, "mixed"),
        "bucketed, mixed sizes": (replace(fp32, batch_mode="bucketed"), False, "mixed"),
    }
    if device.type == "cuda":
        rows["fp32, torch TF32 defaults"] = (fp32, None, "uniform")
        rows["fp16"] = (replace(fp32, precision="fp16"), False, "uniform")
    sets = {"uniform": uniform, "mixed": mixed}
    predictors = {name: PanopticPredictor(model, cfg, device) for name, (cfg, _, _) in rows.items()}
    times: dict[tuple[str, int], list[float]] = {}
    peaks: dict[str, float] = {}
    outputs: dict[str, list[PanopticResult]] = {}
    note = ""
    work = [(name, b) for name in rows for b in settings.batch_sizes]
    for name, b in work if settings.warm_up else []:  # cudnn autotuning per shape, allocator, first calls
        if Budget.left(deadline) <= 0:
            break
        cfg, tf32, which = rows[name]
        set_tf32(tf32)
        predictors[name].predict_prepared(sets[which][:b])
    for r in range(settings.repeats):
        random.Random(r).shuffle(work)
        for name, b in work:
            if Budget.left(deadline) <= 0:
                note = note or f"cut in repeat {r + 1} of {settings.repeats}: the step's share ran out"
                break
            cfg, tf32, which = rows[name]
            set_tf32(tf32)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, results = _timed(predictors[name], sets[which], b, device)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            times.setdefault((name, b), []).append(seconds)
            if b == settings.batch_sizes[0]:
                outputs[name] = results
    set_tf32(False)
    b0 = settings.batch_sizes[0]
    yardsticks = {}
    if "fp32" in outputs:
        yardsticks["uniform"] = _noisy(predictors["fp32"], uniform, b0)
    if "exact, mixed sizes" in outputs:
        yardsticks["mixed"] = _noisy(predictors["exact, mixed sizes"], mixed, b0)
    references = {"uniform": "fp32", "mixed": "exact, mixed sizes"}
    floor = 0.99 if weights else 0.0
    result_rows = {}
    for name, (cfg, tf32, which) in rows.items():
        row: dict = {
            "config": {k: v for k, v in asdict(cfg).items() if k in ("precision", "channels_last", "batch_mode")},
            "channels_last_used": predictors[name].channels_last,
            "tf32": "off" if tf32 is False else "torch defaults",
            "images": which,
            "images_per_s": {
                str(b): len(sets[which]) / statistics.median(times[(name, b)])
                for b in settings.batch_sizes
                if (name, b) in times
            },
            "peak_gpu_memory_gib": peaks.get(name),
        }
        reference = references[which]
        if name in outputs:
            row["segments_per_image"] = statistics.mean(len(r.segments) for r in outputs[name])
        if name != reference and name in outputs and reference in outputs and which in yardsticks:
            row.update(_gated(name, outputs[reference], outputs[name], yardsticks[which], floor))
        result_rows[name] = row
    return {
        "processed_sizes": {which: sorted({im.processed_size for im in images}) for which, images in sets.items()},
        "weights": weights or "synthetic",
        "gate_floor": floor,
        "yardsticks": {which: _yardstick_record(outputs[references[which]], yardsticks[which]) for which in yardsticks},
        "rows": result_rows,
        "note": note,
    }


def bytes_step(deadline: float, *, settings: Settings, device: torch.device, weights: str | None, tmp: Path) -> dict:
    from bench.variants import GpuBusy, _one_pass

    base = InferenceConfig(
        min_size=settings.min_size, max_size=int(settings.min_size * 1333 / 800), channels_last=False
    )
    files = [p.read_bytes() for p in write_photo_set(tmp / "bytes", settings.images)]
    model = _build_model(weights)
    set_tf32(False)
    b = settings.batch_sizes[0]
    predictors = {
        "CPU decode (Pillow, one core)": PanopticPredictor(model, base, device),
        "device_preprocess": PanopticPredictor(model, replace(base, device_preprocess=True), device),
    }
    for predictor in predictors.values() if settings.warm_up else []:
        _one_pass(predictor, files[:b], b, device)
    rows: dict[str, dict] = {}
    outputs: dict[str, list[PanopticResult]] = {}
    note = ""
    for r in range(settings.repeats):
        for name, predictor in predictors.items():
            if Budget.left(deadline) <= 0:
                note = f"cut in repeat {r + 1} of {settings.repeats}: the step's share ran out"
                break
            with GpuBusy(device) as busy:
                total, model_s, results = _one_pass(predictor, files, b, device)
            row = rows.setdefault(name, {"total_s": [], "model_s": [], "gpu_busy_percent": []})
            row["total_s"].append(total)
            row["model_s"].append(model_s)
            if busy.percent is not None:
                row["gpu_busy_percent"].append(busy.percent)
            outputs[name] = results
    n = len(files)
    out = {}
    for name, row in rows.items():
        total, model_s = statistics.median(row["total_s"]), statistics.median(row["model_s"])
        out[name] = {
            "images_per_s": n / total,
            "model_images_per_s": n / model_s,
            "prepare_ms_per_image": 1e3 * (total - model_s) / n,
            "gpu_busy_percent": statistics.mean(row["gpu_busy_percent"]) if row["gpu_busy_percent"] else None,
        }
    cpu_name = "CPU decode (Pillow, one core)"
    if cpu_name in outputs and "device_preprocess" in outputs and Budget.left(deadline) > 0:
        yardstick = _noisy(predictors[cpu_name], _decoded_bytes(files, base), b)
        out["device_preprocess"].update(
            _gated(
                "device_preprocess",
                outputs[cpu_name],
                outputs["device_preprocess"],
                yardstick,
                0.99 if weights else 0.0,
            )
        )
    return {"batch_size": b, "images": n, "rows": out, "note": note}


def _decoded_bytes(files: list[bytes], config: InferenceConfig) -> list[PreparedImage]:
    from bench.variants import prepare_bytes

    return prepare_bytes(files, config, torch.device("cpu"))


def compile_step(settings: Settings, device: torch.device, weights: str | None, left_s: float, partial: Path) -> dict:
    """Runs in its own process (`_subprocess_step`): dynamo's caches and compiled code stay out of the rest.
    Writes what it has measured so far to ``partial`` after every batch (a compile can outlast the share)."""
    deadline = time.monotonic() + left_s - SUBPROCESS_MARGIN_S
    with tempfile.TemporaryDirectory(prefix="pfb-compile-") as tmp:
        base = InferenceConfig(
            min_size=settings.min_size, max_size=int(settings.min_size * 1333 / 800), channels_last=False
        )
        uniform = _decoded(write_photo_set(Path(tmp) / "uniform", settings.images), base)
        mixed = _decoded(write_mixed_set(Path(tmp) / "mixed", settings.mixed_images), base)
    set_tf32(False)
    model = _build_model(weights)
    b = settings.batch_sizes[0]
    eager = PanopticPredictor(model, base, device)
    compiled = PanopticPredictor(copy.deepcopy(model), base, device)
    compiled.model.detr.compile(backend=settings.compile_backend, dynamic=False)
    shapes: list[str] = []  # input shape of every forward of the compiled model, "BxCxHxW"
    compiled.model.register_forward_pre_hook(lambda _m, args: shapes.append("x".join(map(str, args[0].shape))))
    record: dict = {"backend": settings.compile_backend, "batch_size": b, "note": "", "uniform_shapes": {}}

    def warm(images: list[PreparedImage], predictor: PanopticPredictor, first_call: dict[str, float]) -> None:
        """One pass in batches; the first call with a new input shape (= a compile) is timed into first_call."""
        for start in range(0, len(images), b):
            if time.monotonic() > deadline:
                record["note"] = "cut while compiling: the step's share ran out"
                return
            known, seen = set(shapes), len(shapes)
            _sync(device)
            t0 = time.perf_counter()
            predictor.predict_prepared(images[start : start + b])
            _sync(device)
            for shape in shapes[seen:]:
                if shape not in known:
                    first_call.setdefault(shape, time.perf_counter() - t0)
            record["compiled_shapes"] = len(set(shapes))
            partial.write_text(json.dumps(record))

    partial.write_text(json.dumps({**record, "note": "the first shape did not finish compiling"}))
    warm(uniform, compiled, record["uniform_shapes"])
    _passes(eager, uniform[:b], b)  # eager warm-up
    eager_s, compiled_s = [], []
    eager_out: list[PanopticResult] = []
    compiled_out: list[PanopticResult] = []
    for _ in range(settings.repeats if record["uniform_shapes"] and not record["note"] else 0):
        if time.monotonic() > deadline:
            record["note"] = "cut: the step's share ran out"
            break
        seconds, eager_out = _timed(eager, uniform, b, device)
        eager_s.append(seconds)
        seconds, compiled_out = _timed(compiled, uniform, b, device)
        compiled_s.append(seconds)
    if compiled_s:
        n = len(uniform)
        record["uniform"] = {
            "eager_images_per_s": n / statistics.median(eager_s),
            "compiled_images_per_s": n / statistics.median(compiled_s),
            "speedup": statistics.median(eager_s) / statistics.median(compiled_s),
            **_gated("torch.compile", eager_out, compiled_out, _noisy(eager, uniform, b), 0.0),
        }
        partial.write_text(json.dumps(record))
    if time.monotonic() < deadline and not record["note"]:  # bucketed shapes: one compile per (batch, canvas)
        record["bucketed_mixed_shapes"] = {}
        bucketed = PanopticPredictor(compiled.model, replace(base, batch_mode="bucketed"), device)
        warm(mixed, bucketed, record["bucketed_mixed_shapes"])
    else:
        record["note"] = record["note"] or "bucketed shapes skipped: the step's share ran out"
    record["compiled_shapes"] = len(set(shapes))
    record["dynamo_counters"] = _dynamo_counters()
    config = torch._dynamo.config  # past this many recompiles of one frame dynamo falls back to eager
    record["recompile_limit"] = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", None))
    return record


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles")}
    except Exception:  # private API: report nothing rather than fail the step
        return {}


def job_step(settings: Settings, device: torch.device, weights: str | None, left_s: float, partial: Path) -> dict:
    """Runs in its own process with its own local Ray (`bench.local_ray`), through `run_job`'s public interface.

    The committed parts are the job's clock (README "Output"): each ``images/part-*.parquet`` appears whole
    (written by a write task under a hidden name, then renamed), so its modification time is when its rows
    were committed. The last part holds the rest and often lands with the one before it, so the steady rate is
    taken from the first to the second-to-last part (needs >= 3 parts).
    """
    import pyarrow.parquet as pq

    from bench.local_ray import local_ray
    from bench.variants import GpuBusy
    from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
    from pipeline.run import run_job

    partial.write_text(json.dumps({"images": settings.job_images, "note": "the job did not finish in its share"}))
    with tempfile.TemporaryDirectory(prefix="pfb-gpu-job-") as tmp:
        folder = Path(tmp) / "images"
        write_photo_set(folder, settings.job_images)
        output = Path(tmp) / "out"
        config = JobConfig(
            input=InputConfig((str(folder),)),
            output=str(output),
            model=ModelSpec(weights=weights or "synthetic"),
            inference=InferenceConfig(min_size=settings.min_size, max_size=int(settings.min_size * 1333 / 800)),
            resources=ResourceConfig(  # one actor: one GPU's job (on CPU, not the default CPU layout)
                batch_size=settings.batch_sizes[0],
                device=device.type,
                rows_per_file=settings.job_rows_per_file,
                max_actors=1,
            ),
        )
        with local_ray(num_cpus=max(4, os.cpu_count() or 4)) as ray_info:
            start_wall, start = time.time(), time.perf_counter()
            with GpuBusy(device) as busy:
                summary = run_job(config, show_progress=False)
            total = time.perf_counter() - start
        arrivals = sorted(
            (path.stat().st_mtime - start_wall, pq.read_metadata(path).num_rows)
            for path in (output / "images").glob("part-*.parquet")
        )  # (seconds since the job's start, rows)
    window = arrivals[:-1]  # the last part arrives with the one before it
    steady_rows = sum(rows for _, rows in window[1:])
    steady_s = window[-1][0] - window[0][0] if len(window) >= 2 else 0.0
    steady = steady_rows / steady_s if steady_s > 0 else None
    return {
        "images": settings.job_images,
        "images_ok": summary.images_ok,
        "batch_size": settings.batch_sizes[0],
        "rows_per_file": settings.job_rows_per_file,
        "ray_init_s": ray_info["ray_init_s"],
        "total_s": total,
        "startup_s": arrivals[0][0] if arrivals else None,
        "parts": len(arrivals),
        "steady_images_per_s": steady,
        "overall_images_per_s": settings.job_images / total,
        "gpu_busy_percent": busy.percent,
        "arrivals": arrivals,
        "note": "" if steady else "too few parts for a steady rate",
        "left_s": left_s,
    }


SUBPROCESS_STEPS = {"compile": compile_step, "job": job_step}
