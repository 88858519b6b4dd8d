"""CPU time and peak memory per image: our model + merge vs Hugging Face DetrForSegmentation + its post-processing.

Same synthetic R50 weights (through our key table), same 800×1066 image, one run, each measurement in its own
subprocess so that peak RSS is clean. The number of kept queries is forced to K by choosing the threshold
between the K-th and (K+1)-th best object scores (both implementations get that threshold).

    python -m bench.model_vs_hf [--kept 10 30 0] [--repeats 3] [--also-contiguous] [--out PATH.json]

(--kept 0 means the default threshold 0.85.) "ours" runs `PanopticPredictor` with its defaults, i.e. the
device's default memory layout (`model.predictor.channels_last_default`); ``--also-contiguous`` measures ours
with ``channels_last=False`` too, in the same run (own subprocess, between ours and HF), for the layout's ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HEIGHT, WIDTH = 800, 1066


def _image() -> torch.Tensor:
    from model.synthetic_weights import calibration_image

    g = torch.Generator().manual_seed(0)
    base = calibration_image(HEIGHT, WIDTH).int()
    return (base + torch.randint(-25, 26, base.shape, generator=g)).clamp(0, 255).to(torch.uint8)  # [3, H, W]


def _threshold_for(kept: int) -> float:
    """A threshold that keeps exactly ``kept`` queries of our model on the bench image (0 -> 0.85)."""
    if kept == 0:
        return 0.85
    from model.checkpoint import build_model
    from model.config import VARIANTS
    from model.synthetic_weights import synthetic_state_dict
    from model.tensor_preprocess import normalize

    config = VARIANTS["detr-r50-panoptic"].config
    model = build_model(config, synthetic_state_dict(config))
    pixels = normalize(_image())[None]
    with torch.inference_mode():
        logits = model.detr(pixels, torch.zeros(1, HEIGHT, WIDTH, dtype=torch.bool)).class_logits[0]
    scores, labels = logits.softmax(-1).max(-1)
    eligible = scores[labels != config.no_object_class].sort(descending=True).values
    if len(eligible) <= kept:
        raise SystemExit(f"only {len(eligible)} object queries on the bench image; cannot keep {kept}")
    return float((eligible[kept - 1] + eligible[kept]) / 2)


def _measure(which: str, threshold: float, repeats: int) -> dict:
    """One implementation's median seconds per image and peak RSS: "ours", "ours_contiguous" or "hf"."""
    from PIL import Image

    from model.checkpoint import build_model, to_hf_layout
    from model.config import VARIANTS
    from model.synthetic_weights import synthetic_state_dict

    torch.set_num_threads(torch.get_num_threads())
    config = VARIANTS["detr-r50-panoptic"].config
    state = synthetic_state_dict(config)
    image = Image.fromarray(_image().permute(1, 2, 0).numpy())
    if which in ("ours", "ours_contiguous"):
        from model.predictor import InferenceConfig, PanopticPredictor

        layout = {"ours": None, "ours_contiguous": False}[which]  # None: the device's default layout
        predictor = PanopticPredictor(
            build_model(config, state), InferenceConfig(threshold=threshold, channels_last=layout)
        )

        def run() -> int:
            return len(predictor.predict([image])[0].segments)

        def kept() -> int:
            from model.predictor import prepare
            from model.tensor_preprocess import normalize

            p = prepare(image, predictor.config)
            x = normalize(torch.from_numpy(p.pixels).permute(2, 0, 1))[None]
            with torch.inference_mode():
                return int(
                    predictor.model(x, torch.zeros(1, *x.shape[-2:], dtype=torch.bool), threshold=threshold).keep.sum()
                )
    else:
        from transformers import DetrConfig, DetrForSegmentation, DetrImageProcessorPil, ResNetConfig

        hf_config = DetrConfig(
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            num_labels=250,
            backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]),
        )
        model = DetrForSegmentation(hf_config).eval()
        model.load_state_dict(to_hf_layout(state), strict=True)
        processor = DetrImageProcessorPil()

        def run() -> int:
            with torch.inference_mode():
                inputs = processor(images=image, return_tensors="pt")
                outputs = model(**inputs)
                result = processor.post_process_panoptic_segmentation(
                    outputs, threshold=threshold, target_sizes=[(HEIGHT, WIDTH)]
                )[0]
            return len(result["segments_info"])

        def kept() -> int:
            return -1

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()  # warm-up (also the peak-memory measurement)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        segments = run()
        times.append(time.perf_counter() - start)
    return {
        "which": which,
        "channels_last": predictor.channels_last if which != "hf" else None,
        "threshold": threshold,
        "seconds_per_image": statistics.median(times),
        "best_seconds_per_image": min(times),  # the least disturbed run, for shared machines
        "all_seconds": times,
        "segments": segments,
        "kept_queries": kept(),
        "peak_rss_gib": peak / 2**20,
        "inference_rss_increase_gib": (peak - before) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kept", type=int, nargs="+", default=[0, 10, 30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/model_vs_hf.json")
    parser.add_argument("--also-contiguous", action="store_true", help="also ours with channels_last=False")
    parser.add_argument("--one", choices=["ours", "ours_contiguous", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(args.one, args.threshold, args.repeats)))
        return 0
    rows = []
    for kept in args.kept:
        threshold = _threshold_for(kept)
        pair = {}
        for which in ("ours", "ours_contiguous", "hf") if args.also_contiguous else ("ours", "hf"):
            cmd = [
                sys.executable,
                "-m",
                "bench.model_vs_hf",
                "--one",
                which,
                "--threshold",
                str(threshold),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            pair[which] = json.loads(out)
        row = {
            "kept_requested": kept,
            **pair,
            "speedup": pair["hf"]["seconds_per_image"] / pair["ours"]["seconds_per_image"],
            "speedup_best": pair["hf"]["best_seconds_per_image"] / pair["ours"]["best_seconds_per_image"],
        }
        if "ours_contiguous" in pair:
            row["speedup_contiguous"] = pair["hf"]["seconds_per_image"] / pair["ours_contiguous"]["seconds_per_image"]
            row["channels_last_ratio"] = (
                pair["ours_contiguous"]["seconds_per_image"] / pair["ours"]["seconds_per_image"]
            )
        rows.append(row)
        print(
            f"kept={pair['ours']['kept_queries']:>3}  ours {pair['ours']['seconds_per_image']:.2f} s "
            f"({pair['ours']['peak_rss_gib']:.2f} GiB peak, channels_last={pair['ours']['channels_last']})  "
            f"HF {pair['hf']['seconds_per_image']:.2f} s "
            f"({pair['hf']['peak_rss_gib']:.2f} GiB peak)  speed-up {row['speedup']:.1f}x"
            + (
                f"  [ours contiguous {pair['ours_contiguous']['seconds_per_image']:.2f} s, "
                f"{row['speedup_contiguous']:.1f}x]"
                if "ours_contiguous" in pair
                else ""
            ),
            flush=True,
        )
    from bench.machine import describe

    result = {
        "command": "python -m bench.model_vs_hf " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "machine_record": describe(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "image": [HEIGHT, WIDTH],
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
