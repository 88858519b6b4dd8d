"""Where an image's time goes: each pipeline stage's pure function timed in-process, one image at a time.

Stages, in pipeline order: read (`pipeline.inputs.storage.read_bytes`), decode + resize
(`pipeline.inputs.decode.decode_image`), normalise + pad (`model.preprocess`), the model forward split by forward
hooks into backbone, transformer (incl. input projection, class and box heads: the rest of the forward),
box attention + mask head, then merge (`model.panoptic.merge_panoptic`, after the predictor's stride-4
crop), RLE (`pipeline.segmenting.rle.encode_segments`), result rows
(`pipeline.segmenting.prediction_tables.prediction_table` +
`encode_results`, which encodes the RLE a second time, as the pipeline's tables do) and write
(`pipeline.exactly_once.parts.split_results` + two zstd Parquet files, timed once for all images and divided). Medians
per image over images × repeats.

The first image is also run through `PanopticPredictor.predict_prepared` and must give the same panoptic
map: the stage split is the predictor's path, not a look-alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.panoptic import merge_panoptic
from model.predictor import PanopticPredictor
from model.tensor_preprocess import normalize, pad_batch
from pipeline.config import InputConfig
from pipeline.exactly_once.parts import split_results
from pipeline.inputs.decode import decode_image
from pipeline.inputs.storage import read_bytes
from pipeline.segmenting.prediction_tables import encode_results, prediction_table
from pipeline.segmenting.rle import encode_segments

STAGES = (
    "read",
    "decode+resize",
    "normalize+pad",
    "backbone",
    "transformer+heads",
    "mask head",
    "merge",
    "rle",
    "rows (incl. rle again)",
    "write",
)


class _HookTimer:
    """Accumulates the wall time of chosen submodules' forwards (pre-hook to hook)."""

    def __init__(self, modules: dict[str, list[torch.nn.Module]]) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[int, float] = {}
        self._handles = []
        for name, mods in modules.items():
            for m in mods:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post(name)))

    def _pre(self, module: torch.nn.Module, _args: object) -> None:
        self._started[id(module)] = time.perf_counter()

    def _post(self, name: str):
        def hook(module: torch.nn.Module, _args: object, _out: object) -> None:
            self.seconds[name] += time.perf_counter() - self._started.pop(id(module))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def run(predictor: PanopticPredictor, paths: list[Path], *, repeats: int = 1) -> dict:
    """Per-stage median seconds per image over ``paths`` × ``repeats`` (see the module docstring)."""
    model = predictor.model
    timer = _HookTimer({"backbone": [model.detr.backbone[0]], "mask head": [model.bbox_attention, model.mask_head]})
    times: dict[str, list[float]] = defaultdict(list)
    kept: list[int] = []
    tables: list[pa.Table] = []
    try:
        for r in range(repeats):
            for i, path in enumerate(paths):
                t = _one_image(predictor, path, timer, kept, check=(r == 0 and i == 0))
                for name, s in t.items():
                    if name != "table":
                        times[name].append(s)
                if r == 0:
                    tables.append(t["table"])
    finally:
        timer.remove()
    results = pa.concat_tables(tables)
    write_s = []
    with tempfile.TemporaryDirectory(prefix="pfb-write-") as tmp:
        for _ in range(max(3, repeats)):
            start = time.perf_counter()
            images, segments = split_results(results, run_id="bench")
            pq.write_table(segments, f"{tmp}/segments.parquet", compression="zstd")
            pq.write_table(images, f"{tmp}/images.parquet", compression="zstd")
            write_s.append((time.perf_counter() - start) / results.num_rows)
    times["write"] = write_s
    median = {name: statistics.median(times[name]) for name in STAGES}
    total = sum(median.values())
    return {
        "images": len(paths),
        "repeats": repeats,
        "kept_queries_per_image": statistics.mean(kept),
        "segments_per_image": results.column("segments").combine_chunks().value_lengths().to_numpy().mean().item(),
        "seconds_per_image": median,
        "total_seconds_per_image": total,
        "share": {name: s / total for name, s in median.items()},
    }


@torch.inference_mode()
def _one_image(
    predictor: PanopticPredictor, path: Path, timer: _HookTimer, kept: list[int], *, check: bool
) -> dict[str, float | pa.Table]:
    t: dict[str, float | pa.Table] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        t[name] = now - clock
        clock = now

    data = read_bytes(str(path))
    lap("read")
    pixels, width, height = decode_image(data, max_pixels=InputConfig.max_pixels, inference=predictor.config)
    lap("decode+resize")
    h, w = pixels.shape[:2]
    image = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)  # [3, h, w] uint8
    batch, padding_mask = pad_batch([normalize(image)], (h, w))  # [1, 3, h, w], [1, h, w]
    if predictor.channels_last:  # as `predict_prepared` does
        batch = batch.contiguous(memory_format=torch.channels_last)
    lap("normalize+pad")
    timer.seconds.clear()
    out = predictor.model(batch, padding_mask, threshold=predictor.config.threshold)
    lap("model")
    model_s = t.pop("model")
    t["backbone"] = timer.seconds["backbone"]
    t["mask head"] = timer.seconds["mask head"]
    t["transformer+heads"] = model_s - t["backbone"] - t["mask head"]
    stride4 = (-(-h // 4), -(-w // 4))
    queries = out.query_index  # [k], one image
    mask_logits = out.mask_logits[:, : stride4[0], : stride4[1]].float()  # [k, h/4, w/4]
    result = merge_panoptic(
        out.scores[0, queries],
        out.labels[0, queries],
        mask_logits,
        processed_size=(h, w),
        original_size=(height, width),
    )
    lap("merge")
    ids = [s.id for s in result.segments]
    encode_segments(result.id_map, ids)
    lap("rle")
    columns = {
        "image_id": np.array([str(path)], dtype=object),
        "source": np.array([str(path)], dtype=object),
        "member": np.array([None], dtype=object),
        "input_size": np.array([len(data)], dtype=object),
        "input_version": np.array([None], dtype=object),
        "width": np.array([width], dtype=np.int32),
        "height": np.array([height], dtype=np.int32),
    }
    table = encode_results(prediction_table(columns, {0: result}, errors=[""], retryable=[False]))
    lap("rows (incl. rle again)")
    t["table"] = table
    kept.append(len(queries))
    if check:
        from model.predictor import PreparedImage

        reference = predictor.predict_prepared([PreparedImage(pixels, (height, width))])[0]
        if not np.array_equal(reference.id_map, result.id_map) or reference.segments != result.segments:
            raise AssertionError(f"stage-by-stage result differs from predict_prepared on {path}")
    return t
