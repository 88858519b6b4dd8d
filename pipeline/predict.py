"""Segmentation stage: the GPU (or CPU) actor that hosts the model and returns result rows.

`PanopticSegmenter` is a callable class for ``map_batches(..., compute=ActorPoolStrategy(...))``: each
actor loads the weights itself from the weights URI (cached on the node), once, in ``__init__`` — the
model never travels through the object store. A batch of decoded images of any sizes goes through
`PanopticPredictor` (grouped by canvas, so results do not depend on batch composition), each panoptic map
is encoded to COCO RLE in one pass, and one row per image comes back with its segments nested.

A CUDA out-of-memory error on a batch retries the two halves separately, down to one image; an image
that still does not fit becomes an error row.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from model.categories import category_name
from model.checkpoint import build_model, read_state_dict
from model.config import get_variant
from model.panoptic import PanopticResult, Segment
from model.predictor import InferenceConfig, PanopticPredictor, PreparedImage
from model.synthetic_weights import synthetic_state_dict
from pipeline.device_decode import prepare_encoded
from pipeline.rle import encode_segments
from pipeline.schema import STATUS_ERROR, STATUS_OK

log = logging.getLogger(__name__)

SYNTHETIC_WEIGHTS = "synthetic"

SEGMENT_STRUCT = pa.struct(
    [
        ("segment_id", pa.int32()),
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("isthing", pa.bool_()),
        ("score", pa.float32()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.int32())),
        ("rle", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    ]
)
RESULT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("segments", pa.list_(SEGMENT_STRUCT)),
    ]
)


def pick_device(device: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """``auto``: CUDA when this process sees a GPU, else CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but this worker sees no CUDA device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_weights(variant: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict for ``weights``: a URI, or "synthetic" for the deterministic demo weights."""
    if weights == SYNTHETIC_WEIGHTS:
        return synthetic_state_dict(get_variant(variant).config)
    return read_state_dict(weights)


class PanopticSegmenter:
    """Ray Data callable class: decoded image rows in, result rows (segments nested) out."""

    def __init__(
        self,
        *,
        variant: str,
        weights: str,
        inference: InferenceConfig,
        device: Literal["auto", "cpu", "cuda"],
        encode_rle: bool = True,
    ) -> None:
        self.encode_rle = encode_rle  # False: id maps go out unencoded, for `encode_results` on CPU workers
        self.device = pick_device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model = build_model(get_variant(variant).config, load_weights(variant, weights))
        self.predictor = PanopticPredictor(model, inference, self.device)
        log.info("segmenter ready: %s on %s", variant, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        n = len(batch["image_id"])
        errors = [str(e) for e in batch["error"]]
        prepared = self._prepare(batch, errors)  # row -> image, for rows without an error
        todo = sorted(prepared)
        results: dict[int, PanopticResult] = {}
        for i, result in zip(todo, self._predict_splitting_on_oom([prepared[i] for i in todo], todo, errors)):
            if result is not None:
                results[i] = result
        if not self.encode_rle:
            return _unencoded_batch(batch, results, errors)
        rows = [_result_row(batch, i, results.get(i), errors[i]) for i in range(n)]
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    def _prepare(self, batch: dict[str, np.ndarray], errors: list[str]) -> dict[int, PreparedImage]:
        """Images of the rows without an error: pixels from the decode stage, or JPEG bytes it left to this
        device (`pipeline.device_decode`); a JPEG that cannot be decoded here sets its row's error."""
        encoded = batch.get("encoded")
        pending = [i for i in range(len(errors)) if not errors[i]]
        on_device = [i for i in pending if encoded is not None and len(encoded[i])]
        prepared = {
            i: PreparedImage(batch["pixels"][i], (int(batch["height"][i]), int(batch["width"][i])))
            for i in sorted(set(pending) - set(on_device))
        }
        if on_device:
            images = prepare_encoded(
                [bytes(encoded[i]) for i in on_device],
                [int(batch["orientation"][i]) for i in on_device],
                inference=self.predictor.config,
                device=self.device,
            )
            for i, image in zip(on_device, images):
                if isinstance(image, str):
                    errors[i] = image
                else:
                    prepared[i] = image
        return prepared

    def _predict_splitting_on_oom(
        self, images: list[PreparedImage], indices: list[int], errors: list[str]
    ) -> list[PanopticResult | None]:
        if not images:
            return []
        try:
            return list(self.predictor.predict_prepared(images))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(images) == 1:
                errors[indices[0]] = "CUDA out of memory on this single image"
                return [None]
            half = len(images) // 2
            log.warning("CUDA out of memory on a batch of %d images; retrying in halves", len(images))
            return self._predict_splitting_on_oom(images[:half], indices[:half], errors) + (
                self._predict_splitting_on_oom(images[half:], indices[half:], errors)
            )


def _result_row(batch: dict[str, np.ndarray], i: int, result: PanopticResult | None, error: str) -> dict:
    width, height = int(batch["width"][i]), int(batch["height"][i])
    base = {"image_id": str(batch["image_id"][i]), "source": str(batch["source"][i])}
    if result is None:
        return {
            **base,
            "width": width or None,
            "height": height or None,
            "status": STATUS_ERROR,
            "error": error or "no result",
            "segments": [],
        }
    encoded = encode_segments(result.id_map, [s.id for s in result.segments])
    segments = [
        {
            "segment_id": s.id,
            "category_id": s.category_id,
            "category": category_name(s.category_id),
            "isthing": s.isthing,
            "score": s.score,
            "area": s.area,
            "bbox": list(s.bbox),
            "rle": {"size": [height, width], "counts": e.counts},
        }
        for s, e in zip(result.segments, encoded)
    ]
    return {**base, "width": width, "height": height, "status": STATUS_OK, "error": None, "segments": segments}


def _unencoded_batch(
    batch: dict[str, np.ndarray], results: dict[int, PanopticResult], errors: list[str]
) -> dict[str, np.ndarray]:
    """The actor's output when RLE runs on CPU workers: each row's id map ([H, W] uint8) and segments as they
    are (an empty map and no segments for error rows), with ``error`` set where there is no result."""
    n = len(batch["image_id"])
    id_maps, segments = np.empty(n, dtype=object), np.empty(n, dtype=object)
    for i in range(n):
        result = results.get(i)
        id_maps[i] = result.id_map if result is not None else np.zeros((0, 0), dtype=np.uint8)
        segments[i] = [tuple(s) for s in result.segments] if result is not None else []
    return {
        "image_id": batch["image_id"],
        "source": batch["source"],
        "width": batch["width"],
        "height": batch["height"],
        "error": np.array([e if i in results else (e or "no result") for i, e in enumerate(errors)], dtype=object),
        "id_map": id_maps,
        "segments": segments,
    }


def encode_results(batch: dict[str, np.ndarray]) -> pa.Table:
    """CPU stage after an actor built with ``encode_rle=False``: RLE-encode each id map -> RESULT_SCHEMA rows.

    Moves RLE (and the Arrow rows) off the model actor: on a GPU it would otherwise run between batches
    while the GPU waits (see BENCHMARKS.md)."""
    rows = []
    for i in range(len(batch["image_id"])):
        error = str(batch["error"][i] or "")
        # A block whose rows all have no segment, merged with other blocks, comes back with None for its lists.
        segments = [_segment(s) for s in (batch["segments"][i] if batch["segments"][i] is not None else [])]
        result = None if error else PanopticResult(np.asarray(batch["id_map"][i]), segments)
        rows.append(_result_row(batch, i, result, error))
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _segment(values) -> Segment:
    """A segment tuple as it comes back from the object store (numpy scalars, arrays) -> `Segment`."""
    segment_id, category_id, isthing, score, area, bbox = values
    return Segment(
        int(segment_id), int(category_id), bool(isthing), float(score), int(area), tuple(int(v) for v in bbox)
    )
