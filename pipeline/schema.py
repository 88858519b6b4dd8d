"""The records of the pipeline, declared once: the two Parquet tables and the rows between stages.

An output folder ``OUTPUT/`` holds two tables:

- ``segments/``: one row per panoptic segment (`SEGMENTS_SCHEMA`).
- ``images/``: one row per input image, ``status`` ``ok`` or ``error`` (`IMAGES_SCHEMA`).

Between the stages an image travels as one row whose segments are a list column of `SEGMENT_STRUCT`, the
segment record without the image's key columns (`RESULT_SCHEMA`, what a part's commit receives), and before
RLE as `PREDICTION_SCHEMA` (the model's id map as bytes, the segments without ``category`` and ``rle``). Between
reading and the model an image is a `DecodedImage` (made by `pipeline.inputs.decode.decode_input`).
An output read back one row per image is `PACKED_SCHEMA` (grouped from `FLAT_SCHEMA` rows on Ray).
Every other shape is derived from these; README.md documents the tables column by column.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline.segmenting.stage_clock import STAGE_SECONDS_STRUCT

SEGMENTS_TABLE = "segments"
IMAGES_TABLE = "images"
# The rest of an output's layout (README "Output"):
RUNS_FOLDER = "_runs"  # <run_id>.json: each run's record (`pipeline.exactly_once.run_records`)
SUCCESS_FILE = "_SUCCESS"  # the last run finished: its counts and the output's totals
SNAPSHOTS_FOLDER = "_snapshots"  # <seq>.json: both tables as of a commit point (`pipeline.exactly_once.snapshots`)
LEASE_FILE = "_lease.json"  # the lease of the run writing the output (`pipeline.exactly_once.lease`)
QUARANTINE_FOLDER = (
    "_quarantine"  # <run_id>/{images,segments}/: unreadable parts moved aside (`pipeline.exactly_once.commit`)
)

# The output format a run writes, recorded in its ``_runs/<run_id>.json`` (``format_version``):
# - 1: before versions were recorded; an images part may lack the ``member`` column (read from its id,
#   ``source#member``: `pipeline.inputs.ids.member_of_old_row`), the ``retryable`` column (read as false) and its counts
#   in the Parquet footer (counted from its columns). `pipeline.exactly_once.inspection` reads such parts (its
# branches say
#   "format 1").
# - 2: every images part has all of `IMAGES_SCHEMA` and its `Counts` in the footer (`COUNTS_KEY` of
#   `pipeline.exactly_once.parts`).
OUTPUT_FORMAT_VERSION = 2

# The weights URI (and ``weights_sha256`` setting) a run record names for the deterministic demo weights; also
# the value of ``--weights`` that asks for them.
SYNTHETIC_WEIGHTS = "synthetic"

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
        pa.field("source", pa.string(), nullable=False),  # the object read, verbatim
        pa.field("member", pa.string()),  # inside a shard: tar member name or Parquet "row=N"; null for a file
        pa.field("width", pa.int32()),  # null when the image could not be decoded
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # null when status == "ok"
        pa.field("retryable", pa.bool_(), nullable=False),  # a transient error: the next run retries the image
        pa.field("num_segments", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),  # the run that made the row (OUTPUT/_runs/<run_id>.json)
        pa.field("input_size", pa.int64()),  # bytes of the source object when it was read (null: unknown)
        pa.field("input_version", pa.string()),  # its ETag / generation / mtime, as the store gives it
    ]
)

# The columns that say which input an image row is about; every stage passes them through unchanged.
INPUT_COLUMNS = ("image_id", "source", "member", "input_size", "input_version")
# The columns a segment row repeats from its image.
_IMAGE_KEY_COLUMNS = ("image_id", "source")

SEGMENT_STRUCT = pa.struct([f for f in SEGMENTS_SCHEMA if f.name not in _IMAGE_KEY_COLUMNS])
# What the model gives for a segment; RLE adds ``category`` and ``rle``
# (`pipeline.segmenting.prediction_tables.encode_results`).
PREDICTED_SEGMENT_STRUCT = pa.struct([f for f in SEGMENT_STRUCT if f.name not in ("category", "rle")])

_STAGE_IMAGE_COLUMNS = (*INPUT_COLUMNS, "width", "height", "error", "retryable")

RESULT_SCHEMA = pa.schema(
    [
        *(IMAGES_SCHEMA.field(name) for name in _STAGE_IMAGE_COLUMNS),
        pa.field("status", pa.string(), nullable=False),
        pa.field("segments", pa.list_(SEGMENT_STRUCT)),
    ]
)
"""One row per image with its segments nested: the output of RLE, the input of the write stage."""

PREDICTION_SCHEMA = pa.schema(
    [
        *(IMAGES_SCHEMA.field(name) for name in _STAGE_IMAGE_COLUMNS),
        pa.field("id_map", pa.large_binary()),  # [height, width] uint8 segment ids, C order; empty for errors
        pa.field("segments", pa.list_(PREDICTED_SEGMENT_STRUCT)),
    ]
)
"""One row per image as the model returns it before RLE (`pipeline.segmenting.prediction_tables.encode_results`,
on the block call's threads)."""


# -- the per-image views of an output, read back (`pipeline.reading.packed_images`) ----------------------------------
# Each column is its source column's name and type (all nullable, as these views have always been declared).

_IMAGE_VIEW_COLUMNS = [
    IMAGES_SCHEMA.field(name).with_nullable(True) for name in ("image_id", "source", "height", "width")
]
_SEGMENT_VIEW_COLUMNS = [
    *(SEGMENTS_SCHEMA.field(name).with_nullable(True) for name in ("segment_id", "category_id", "score")),
    RLE_TYPE.field("counts").with_nullable(True),  # COCO compressed RLE of size [height, width]
]

FLAT_SCHEMA = pa.schema([*_IMAGE_VIEW_COLUMNS, *_SEGMENT_VIEW_COLUMNS])
"""One row per segment (``height`` / ``width`` from its ``rle.size``), or one placeholder row per ok image
(``segment_id`` -1) so that an image without segments still gets its group."""

PACKED_SCHEMA = pa.schema([*_IMAGE_VIEW_COLUMNS, *(pa.field(f.name, pa.list_(f.type)) for f in _SEGMENT_VIEW_COLUMNS)])
"""One row per ok image: ``height`` / ``width`` of the image and of every mask; one list per segment column,
aligned, sorted by ``segment_id``."""


# -- the decoded image: between reading and the model ------------------------------------------------------

EMPTY_PIXELS = np.zeros((1, 1, 3), dtype=np.uint8)  # placeholder for rows without an image


class DecodedImage(NamedTuple):
    """The decoded-image record: one input image as the model actor receives it from
    `pipeline.inputs.decode.decode_input`.

    ``pixels`` are uint8 ``[h, w, 3]`` at the processed size (`EMPTY_PIXELS` when the image is left to the
    device or has an error); ``encoded`` holds the JPEG bytes left to the model's device (``device_preprocess``,
    with their EXIF ``orientation``), else ``b""``; ``width`` and ``height`` are as displayed (0 when unknown);
    ``error`` is ``""`` for a usable image, else a short reason.
    """

    pixels: np.ndarray
    encoded: bytes
    orientation: int
    width: int
    height: int
    error: str


# -- counts: one record, every count column derived from it --------------------------------------------------


@dataclass
class Counts:
    """How many images and segments: a part's (in its footer and its `PART_ROW_SCHEMA` row), a run's, an
    output's (``_SUCCESS``, the summary line). A new count is a field here plus its line in
    `pipeline.exactly_once.parts.part_counts` (which builds a `Counts`); every schema below follows."""

    images_ok: int = 0
    images_error: int = 0
    images_retryable: int = 0  # of images_error: transient, retried by the next run
    segments: int = 0

    @property
    def images(self) -> int:
        return self.images_ok + self.images_error

    def add(self, other: Counts | dict[str, Any], sign: int = 1) -> None:
        values = asdict(other) if isinstance(other, Counts) else other
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + sign * int(values.get(name, 0)))


