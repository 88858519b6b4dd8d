"""An output as earlier runs leave it, with something for every resume decision (for the retraction and the plan
tests): committed parts with images and segments rows, and the listing of a re-run over it. No Ray, no model."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.exactly_once.parts import parquet_bytes, part_counts
from pipeline.inputs.sources import ResolvedInputs
from pipeline.schema import IMAGES_SCHEMA, SEGMENTS_SCHEMA

# (image id, source, member, version, retryable) rows of each committed part; the inputs never exist: a resume
# reads the listing and the committed parts, never an input.
PARTS: dict[str, list[tuple[str, str, str | None, str, bool]]] = {
    "part-a": [
        ("/in/kept.jpg", "/in/kept.jpg", None, "v1", False),  # skip
        ("/in/flaky.jpg", "/in/flaky.jpg", None, "v1", True),  # retract: retryable
        ("/in/twice.jpg", "/in/twice.jpg", None, "v1", False),  # retract: repeated (also in part-b)
        ("/in/old.tar#a.jpg", "/in/old.tar", "a.jpg", "v1", False),  # a member of a changed shard: retract
    ],
    "part-b": [
        ("/in/twice.jpg", "/in/twice.jpg", None, "v1", False),
        ("/in/changed.jpg", "/in/changed.jpg", None, "v1", False),  # retract: changed (listed as v2)
    ],
    "part-c": [  # every row retracted: the part is deleted
        ("/in/flaky2.jpg", "/in/flaky2.jpg", None, "v1", True),
    ],
    "part-d": [
        ("/in/gone.jpg", "/in/gone.jpg", None, "v1", False),  # unlisted: kept, counted
        ("/in/new.tar#a.jpg", "/in/new.tar", "a.jpg", "v1", False),  # a member of a listed shard: skip
    ],
}
LISTED = [
    *({"uri": f"/in/{name}", "kind": "file", "size": 10, "version": "v1"} for name in
      ("kept.jpg", "flaky.jpg", "twice.jpg", "flaky2.jpg", "fresh.jpg", "fresh2.jpg")),
    {"uri": "/in/changed.jpg", "kind": "file", "size": 10, "version": "v2"},
    {"uri": "/in/old.tar", "kind": "tar", "size": 99, "version": "v2"},
    {"uri": "/in/new.tar", "kind": "tar", "size": 99, "version": "v1"},
]  # fmt: skip


def write_output(output: Path) -> list[str]:
    """`PARTS` committed under ``output`` (two segments rows per image); returns the images part paths, sorted."""
    for table in ("images", "segments"):
        (output / table).mkdir(parents=True, exist_ok=True)
    for name, rows in PARTS.items():
        images = pa.Table.from_pylist(
            [
                {"image_id": i, "source": s, "member": m, "width": 7, "height": 5, "input_size": 99 if m else 10}
                | {"input_version": v, "retryable": r, "status": "error" if r else "ok", "error": "x" if r else None}
                | {"num_segments": 2, "run_id": "earlier"}
                for i, s, m, v, r in rows
            ],
            schema=IMAGES_SCHEMA,
        )
        segments = pa.Table.from_pylist(
            [
                {"image_id": i, "source": s, "segment_id": k, "category_id": 1, "category": "person", "isthing": True}
                | {"score": 0.9, "area": 4, "bbox": [0, 0, 2, 2], "rle": {"size": [5, 7], "counts": "0"}}
                for i, s, *_ in rows
                for k in (1, 2)
            ],
            schema=SEGMENTS_SCHEMA,
        )
        (output / "segments" / f"{name}.parquet").write_bytes(parquet_bytes(segments))
        (output / "images" / f"{name}.parquet").write_bytes(parquet_bytes(images, counts=part_counts(images)))
    return sorted(str(output / "images" / f"{name}.parquet") for name in PARTS)


def listing() -> ResolvedInputs:
    """The re-run's inputs, all listed by the driver (no manifest)."""
    return ResolvedInputs([dict(r) for r in LISTED], [])


def files_of(output: Path) -> dict[str, bytes]:
    """Every part file under ``output`` and its bytes (to check that nothing changed, file by file)."""
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.glob("*/part-*.parquet"))}
