"""The resume decision: what happens to each of this run's inputs and to each committed row. Plain pyarrow,
without Ray, and written once: `pipeline.exactly_once.resume` runs these functions on the whole table in the driver
for a small output (`pipeline.exactly_once.resume_executors.InDriver`), or on Ray workers per partition of a hash
shuffle by URI (`OnRay`); `pipeline.exactly_once.resume.decide` composes them.

The rules, one per outcome (`PLAN_SCHEMA` ``action`` and ``reason``); every committed images row is matched
with this run's inputs, files by URI and shard members by shard and member:

- ``do``: an input without a committed row is done;
- ``retract`` / ``retryable``: a committed row with a *retryable* error (the store was unreachable, a timeout,
  throttling, 5xx, a CUDA out-of-memory) is retracted and its input done again;
- ``retract`` / ``changed``: a committed row whose input changed since (the listing's size / ETag / mtime
  differs from the row's ``input_size`` / ``input_version``) is retracted and done again; a changed shard has
  all its rows retracted and is done again whole;
- ``retract`` / ``repeated``: an input committed more than once (an output damaged by hand) has all its rows
  retracted and is done once;
- ``skip``: every other committed row is kept and its input skipped (a shard is read without its kept
  members: `group_shards`);
- ``unlisted``: committed rows of inputs that are not among this run's inputs (deleted files, another input
  list) are kept and counted in the summary.

Tested without Ray, one hand-made case per rule and the same answer on any split by URI
(tests/pipeline/test_resume_decision.py), and through whole runs (tests/pipeline/test_resume.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.inputs.sources import as_refs

# The resume plan: what happens to each input and each committed row. "do": read and segment it; "retract":
# remove the committed row(s) and do it again; "skip": committed, kept; "unlisted": committed, not an input.
DO, RETRACT, SKIP, UNLISTED = "do", "retract", "skip", "unlisted"

_KEY_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("listed", pa.int8()),
        ("version", pa.string()),  # the listing's
        ("size", pa.int64()),
        ("committed", pa.int64()),  # committed rows of this URI
        ("retryable", pa.int8()),
        ("c_version", pa.string()),
        ("c_size", pa.int64()),
        ("part", pa.string()),
    ]
)


def file_ref_keys(batch: pa.Table) -> pa.Table:
    """File refs -> rows of the resume aggregation by URI (`_KEY_SCHEMA`)."""
    n = batch.num_rows
    columns = {
        "uri": batch.column("uri").cast(pa.string()),
        "listed": pa.array(np.ones(n, dtype=np.int8)),
        "version": batch.column("version") if "version" in batch.column_names else pa.nulls(n, pa.string()),
        "size": batch.column("size") if "size" in batch.column_names else pa.nulls(n, pa.int64()),
    }
    return _keys(columns, n)


def committed_file_keys(batch: pa.Table) -> pa.Table:
    """Committed rows (`COMMITTED_SCHEMA`) of whole files -> rows of the resume aggregation by URI."""
    files = batch.filter(pc.is_null(batch.column("member")))
    n = files.num_rows
    columns = {
        "uri": files.column("source"),
        "committed": pa.array(np.ones(n, dtype=np.int64)),
        "retryable": pc.cast(pc.fill_null(files.column("retryable"), False), pa.int8()),
        "c_version": files.column("input_version"),
        "c_size": files.column("input_size"),
        "part": files.column("part"),
    }
    return _keys(columns, n)


def _keys(columns: dict[str, pa.Array], n: int) -> pa.Table:
    """`_KEY_SCHEMA` rows from some of its columns: counters absent are 0, the rest null."""
    full = {}
    for f in _KEY_SCHEMA:
        if f.name in columns:
            full[f.name] = columns[f.name].cast(f.type)
        elif f.name in ("listed", "committed", "retryable"):
            full[f.name] = pa.array(np.zeros(n, dtype=np.int64)).cast(f.type)
        else:
            full[f.name] = pa.nulls(n, f.type)
    return pa.table(full, schema=_KEY_SCHEMA)


PLAN_SCHEMA = pa.schema(
    [
        ("action", pa.string()),
        ("reason", pa.string()),  # of a retraction: "retryable", "changed", "repeated"
        ("uri", pa.string()),  # the file or shard
        ("kind", pa.string()),
        ("member", pa.string()),  # shards: the member concerned; files: null
        ("parts", pa.list_(pa.string())),  # retractions: the parts that hold the row(s)
    ]
)


def decide_files(batch: pa.Table) -> pa.Table:
    """One aggregated row per URI (`_KEY_SCHEMA` maxima/sums, ``parts`` the unique parts) -> `PLAN_SCHEMA`."""
    listed = batch.column("listed").to_pylist()
    committed = batch.column("committed").to_pylist()
    retryable = batch.column("retryable").to_pylist()
    version, c_version = batch.column("version").to_pylist(), batch.column("c_version").to_pylist()
    size, c_size = batch.column("size").to_pylist(), batch.column("c_size").to_pylist()
    actions, reasons = [], []
    for i in range(batch.num_rows):
        action, reason = SKIP, None
        if not listed[i]:
            action = UNLISTED
        elif not committed[i]:
            action = DO
        elif committed[i] > 1:
            action, reason = RETRACT, "repeated"
        elif retryable[i]:
            action, reason = RETRACT, "retryable"
        elif _changed(version[i], size[i], c_version[i], c_size[i]):
            action, reason = RETRACT, "changed"
        actions.append(action)
        reasons.append(reason)
    n = batch.num_rows
    return pa.table(
        {
            "action": pa.array(actions, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "uri": batch.column("uri"),
            "kind": pa.array(["file"] * n, pa.string()),
            "member": pa.nulls(n, pa.string()),
            "parts": batch.column("parts").cast(pa.list_(pa.string())),
        },
        schema=PLAN_SCHEMA,
    )


def _changed(version: str | None, size: int | None, c_version: str | None, c_size: int | None) -> bool:
    """Whether the listed object differs from the one a row was made from (unknown on either side: no)."""
    if version is not None and c_version is not None and version != c_version:
        return True
    return size is not None and c_size is not None and size != c_size


def decide_file_keys(keys: pa.Table) -> pa.Table:
    """The decision for file inputs, once: `_KEY_SCHEMA` rows (this run's refs and the committed rows, every row
    of a URI present) -> one `PLAN_SCHEMA` row per URI (`decide_files` on their maxima, sums and unique parts).

    A pure pyarrow function: `pipeline.exactly_once.resume.decide` runs it on the whole table in the driver, or on each
    partition of a hash shuffle by URI (Ray keeps each key's rows in one block there)."""
    aggregated = keys.group_by("uri").aggregate(
        [("listed", "max"), ("version", "max"), ("size", "max"), ("committed", "sum"), ("retryable", "max"),
         ("c_version", "max"), ("c_size", "max"), ("part", "distinct")]
    )  # fmt: skip
    names = {f"{c}_{how}": c for c, how in (("listed", "max"), ("version", "max"), ("size", "max"),
             ("committed", "sum"), ("retryable", "max"), ("c_version", "max"), ("c_size", "max"))}  # fmt: skip
    names["part_distinct"] = "parts"
    return decide_files(aggregated.rename_columns([names.get(c, c) for c in aggregated.column_names]))


def decide_members(batch: pa.Table, *, shards: dict[str, tuple[str | None, int | None]]) -> pa.Table:
    """Committed rows (`COMMITTED_SCHEMA`) of shard members -> `PLAN_SCHEMA` rows. ``shards`` is this run's
    shard listing, {uri: (version, size)}; a changed shard has all its rows retracted (it is done whole)."""
    members = batch.filter(pc.is_valid(batch.column("member")))
    columns = [members.column(c).to_pylist() for c in ("source", "member", "retryable", "input_size", "input_version")]
    rows = []
    for source, member, retryable, c_size, c_version, part in zip(*columns, members.column("part").to_pylist()):
        reason = None
        if source not in shards:
            action = UNLISTED
        elif retryable:
            action, reason = RETRACT, "retryable"
        elif _changed(*shards[source], c_version, c_size):
            action, reason = RETRACT, "changed"
        else:
            action = SKIP
        rows.append({"action": action, "reason": reason, "uri": source, "kind": "shard", "member": member,
                     "parts": [part]})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def tally(batch: pa.Table) -> pa.Table:
    """`PLAN_SCHEMA` rows -> {"action", "kind", "reason", "n"}: how many of each (summed on the driver)."""
    keys = pa.table(
        {
            "action": batch.column("action"),
            "kind": batch.column("kind"),
            "reason": pc.fill_null(batch.column("reason"), ""),
        }
    )
    counted = keys.group_by(["action", "kind", "reason"]).aggregate([("action", "count")])
    return pa.table(
        {
            "action": counted.column("action"),
            "kind": counted.column("kind"),
            "reason": counted.column("reason"),
            "n": counted.column("action_count").cast(pa.int64()),
        }
    )


def files_to_do(batch: pa.Table) -> pa.Table:
    """`PLAN_SCHEMA` rows -> the `REF_SCHEMA` refs of files to do (done anew or again)."""
    todo = batch.filter(
        pc.and_(pc.equal(batch.column("kind"), "file"), pc.is_in(batch.column("action"), pa.array([DO, RETRACT])))
    )
    return as_refs(todo.select(["uri", "kind"]))


SHARD_ROW_SCHEMA = pa.schema(
    [("uri", pa.string()), ("kind", pa.string()), ("size", pa.int64()), ("version", pa.string()),
     ("member", pa.string())]
)  # fmt: skip
"""A listed shard (``member`` null) or a kept member of one (the rest null): the rows `group_shards` groups."""


def listed_shard_rows(batch: pa.Table) -> pa.Table:
    """Listed shard refs (``uri``, ``kind``, ``size``, ``version``) -> `SHARD_ROW_SCHEMA` rows."""
    n = batch.num_rows
    columns = {f.name: batch.column(f.name).cast(f.type) if f.name in batch.column_names else pa.nulls(n, f.type)
               for f in SHARD_ROW_SCHEMA}  # fmt: skip
    return pa.table(columns, schema=SHARD_ROW_SCHEMA)


def shard_skips(batch: pa.Table) -> pa.Table:
    """`PLAN_SCHEMA` rows -> the shard members kept, as `SHARD_ROW_SCHEMA` rows."""
    kept = batch.filter(pc.and_(pc.equal(batch.column("kind"), "shard"), pc.equal(batch.column("action"), SKIP)))
    return listed_shard_rows(kept.select(["uri", "member"]))


def group_shards(rows: pa.Table) -> pa.Table:
    """`SHARD_ROW_SCHEMA` rows, every row of a URI present -> one `pipeline.inputs.sources.REF_SCHEMA` ref per listed
    shard, its ``skip`` the members kept. Kept members of a shard not listed make no ref (they are "unlisted").

    A pure pyarrow function: `pipeline.exactly_once.resume.decide` runs it on the whole table in the driver, or on each
    partition of a hash shuffle by URI."""
    grouped = rows.group_by("uri", use_threads=False).aggregate(  # listed order kept
        [("kind", "max"), ("size", "max"), ("version", "max"), ("member", "distinct", pc.CountOptions("only_valid"))]
    )
    refs = pa.table(
        {
            "uri": grouped.column("uri"),
            "kind": grouped.column("kind_max"),
            "size": grouped.column("size_max"),
            "version": grouped.column("version_max"),
            "skip": grouped.column("member_distinct"),
        }
    )
    return as_refs(refs.filter(pc.is_valid(refs.column("kind"))))
