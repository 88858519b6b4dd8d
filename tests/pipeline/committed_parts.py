"""A committed part made by hand, as an interrupted earlier run leaves it (for the resume tests)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import IMAGES_SCHEMA, SEGMENTS_SCHEMA

FAKE_WIDTH = 7  # marks the rows committed by hand: a redone image would have its real width


def commit_by_hand(output: Path, rows: list[tuple[str, str]]) -> None:
    """A committed part of ``(image_id, source)`` rows (``source#member`` ids are members of a shard)."""
    images = pa.Table.from_pylist(
        [
            {"image_id": i, "source": s, "member": i.split("#", 1)[1] if "#" in i else None, "width": FAKE_WIDTH}
            | {"height": 5, "status": "ok", "error": None, "retryable": False, "num_segments": 0, "run_id": "earlier"}
            for i, s in rows
        ],
        schema=IMAGES_SCHEMA,
    )
    for table, data in (("segments", SEGMENTS_SCHEMA.empty_table()), ("images", images)):
        (output / table).mkdir(parents=True, exist_ok=True)
        pq.write_table(data, output / table / "part-earlier-000000.parquet")
