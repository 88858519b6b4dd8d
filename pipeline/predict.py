"""Segmentation stage: the GPU (or CPU) actor that hosts the model, and the RLE stage after it.

`PanopticSegmenter` is a callable class for ``map_batches(..., compute=ActorPoolStrategy(...))``: each
actor loads the weights itself from the weights URI (cached on the node), once, in ``__init__`` — the
model never travels through the object store. A batch of decoded images of any sizes goes through
`PanopticPredictor` (grouped by canvas, so results do not depend on batch composition) and comes back as
one Arrow table in `pipeline.schema.PREDICTION_SCHEMA`: per image its id map (bytes) and its segments as
columns. `encode_results` turns that into `RESULT_SCHEMA` (COCO RLE per segment, in one pass per image): on
CPU workers by default (``--rle-on workers``, the GPU goes on to its next batch meanwhile), or inside the
actor. The tables are Arrow end to end: nothing is pickled on its way through the object store.

A CUDA out-of-memory error on a batch retries the two halves separately, down to one image; an image
that still does not fit becomes a retryable error row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from model.categories import category_name
from model.checkpoint import build_model, read_state_dict
from model.config import get_variant
from model.panoptic import PanopticResult, Segment
from model.predictor import InferenceConfig, PanopticPredictor, PreparedImage
from model.synthetic_weights import synthetic_state_dict
from pipeline.device_decode import prepare_encoded
from pipeline.rle import encode_segments
from pipeline.schema import (
    INPUT_COLUMNS,
    PREDICTED_SEGMENT_STRUCT,
    PREDICTION_SCHEMA,
    RESULT_SCHEMA,
    RLE_TYPE,
    SEGMENT_STRUCT,
    STATUS_ERROR,
    STATUS_OK,
)

log = logging.getLogger(__name__)

SYNTHETIC_WEIGHTS = "synthetic"
OUT_OF_MEMORY = "CUDA out of memory on this single image"


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
    """Ray Data callable class: decoded image rows in, one `PREDICTION_SCHEMA` (or, with ``encode_rle``,
    `RESULT_SCHEMA`) table out."""

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

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) for e in batch["error"]]
        retryable = [bool(r) for r in batch["retryable"]]
        prepared = self._prepare(batch, errors)  # row -> image, for rows without an error
        todo = sorted(prepared)
        results: dict[int, PanopticResult] = {}
        predicted = self._predict_splitting_on_oom([prepared[i] for i in todo], todo, errors, retryable)
        for i, result in zip(todo, predicted):
            if result is not None:
                results[i] = result
        predictions = prediction_table(batch, results, errors=errors, retryable=retryable)
        return encode_results(predictions) if self.encode_rle else predictions

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
        self, images: list[PreparedImage], indices: list[int], errors: list[str], retryable: list[bool]
    ) -> list[PanopticResult | None]:
        if not images:
            return []
        try:
            return list(self.predictor.predict_prepared(images))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(images) == 1:
                errors[indices[0]] = OUT_OF_MEMORY
                retryable[indices[0]] = True  # another run (another GPU, fewer neighbours) may fit it
                return [None]
            half = len(images) // 2
            log.warning("CUDA out of memory on a batch of %d images; retrying in halves", len(images))
            return self._predict_splitting_on_oom(images[:half], indices[:half], errors, retryable) + (
                self._predict_splitting_on_oom(images[half:], indices[half:], errors, retryable)
            )


# ------------------------------------------------------------------------------------------------------
# Tables between the stages
# ------------------------------------------------------------------------------------------------------


def input_columns(batch: dict[str, np.ndarray] | pa.Table) -> dict[str, pa.Array]:
    """The `INPUT_COLUMNS` of a batch as Arrow arrays of their declared types (nulls that numpy batches turned
    into NaN come back as nulls)."""
    columns = {}
    for name in INPUT_COLUMNS:
        field = PREDICTION_SCHEMA.field(name)
        values = batch[name]
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            columns[name] = values.cast(field.type)
        else:  # numpy: an all-null column arrives as float32 NaN, an integer column with nulls as floats
            convert = int if pa.types.is_integer(field.type) else str
            columns[name] = pa.array([None if _missing(v) else convert(v) for v in values], field.type)
    return columns


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and bool(np.isnan(value)))


def prediction_table(
    batch: dict[str, np.ndarray], results: dict[int, PanopticResult], *, errors: list[str], retryable: list[bool]
) -> pa.Table:
    """`PREDICTION_SCHEMA` rows of a batch: row ``i`` has its id map and segments when ``results`` has ``i``,
    else an error (``errors[i]``, or "no result")."""
    n = len(batch["image_id"])
    ok = [i in results for i in range(n)]
    id_maps = [_id_map_bytes(results[i].id_map) if ok[i] else b"" for i in range(n)]
    segments = [results[i].segments if ok[i] else [] for i in range(n)]
    widths = [int(w) or None for w in batch["width"]]
    heights = [int(h) or None for h in batch["height"]]
    columns = {
        **input_columns(batch),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "error": pa.array([None if ok[i] else (errors[i] or "no result") for i in range(n)], pa.string()),
        "retryable": pa.array([not ok[i] and retryable[i] for i in range(n)], pa.bool_()),
        "id_map": pa.array(id_maps, pa.large_binary()),
        "segments": _predicted_segments(segments),
    }
    return pa.table(columns, schema=PREDICTION_SCHEMA)


def _id_map_bytes(id_map: np.ndarray) -> bytes:
    """[H, W] segment ids -> C-order bytes, one byte per pixel (four beyond 255 segments)."""
    dtype = np.uint8 if id_map.size == 0 or int(id_map.max()) < 256 else np.int32
    return np.ascontiguousarray(id_map, dtype=dtype).tobytes()


def _predicted_segments(per_image: Sequence[Sequence[Segment]]) -> pa.ListArray:
    """Segments of each image -> list<`PREDICTED_SEGMENT_STRUCT`>, built column by column."""
    flat = [s for segments in per_image for s in segments]
    offsets = np.concatenate(([0], np.cumsum([len(s) for s in per_image]))).astype(np.int32)
    values = pa.StructArray.from_arrays(
        [
            pa.array([s.id for s in flat], pa.int32()),
            pa.array([s.category_id for s in flat], pa.int32()),
            pa.array([s.isthing for s in flat], pa.bool_()),
            pa.array([s.score for s in flat], pa.float32()),
            pa.array([s.area for s in flat], pa.int64()),
            pa.array([list(s.bbox) for s in flat], pa.list_(pa.int32())),
        ],
        fields=list(PREDICTED_SEGMENT_STRUCT),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=pa.list_(PREDICTED_SEGMENT_STRUCT))


def encode_results(predictions: pa.Table) -> pa.Table:
    """`PREDICTION_SCHEMA` rows -> `RESULT_SCHEMA` rows: each segment's mask as COCO RLE, plus its category
    name and ``status``. The CPU stage after an actor built with ``encode_rle=False``."""
    n = predictions.num_rows
    segments = predictions.column("segments")
    lengths = pc.fill_null(pc.list_value_length(segments), 0).to_numpy()  # merged blocks may hold null lists
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    flat = pa.concat_arrays([c.flatten() for c in segments.chunks]) if n else _EMPTY_PREDICTED  # one per segment
    segment_ids = flat.field("segment_id").to_numpy(zero_copy_only=False)
    heights = predictions.column("height").to_pylist()
    widths = predictions.column("width").to_pylist()
    id_maps = predictions.column("id_map").combine_chunks()
    counts: list[str] = []
    sizes: list[list[int]] = []
    for i in range(n):
        ids = segment_ids[offsets[i] : offsets[i + 1]]
        if len(ids) == 0:
            continue
        id_map = _id_map_from_bytes(id_maps[i].as_buffer(), heights[i], widths[i])
        counts.extend(e.counts for e in encode_segments(id_map, ids.tolist()))
        sizes.extend([[heights[i], widths[i]]] * len(ids))
    rle = pa.StructArray.from_arrays(
        [pa.array(sizes, pa.list_(pa.int32())), pa.array(counts, pa.string())],
        fields=list(RLE_TYPE),
    )
    names = pa.array([category_name(c) for c in flat.field("category_id").to_pylist()], pa.string())
    by_name = {f.name: flat.field(f.name) for f in PREDICTED_SEGMENT_STRUCT} | {"category": names, "rle": rle}
    values = pa.StructArray.from_arrays([by_name[f.name] for f in SEGMENT_STRUCT], fields=list(SEGMENT_STRUCT))
    errors = predictions.column("error")
    columns = {
        **{name: predictions.column(name) for name in INPUT_COLUMNS},
        "width": predictions.column("width"),
        "height": predictions.column("height"),
        "error": errors,
        "retryable": predictions.column("retryable"),
        "status": pc.if_else(pc.is_null(errors), STATUS_OK, STATUS_ERROR),
        "segments": pa.ListArray.from_arrays(pa.array(offsets), values, type=pa.list_(SEGMENT_STRUCT)),
    }
    return pa.table(columns, schema=RESULT_SCHEMA)


_EMPTY_PREDICTED = pa.array([], PREDICTED_SEGMENT_STRUCT)


def _id_map_from_bytes(buffer: pa.Buffer, height: int, width: int) -> np.ndarray:
    """`_id_map_bytes` undone: [height, width] uint8 (or int32) segment ids, without a copy."""
    itemsize = buffer.size // (height * width)
    return np.frombuffer(buffer, dtype=np.uint8 if itemsize == 1 else np.int32).reshape(height, width)
