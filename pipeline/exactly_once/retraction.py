"""Retraction: committed rows the resume decided to redo (`pipeline.exactly_once.resume_decision`, action
``retract``) are removed from their parts before the run commits anything.

This module decides, in plain pyarrow (no torch, no I/O), what a part loses: `retraction_rows` turns the decision into
one row per part to edit, and `split_part` splits a part's ``images`` rows into those kept and those retracted. The
rewrite itself is a commit-protocol hook, `pipeline.exactly_once.commit.OutputCommitter.retract`, fenced by the lease
like every write, and copy-on-write: the rows a part keeps are written as a new part (``segments`` first, then
``images``, each published whole, named by this run: `pipeline.exactly_once.parts.part_name`); the old files stay, for
the snapshots that list them (`pipeline.exactly_once.snapshots`). The run's start snapshot then lists the new part
instead of the old one (a part left empty: neither). A crash before that snapshot leaves the old part committed and the
rows' decision unchanged (they are still retryable, changed or repeated), so the next run retracts them again; the
stopped run's new files are listed by no snapshot, and the clean-up deletes them. The hook runs part by part: on
workers, per partition of a hash shuffle on ``part``, or in the driver for a small output
(`pipeline.exactly_once.resume`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.exactly_once.inspection import members_of
from pipeline.exactly_once.parts import part_counts
from pipeline.exactly_once.resume_decision import RETRACT
from pipeline.schema import RETRACTION_SCHEMA


def retraction_rows(batch: pa.Table) -> pa.Table:
    """`pipeline.exactly_once.resume_decision.PLAN_SCHEMA` rows -> one {"part", "source", "member"} row per part to
    edit."""
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


def split_part(images: pa.Table, group: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A part's ``images`` rows -> (kept, retracted): the retracted rows are those whose (source, member) is
    in ``group`` (the part's `retraction_rows`); both keep the part's order and columns."""
    gone = {(s, m) for s, m in zip(group.column("source").to_pylist(), group.column("member").to_pylist())}
    members = members_of(images).to_pylist()
    drop = np.array([(s, m) in gone for s, m in zip(images.column("source").to_pylist(), members)], dtype=bool)
    return images.filter(pa.array(~drop)), images.filter(pa.array(drop))


def retraction_row(name: str, removed: pa.Table, *, new_part: str | None, new_bytes: int) -> pa.Table:
    """One `RETRACTION_SCHEMA` row: the counts of the ``removed`` images rows of part ``name``, and the part
    written with the rest (None: nothing was left) and its bytes."""
    row = {"part": name, **part_counts(removed), "new_part": new_part, "new_bytes": new_bytes}
    return pa.Table.from_pylist([row], schema=RETRACTION_SCHEMA)