COUNT_FIELDS = tuple(f.name for f in fields(Counts))
_COUNT_COLUMNS = [pa.field(name, pa.int64()) for name in COUNT_FIELDS]

ERROR_KIND_STRUCT = pa.struct([("kind", pa.string()), ("count", pa.int64())])
"""How many of a part's error rows have one error kind (`pipeline.error_budget.error_kind`)."""

PART_ROW_SCHEMA = pa.schema(
    [
        ("part", pa.string()),
        *_COUNT_COLUMNS,
        ("bytes", pa.int64()),  # of both files
        ("node_id", pa.string()),
        ("seconds", pa.float64()),
        ("error_kinds", pa.list_(ERROR_KIND_STRUCT)),  # most common first; [] for a part without errors
        (
            "stages",
            STAGE_SECONDS_STRUCT,
        ),  # the actor's seconds since its previous part (`pipeline.segmenting.stage_clock`)
        ("committed_at", pa.float64()),  # Unix time
    ]
)
"""What a block call returns for each part it committed: all the driver receives (its progress, its counts, its
error budget: `pipeline.error_budget`, and where the actor's time went: `pipeline.bottleneck`)."""

INSPECTION_SCHEMA = pa.schema([("path", pa.string()), *_COUNT_COLUMNS, ("problem", pa.string())])
"""A committed part's counts read from its footer, or the ``problem`` (null when readable) that makes it
unreadable (`pipeline.exactly_once.inspection.inspect_parts`)."""

RETRACTION_SCHEMA = pa.schema(
    [("part", pa.string()), *_COUNT_COLUMNS, ("new_part", pa.string()), ("new_bytes", pa.int64())]
)
"""What a retraction removed from one part, and the part that holds the rest (``new_part``: null when nothing was
left; ``new_bytes``: both its files) (`pipeline.exactly_once.commit.OutputCommitter.retract`)."""


# -- committed rows: what a resume reads back from the images parts ------------------------------------------

COMMITTED_SCHEMA = pa.schema(
    [
        *(IMAGES_SCHEMA.field(name).with_nullable(True) for name in ("source", "member", "retryable")),
        *(IMAGES_SCHEMA.field(name).with_nullable(True) for name in ("input_size", "input_version")),
        pa.field("part", pa.string()),  # the images part's file name
    ]
)
"""One row per committed image, as the resume matches it with this run's inputs (`pipeline.exactly_once.inspection`)."""
