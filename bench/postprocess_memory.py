"""Peak memory of an image's steps at its original size: decode, the panoptic merge (resize + areas and boxes),
the prediction row and RLE, each in a fresh process, at 12 MP and at the default ``--max-pixels`` (~89 MP).

Each step runs once small (so that the code it runs is loaded), then its peak resident memory is measured from
a reset high-water mark (``/proc/self/clear_refs``, Linux) over the resident memory just before it: what the
step itself adds, its inputs excluded. glibc's dynamic mmap threshold is pinned so that freed blocks go back to
the system and one step's leftovers cannot hide the next one's peak.

    .venv/bin/python -m bench.postprocess_memory                      # this tree
    PYTHONPATH=/path/to/old/tree .venv/bin/python bench/postprocess_memory.py   # the same on another tree

The model's part is left out: mask logits are made up (``QUERIES`` smooth random queries at stride 4 of the
processed size), as only the original size matters here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

SIZES = {"12MP": (3000, 4000), "89MP": (8192, 10922)}  # (height, width); 89,473,024 <= --max-pixels 89,478,485
STEPS = ("decode", "merge", "predictions", "rle")
QUERIES = 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measured(run) -> int:
    """Bytes ``run()`` adds at its peak over the resident memory before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) * 1024


def _one(step: str, size: tuple[int, int]) -> int:
    """The peak bytes of ``step`` at ``size``, in this process."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from model.config import InferenceConfig
    from model.panoptic import merge_panoptic
    from model.preprocess import processed_size
    from pipeline.inputs.decode import decode_image
    from pipeline.segmenting.prediction_tables import encode_results, prediction_table

    torch.set_num_threads(1)
    inference = InferenceConfig()

    def inputs(height: int, width: int):
        processed = processed_size(height, width)
        h4, w4 = -(-processed[0] // 4), -(-processed[1] // 4)
        rng = np.random.default_rng(0)
        coarse = torch.from_numpy(rng.normal(0, 3, (1, QUERIES, h4 // 16 + 2, w4 // 16 + 2)).astype(np.float32))
        logits = F.interpolate(coarse, size=(h4, w4), mode="bilinear")[0]  # [k, h4, w4]
        labels = torch.from_numpy(rng.choice([1, 3, 18, 100, 150, 184], size=QUERIES)).long()
        return processed, logits, labels

    def merged(height: int, width: int):
        processed, logits, labels = inputs(height, width)
        scores = torch.full((QUERIES,), 0.9)
        return merge_panoptic(scores, labels, logits, processed_size=processed, original_size=(height, width))

    def batch(height: int, width: int) -> dict[str, np.ndarray]:
        return {
            "image_id": np.array(["x"], dtype=object), "source": np.array(["x"], dtype=object),
            "member": np.array([None], dtype=object), "input_size": np.array([None], dtype=object),
            "input_version": np.array([None], dtype=object), "width": np.array([width]),
            "height": np.array([height]),
        }  # fmt: skip

    def jpeg(height: int, width: int) -> bytes:
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        return out.getvalue()

    def prepared(height: int, width: int):
        if step == "decode":
            data = jpeg(height, width)
            return lambda: decode_image(data, max_pixels=10**9, inference=inference)
        if step == "merge":
            processed, logits, labels = inputs(height, width)
            scores = torch.full((QUERIES,), 0.9)
            return lambda: merge_panoptic(
                scores, labels, logits, processed_size=processed, original_size=(height, width)
            )
        rows = batch(height, width)
        if step == "predictions":
            result = merged(height, width)
            return lambda: prediction_table(rows, {0: result}, errors=[""], retryable=[False])
        table = prediction_table(rows, {0: merged(height, width)}, errors=[""], retryable=[False])
        return lambda: encode_results(table)

    prepared(300, 400)()  # load the code the step runs
    return _measured(prepared(*size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--one", nargs=2, metavar=("STEP", "SIZE"), help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], SIZES[args.one[1]])))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
    print("| size | " + " | ".join(args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for size in args.sizes:
        cells = []
        for step in args.steps:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", step, size],
                env=env, check=True, capture_output=True, text=True,
            )  # fmt: skip
            cells.append(f"{json.loads(out.stdout.strip().splitlines()[-1]) / 2**20:.0f} MiB")
        print(f"| {size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
