"""Each speed switch of the model path, side by side in one process, with its effect on the output.

    python -m bench.variants [--device auto] [--images 16] [--min-size 512] [--batch-size 4] [--repeats 2]

Variants (`model.predictor.InferenceConfig`): the fp32 reference path (contiguous layout), then bf16 / fp16
autocast, channels-last, bucketed batching and ``device_preprocess`` (JPEG decode + EXIF rotation + resize on
the model's device, `pipeline.inputs.device_decode`) alone and combined. Every variant runs on the same JPEG files
(`bench.inputs.write_photo_set`, all one size) from bytes to panoptic maps, so the CPU path's Pillow
decode + resize (one core, as a decode worker does it) is counted against the device path's; model-only
time is reported apart. Passes are interleaved across variants (shuffled each repeat), median kept; on
CUDA each pass ends with a synchronize. fp32 runs with TF32 off, as the reference.

Agreement with the fp32 path (`bench.agreement`): share of pixels in matching segments (segments matched by
overlap within a category) and share of images with equal segment lists. The row "fp32, input ±0.5 grey
level" is no switch: the fp32 path with seeded ±0.5 grey-level noise on its input (`bench.agreement.input_noise`),
how far these weights' outputs move under noise alone — the gate's yardstick; each switch's verdict
(`bench.agreement.judge`) is printed under the table.

Synthetic weights (`model.synthetic_weights`): timings are real; agreement figures measure how far each
switch moves *these* weights' outputs, which amplify rounding far more than a trained model does (see
BENCHMARKS.md): a low agreement here is a warning to check on real weights, not a verdict.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.agreement import Agreement, agreement, input_noise, judge
from bench.inputs import write_photo_set
from model.checkpoint import build_model
from model.config import VARIANTS
from model.panoptic import PanopticResult
from model.predictor import InferenceConfig, PanopticPredictor, PreparedImage
from model.synthetic_weights import synthetic_state_dict
from pipeline.inputs.decode import check_for_device, decode_image
from pipeline.inputs.device_decode import prepare_encoded

MAX_PIXELS = 89_478_485


PERTURBED = "fp32, input ±0.5 grey level"  # not a switch: how much these weights move under input noise


def variants(base: InferenceConfig, device: torch.device) -> dict[str, InferenceConfig]:
    """Name -> configuration of every variant; ``base`` is the fp32 reference (its layout is forced contiguous)."""
    base = replace(base, channels_last=False)
    out = {
        "fp32": base,
        PERTURBED: base,
        "bf16": replace(base, precision="bf16"),
        "channels_last": replace(base, channels_last=True),
        "bucketed": replace(base, batch_mode="bucketed"),
        "device_preprocess": replace(base, device_preprocess=True),
        "bf16+channels_last+device_preprocess": replace(
            base, precision="bf16", channels_last=True, device_preprocess=True
        ),
    }
    if device.type == "cuda":
        out["fp16"] = replace(base, precision="fp16")
    return out


def prepare_bytes(files: list[bytes], config: InferenceConfig, device: torch.device) -> list[PreparedImage]:
    """JPEG bytes -> prepared images: Pillow on this thread, or (``device_preprocess``) decoded on ``device``."""
    if not config.device_preprocess:
        prepared = []
        for data in files:
            pixels, width, height = decode_image(data, max_pixels=MAX_PIXELS, inference=config)
            prepared.append(PreparedImage(pixels, (height, width)))
        return prepared
    headers = [check_for_device(data, max_pixels=MAX_PIXELS, inference=config) for data in files]
    assert all(h is not None for h in headers), "bench files are plain JPEGs"
    images = prepare_encoded(files, [h[0] for h in headers], inference=config, device=device)  # type: ignore[index]
    assert all(isinstance(i, PreparedImage) for i in images)
    return images  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuBusy:
    """Samples `torch.cuda.utilization` (NVML: needs the ``nvidia-ml-py`` package) every 20 ms in a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(torch.cuda.utilization(self.device))

    def __enter__(self) -> GpuBusy:
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception:  # no NVML here: report None
                return self
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def percent(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def _one_pass(
    predictor: PanopticPredictor, files: list[bytes], batch_size: int, device: torch.device, *, perturb: bool = False
) -> tuple[float, float, list[PanopticResult]]:
    """(seconds from bytes to results, seconds in predict_prepared, results) over all files."""
    results: list[PanopticResult] = []
    total = model = 0.0
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        sync(device)
        t0 = time.perf_counter()
        prepared = prepare_bytes(chunk, predictor.config, device)
        sync(device)
        t1 = time.perf_counter()
        if perturb:
            with input_noise(predictor.model, seed=start):
                results += predictor.predict_prepared(prepared)
        else:
            results += predictor.predict_prepared(prepared)
        sync(device)
        t2 = time.perf_counter()
        total += t2 - t0
        model += t2 - t1
    return total, model, results


def run(
    *, device: str, images: int, min_size: int, batch_size: int, repeats: int, only: list[str] | None = None
) -> dict:
    """Every variant (or those named in ``only``; fp32 and the yardstick always run) -> the result record."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    base = InferenceConfig(min_size=min_size, max_size=int(min_size * 1333 / 800))
    config = VARIANTS["detr-r50-panoptic"].config
    model = build_model(config, synthetic_state_dict(config))
    with tempfile.TemporaryDirectory(prefix="pfb-variants-") as tmp:
        files = [p.read_bytes() for p in write_photo_set(Path(tmp), images)]
    chosen = {name: cfg for name, cfg in variants(base, dev).items() if not only or name in {*only, "fp32", PERTURBED}}
    predictors = {name: PanopticPredictor(copy.deepcopy(model), cfg, dev) for name, cfg in chosen.items()}
    for predictor in predictors.values():  # warm-up: cudnn autotuning, allocator, first-call costs
        _one_pass(predictor, files[:batch_size], batch_size, dev)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in predictors}
    busy: dict[str, list[float]] = {name: [] for name in predictors}
    outputs: dict[str, list[PanopticResult]] = {}
    order = list(predictors)
    for r in range(repeats):
        random.shuffle(order)
        print(f"[bench.variants] repeat {r + 1} of {repeats}", file=sys.stderr, flush=True)
        for name in order:
            with GpuBusy(dev) as gpu:
                total, model_s, results = _one_pass(predictors[name], files, batch_size, dev, perturb=name == PERTURBED)
            timings[name].append((total, model_s))
            if gpu.percent is not None:
                busy[name].append(gpu.percent)
            outputs[name] = results
    rows = {}
    base_total = statistics.median(t for t, _ in timings["fp32"])
    yardstick = agreement(outputs["fp32"], outputs[PERTURBED])
    for name in predictors:
        total = statistics.median(t for t, _ in timings[name])
        model_s = statistics.median(m for _, m in timings[name])
        agree = agreement(outputs["fp32"], outputs[name])
        rows[name] = {
            "images_per_s": images / total,
            "model_images_per_s": images / model_s,
            "speedup_vs_fp32": base_total / total,
            **agreement_record(agree),
            "gate": None if name in ("fp32", PERTURBED) else judge(name, agree, yardstick)._asdict(),
            "segments_per_image": statistics.mean(len(r.segments) for r in outputs[name]),
            "gpu_busy_percent": statistics.mean(busy[name]) if busy[name] else None,
        }
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch_threads": torch.get_num_threads(),
        "images": images,
        "processed_size": list(prepare_bytes(files[:1], base, dev)[0].processed_size),
        "batch_size": batch_size,
        "repeats": repeats,
        "variants": rows,
    }


def agreement_record(agree: Agreement) -> dict:
    """The JSON fields of an `Agreement`."""
    return {
        "pixels_in_matching_segments": agree.pixels,
        "pixels_in_matching_segments_min": agree.pixels_min,
        "same_segment_lists": agree.same_segment_lists,
    }


def table(result: dict) -> str:
    """Markdown table of `run`'s variants, then one gate verdict per switch."""
    lines = [
        "| variant | images/s (bytes → maps) | × fp32 | model-only images/s | pixels in matching segments "
        "| equal segment lists | gate | GPU busy |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, row in result["variants"].items():
        gate = "–" if row["gate"] is None else ("pass" if row["gate"]["passed"] else "fail")
        busy = "–" if row["gpu_busy_percent"] is None else f"{row['gpu_busy_percent']:.0f} %"
        lines.append(
            f"| {name} | {row['images_per_s']:.2f} | {row['speedup_vs_fp32']:.2f} | {row['model_images_per_s']:.2f} "
            f"| {100 * row['pixels_in_matching_segments']:.1f} % "
            f"(min {100 * row['pixels_in_matching_segments_min']:.1f} %) "
            f"| {100 * row['same_segment_lists']:.0f} % | {gate} | {busy} |"
        )
    lines.append("")
    lines += [f"- {row['gate']['message']}" for row in result["variants"].values() if row["gate"] is not None]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--min-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="these variants only (fp32 and the yardstick always run)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    from bench.machine import describe

    result = run(
        device=args.device,
        images=args.images,
        min_size=args.min_size,
        batch_size=args.batch_size,
        repeats=args.repeats,
        only=args.only,
    )
    report = {
        "command": "python -m bench.variants " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe(),
        **result,
    }
    print(json.dumps(report, indent=2))
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
