"""Retraction: committed rows the resume decided to redo (`pipeline.resume_decision`, action ``retract``) are
removed from their parts before the run commits anything (a new part may reuse a retracted one's name).

A part is rewritten without those images, ``segments`` first and then ``images`` (the commit record), each
published whole; a part left empty is deleted, ``images`` first. A crash in between leaves the rows' decision
unchanged (they are still retryable, changed or repeated), so the next run retracts the rest. `retract_rows`
is a Ray stage function (plain pyarrow, no torch), run per part: on workers after a group-by on ``part``, or
in the driver for a small output.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.inspection import members_of
from pipeline.output_paths import Output
from pipeline.parts import parquet_bytes, part_counts
from pipeline.resume_decision import RETRACT
from pipeline.schema import IMAGES_TABLE, RETRACTION_SCHEMA, SEGMENTS_SCHEMA, SEGMENTS_TABLE
from pipeline.storage import publish

log = logging.getLogger(__name__)


def retraction_rows(batch: pa.Table) -> pa.Table:
    """`pipeline.resume_decision.PLAN_SCHEMA` rows -> one {"part", "source", "member"} row per part to edit."""
    retract = batch.filter(pc.equal(batch.column("action"), RETRACT))
    parts = retract.column("parts")
    parents = pc.list_parent_indices(parts)
    return pa.table(
        {
            "part": pc.list_flatten(parts),
            "source": pc.take(retract.column("uri"), parents),
            "member": pc.take(retract.column("member"), parents),
        }
    )


def retract_rows(group: pa.Table, *, output: str) -> pa.Table:
    """All retractions of one part ({"part", "source", "member"} rows) -> the part rewritten without those
    images and one `RETRACTION_SCHEMA` row of what was removed."""
    out = Output.of(output)
    fs, name = out.fs, group.column("part")[0].as_py()
    images_path, segments_path = out.part(IMAGES_TABLE, name), out.part(SEGMENTS_TABLE, name)
    gone = {(s, m) for s, m in zip(group.column("source").to_pylist(), group.column("member").to_pylist())}
    with fs.open(images_path, "rb") as f:
        images = pq.read_table(f)
    members = members_of(images).to_pylist()
    drop = np.array([(s, m) in gone for s, m in zip(images.column("source").to_pylist(), members)], dtype=bool)
    removed = images.filter(pa.array(drop))
    kept = images.filter(pa.array(~drop))
    removed_ids = removed.column("image_id")
    if kept.num_rows == 0:
        fs.rm(images_path)  # the commit record first
        with contextlib.suppress(FileNotFoundError):
            fs.rm(segments_path)
    else:
        with fs.open(segments_path, "rb") as f:
            segments = pq.read_table(f, schema=SEGMENTS_SCHEMA)
        segments = segments.filter(pc.invert(pc.is_in(segments.column("image_id"), value_set=removed_ids)))
        publish(fs, segments_path, parquet_bytes(segments))
        publish(fs, images_path, parquet_bytes(kept, counts=part_counts(kept)))
    log.info("retracted %d rows from part %s", removed.num_rows, name)
    return pa.Table.from_pylist([{"part": name, **part_counts(removed)}], schema=RETRACTION_SCHEMA)


def retract_locally(retractions: pa.Table, *, output: str) -> list[dict[str, int]]:
    """`retract_rows` on each part of ``retractions`` (`retraction_rows` rows) in this process, part by part."""
    removed = []
    for part in sorted(set(retractions.column("part").to_pylist())):
        group = retractions.filter(pc.equal(retractions.column("part"), part))
        removed.extend(retract_rows(group, output=output).to_pylist())
    return removed
