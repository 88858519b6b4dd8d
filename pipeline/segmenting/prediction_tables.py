"""The tables between the model and the commit, without torch.

The model's call turns a batch into one Arrow table in `pipeline.schema.PREDICTION_SCHEMA` (`prediction_table`:
per image its id map as bytes and its segments as columns); `encode_results` turns that into `RESULT_SCHEMA`
(COCO RLE per segment, in one pass per image), on the block call's threads while the model runs the next batch
(`pipeline.segmenting.block_call`). Arrow end to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.categories import category_name
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
from pipeline.segmenting.rle import encode_segments

if TYPE_CHECKING:
    from model.panoptic import PanopticResult, Segment


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
    id_maps = _id_maps_array([results[i].id_map if ok[i] else None for i in range(n)])
    segments = [results[i].segments if ok[i] else [] for i in range(n)]
    widths = [int(w) or None for w in batch["width"]]
    heights = [int(h) or None for h in batch["height"]]
    columns = {
        **input_columns(batch),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "error": pa.array([None if ok[i] else (errors[i] or "no result") for i in range(n)], pa.string()),
        "retryable": pa.array([not ok[i] and retryable[i] for i in range(n)], pa.bool_()),
        "id_map": id_maps,
        "segments": _predicted_segments(segments),
    }
    return pa.table(columns, schema=PREDICTION_SCHEMA)


def _id_maps_array(id_maps: Sequence[np.ndarray | None]) -> pa.LargeBinaryArray:
    """[H, W] segment ids of each row (None: no map) -> one large_binary value per row, C-order bytes, one byte
    per pixel (four beyond 255 segments). The maps are copied once, into the array's buffer (no bytes objects
    in between: at the original size a map is the largest thing an image leaves)."""
    pieces = [np.ascontiguousarray(m, dtype=_id_dtype(m)).reshape(-1).view(np.uint8) for m in id_maps if m is not None]
    lengths = [0 if m is None else m.size * np.dtype(_id_dtype(m)).itemsize for m in id_maps]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)  # [n + 1]
    data = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)  # [sum of lengths]
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(id_maps), buffers)


def _id_dtype(id_map: np.ndarray) -> type[np.integer]:
    if id_map.dtype == np.uint8 or id_map.size == 0:
        return np.uint8
    return np.uint8 if int(id_map.max()) < 256 else np.int32


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
    name and ``status``. What the block call runs on its threads after a model built with ``encode_rle=False``."""
    n = predictions.num_rows
    segments = predictions.column("segments")
    lengths = pc.fill_null(pc.list_value_length(segments), 0).to_numpy()  # merged blocks may hold null lists
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    flat = pa.concat_arrays([c.flatten() for c in segments.chunks]) if n else _EMPTY_PREDICTED  # one per segment
    segment_ids = flat.field("segment_id").to_numpy(zero_copy_only=False)
    heights = predictions.column("height").to_pylist()
    widths = predictions.column("width").to_pylist()
    id_maps = _value_buffers(predictions.column("id_map"))  # views, not copies: a map is an image's largest part
    counts: list[str] = []
    sizes: list[list[int]] = []
    for i in range(n):
        ids = segment_ids[offsets[i] : offsets[i + 1]]
        if len(ids) == 0:
            continue
        id_map = _id_map_from_bytes(id_maps[i], heights[i], widths[i])
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


def _value_buffers(column: pa.ChunkedArray) -> list[pa.Buffer]:
    """Each value of a large_binary column as a zero-copy slice of its chunk's data buffer (``combine_chunks``
    and ``Scalar.as_buffer`` copy)."""
    out = []
    for chunk in column.chunks:
        _, offsets_buffer, data = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        out.extend(data.slice(int(a), int(b - a)) if data is not None else pa.py_buffer(b"")
                   for a, b in pairwise(offsets))  # fmt: skip
    return out


def _id_map_from_bytes(buffer: pa.Buffer, height: int, width: int) -> np.ndarray:
    """`_id_map_bytes` undone: [height, width] uint8 (or int32) segment ids, without a copy."""
    itemsize = buffer.size // (height * width)
    return np.frombuffer(buffer, dtype=np.uint8 if itemsize == 1 else np.int32).reshape(height, width)
