"""The Parquet output schema, declared once.

An output folder ``OUTPUT/`` holds two tables:

- ``segments/``: one row per panoptic segment.
- ``images/``: one row per input image (``status`` ``ok`` or ``error``).

Every writer uses these schemas; README.md documents them column by column.
"""

from __future__ import annotations

import pyarrow as pa

SEGMENTS_TABLE = "segments"
IMAGES_TABLE = "images"

STATUS_OK = "ok"
STATUS_ERROR = "error"

RLE_TYPE = pa.struct(
    [
        pa.field("size", pa.list_(pa.int32()), nullable=False),  # [height, width] in pixels
        pa.field("counts", pa.string(), nullable=False),  # COCO compressed RLE (column-major runs)
    ]
)

SEGMENTS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("segment_id", pa.int32(), nullable=False),
        pa.field("category_id", pa.int32(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("isthing", pa.bool_(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("bbox", pa.list_(pa.int32()), nullable=False),  # [x, y, w, h] in pixels
        pa.field("rle", RLE_TYPE, nullable=False),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("width", pa.int32()),  # null when the image could not be decoded
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # null when status == "ok"
        pa.field("num_segments", pa.int32(), nullable=False),
    ]
)
