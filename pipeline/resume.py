"""Exactly once, across crashes and re-runs: what is committed, and what a run does with an output it finds.

The protocol
------------
1. **One writer.** A run takes the output's lease (`pipeline.lease`) before it touches anything; a second run
   on a held output stops (exit code 2). Clean-up, quarantine, retractions, the run's record, ``_SUCCESS`` and
   commits happen only under the lease: the driver checks that it still holds it (in the store, not only in
   memory) right before each of them, and every commit checks it again.
2. **Commit.** A part is committed by the model actor's shard call on a Ray worker (`pipeline.shard`,
   `pipeline.write`): its ``segments`` file, then its ``images`` file, each published whole. The ``images``
   file is the commit record of every image in it (ok or error). Part names hash the part's image ids, so a
   retried shard call overwrites its own files.
3. **A run starts** (`prepare_output`) by removing temporary files and ``segments`` parts without an
   ``images`` part (a crash between the two writes), then reads every ``images`` part's footer on the workers
   (`inspect_parts`); a part that cannot be read (cut short, not Parquet) is moved to ``_quarantine/<run>/``
   with its ``segments`` part, logged, and its images are done again.
4. **Settings.** A run whose model settings (`model_settings`: variant, weights checksum, sizes, threshold,
   precision, batch mode, device preprocessing, pixel cap) differ from those of a run on record in
   ``_runs/`` stops with one line saying what differs, unless it is allowed on purpose.
5. **What is redone** (`plan`, on Ray workers; the driver never holds committed ids). Every committed images
   row is matched with this run's inputs (files by URI, shard members by shard and member):
   - an input without a committed row is done;
   - a committed row with a *retryable* error (the store was unreachable, a timeout, throttling, 5xx, a
     CUDA out-of-memory) is retracted and its input done again;
   - a committed row whose input changed since (the listing's size/ETag/mtime differs from the row's
     ``input_size`` / ``input_version``) is retracted and done again; a changed shard is done again whole;
   - an input committed more than once (an output damaged by hand) has all its rows retracted and is done
     once;
   - every other committed row is kept and its input skipped;
   - committed rows of inputs that are not among this run's inputs (deleted files, another input list) are
     kept and counted in the summary.
   Retracting rewrites the parts concerned without those rows (``segments`` first, then ``images``; a part
   left empty is deleted, ``images`` first), before the run commits anything. A crash in between leaves the
   rows' decision unchanged, so the next run retracts the rest.
   Lines of text manifests are not re-checked for changes (a HEAD request per committed object would cost more
   than the resume itself); listed files and shards are.
6. **Records.** Each images row names its run (``run_id``); each run that had something to do has
   ``_runs/<run_id>.json`` (settings, weights, versions, counts, status). ``_SUCCESS`` is written when a run
   finishes, with this run's counts and the output's totals. Before a run's first shard call its driver writes
   its record and removes ``_SUCCESS``; the driver completes the record from what it knows, never from a
   listing (an object store's listing cache can be stale), and lists parts and records afresh.

Tested against: a killed model actor, a killed driver then a re-run, a lost node, a write task killed between
its two files and after both, two runs started together and one started mid-run, an exception and a signal
during an S3 upload, a store that drops connections (retryable rows retried on the next run), inputs
changed / deleted / added between a crash and the resume, a changed threshold, an unreadable committed part,
the output inside the input folder (tests/pipeline/test_faults.py, test_write_stage.py, test_output_integrity.py);
two unreadable committed parts on a local and on an S3 output, re-run with another ``--rows-per-file`` (so that
no redone part overwrites a bad one by name: test_quarantine.py); a FIFO and a link to ``/dev/zero`` among the
inputs (test_input_files.py); leases written by hosts whose clocks run an hour fast or slow
(test_lease_clock.py); SIGTERM / SIGINT mid-run, then a resume (tests/jobs/test_stop.py); a driver stalled past
its lease's expiry while another run takes the output over and finishes (it changes nothing), and a second run
on an S3 output whose ``_runs/`` listing was cached (test_stalled_driver.py). The runs started mid-run and the
killed driver are held right after their first commit by a fault hook (no race with the job's speed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.ids import member_of_old_row
from pipeline.output_paths import Output
from pipeline.outputs import SYNTHETIC_WEIGHTS_URI
from pipeline.schema import (
    IMAGES_TABLE,
    INSPECTION_SCHEMA,
    QUARANTINE_FOLDER,
    RETRACTION_SCHEMA,
    SEGMENTS_SCHEMA,
    SEGMENTS_TABLE,
    Counts,
)
from pipeline.sources import REF_SCHEMA, ResolvedInputs, as_refs, manifest_base, manifest_rows
from pipeline.storage import is_local, is_temporary, publish
from pipeline.write import COUNTS_KEY, PART_PREFIX, parquet_bytes, part_counts

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


class SettingsChanged(ValueError):
    """This run's model settings differ from those the output was made with (one line for the user)."""


# ------------------------------------------------------------------------------------------------------
# The driver: under the lease, before any work
# ------------------------------------------------------------------------------------------------------


@dataclass
class OutputState:
    """What a run found in its output before doing anything."""

    parts: list[str] = field(default_factory=list)  # committed images parts (paths in the output's fs)
    totals: Counts = field(default_factory=Counts)  # over those parts
    quarantined: list[str] = field(default_factory=list)  # part names moved aside


def _part_names(fs: fsspec.AbstractFileSystem, folder: str) -> tuple[set[str], list[str]]:
    """(part file names, temporary files) of one table folder, listed afresh (never from a listing cache)."""
    fs.invalidate_cache(folder)
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return set(), []
    names = [posixpath.basename(p.rstrip("/")) for p in paths]
    parts = {n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")}
    return parts, [posixpath.join(folder, n) for n in names if is_temporary(n)]


def prepare_output(out: Output) -> list[str]:
    """Remove what interrupted runs left behind (temporary files; ``segments`` parts without their ``images``
    part, each logged); returns the committed images part paths. Only under the lease."""
    fs = out.fs
    segments, temporary_segments = _part_names(fs, out.table(SEGMENTS_TABLE))
    images, temporary_images = _part_names(fs, out.table(IMAGES_TABLE))
    for path in temporary_segments + temporary_images:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    orphans = sorted(segments - images)
    for name in orphans:
        log.warning("removing segments part %s: an interrupted run wrote it but never committed it", name)
        fs.rm(out.part(SEGMENTS_TABLE, name))
    return sorted(out.part(IMAGES_TABLE, n) for n in images)


def quarantine(out: Output, part: str, *, run_id: str, problem: str) -> None:
    """Move an unreadable committed part (both tables) to ``_quarantine/<run_id>/``: its images are redone.

    The ``images`` file goes first (the commit record: once it is gone, its images are uncommitted), then the
    ``segments`` file. A failure to move either raises: the run must not redo images whose bad part stays in
    place (readers would fail on it and its rows would count twice). The only error tolerated is a source that
    is gone: an ``images`` file moved aside by hand since the listing, or a ``segments`` file removed by hand
    (every commit writes one; an interrupted quarantine leaves the ``segments`` file as an orphan, which the
    next run's `prepare_output` removes). A destination folder that does not exist is created (local stores;
    object stores have no folders)."""
    fs, name = out.fs, posixpath.basename(part)
    log.warning("moving unreadable part %s to %s/%s/ (%s); its images are done again", name, QUARANTINE_FOLDER,
                run_id, problem)  # fmt: skip
    for table in (IMAGES_TABLE, SEGMENTS_TABLE):  # images first: the commit record goes, then its segments
        source, folder = out.part(table, name), out.quarantine(run_id, table)
        if is_local(fs):
            fs.makedirs(folder, exist_ok=True)
        try:
            fs.mv(source, posixpath.join(folder, name))
        except FileNotFoundError:
            if fs.exists(source):  # the source is there: the move itself failed
                raise
            log.warning("%s/%s was gone already: nothing to move", table, name)
        fs.invalidate_cache(out.table(table))


def read_run_records(out: Output) -> list[dict[str, Any]]:
    """The records in ``_runs/``, oldest first (run ids sort by time)."""
    fs, folder = out.fs, out.runs
    fs.invalidate_cache(folder)  # another run may have written here since this process last listed it
    try:
        paths = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    records = []
    for path in paths:
        try:
            records.append(json.loads(fs.cat_file(path)))
        except (json.JSONDecodeError, FileNotFoundError) as exc:
            log.warning("ignoring unreadable run record %s (%s)", path, exc)
    return records


def model_settings(config: JobConfig, weights_sha256: str) -> dict[str, Any]:
    """The settings that change a row's content: two runs into one output must agree on them.
    (``channels_last`` is left out: fp32 either way, equal at the float32 noise floor.) ``weights_sha256`` is
    ``""`` for the demo weights, recorded as ``"synthetic"``."""
    inference = {k: v for k, v in asdict(config.inference).items() if k != "channels_last"}
    return {
        "variant": config.model.variant,
        "weights_sha256": weights_sha256 or SYNTHETIC_WEIGHTS_URI,
        "max_pixels": config.input.max_pixels,
        **inference,
    }


def check_settings(records: list[dict[str, Any]], settings: dict[str, Any], *, allow: bool) -> None:
    """Raise `SettingsChanged` when a recorded run's settings differ from ``settings`` (unless ``allow``)."""
    for record in records:
        theirs = dict(record.get("settings", {}))
        if theirs.get("weights_sha256") == "auto":  # recorded so before, by `auto` falling back to the demo weights
            theirs["weights_sha256"] = SYNTHETIC_WEIGHTS_URI
        differ = {k: (theirs[k], v) for k, v in settings.items() if k in theirs and theirs[k] != v}
        if differ and not allow:
            what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in sorted(differ.items()))
            raise SettingsChanged(
                f"the output was made with {what} by run {record.get('run_id', '?')}; use another --output, "
                "or --allow-mixed-settings to add rows made with these settings on purpose"
            )


# ------------------------------------------------------------------------------------------------------
# Ray stage functions over committed parts (pure: no Ray import)
# ------------------------------------------------------------------------------------------------------


def inspect_parts(batch: dict[str, np.ndarray], *, output: str) -> pa.Table:
    """{"path"} of committed ``images`` parts -> their counts from the Parquet footer (format 1 parts without
    them: from their columns), or the ``problem`` that makes a part unreadable."""
    fs, _ = fsspec.core.url_to_fs(output)
    rows = []
    for path in (str(p) for p in batch["path"]):
        row: dict[str, Any] = {"path": path, "problem": None}
        try:
            with fs.open(path, "rb") as f:
                file = pq.ParquetFile(f)
                metadata = file.schema_arrow.metadata or {}
                if COUNTS_KEY in metadata:
                    row |= json.loads(metadata[COUNTS_KEY])
                else:
                    columns = [c for c in ("status", "retryable", "num_segments") if c in file.schema_arrow.names]
                    row |= part_counts(file.read(columns=columns))
        except FileNotFoundError:
            continue  # gone since the listing (moved aside by hand): nothing committed there any more
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            row["problem"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=INSPECTION_SCHEMA)


COMMITTED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("member", pa.string()),
        ("retryable", pa.bool_()),
        ("input_size", pa.int64()),
        ("input_version", pa.string()),
        ("part", pa.string()),
    ]
)


def committed_rows(batch: dict[str, np.ndarray], *, output: str) -> pa.Table:
    """{"path"} of committed ``images`` parts -> one `COMMITTED_SCHEMA` row per committed image. Parts written
    before the ``member`` column existed (format 1, `pipeline.schema.OUTPUT_FORMAT_VERSION`) get it from the old
    ids (``shard#member``)."""
    fs, _ = fsspec.core.url_to_fs(output)
    tables = [COMMITTED_SCHEMA.empty_table()]
    for path in (str(p) for p in batch["path"]):
        with fs.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            names = set(file.schema_arrow.names)
            table = file.read(columns=[c for c in ("image_id", *COMMITTED_SCHEMA.names) if c in names])
        n = table.num_rows
        columns = {}
        for field_ in COMMITTED_SCHEMA:
            if field_.name in names:
                columns[field_.name] = table.column(field_.name).cast(field_.type)
            elif field_.name == "member":
                columns["member"] = _members_of_old_rows(table)
            elif field_.name == "retryable":
                columns["retryable"] = pa.array(np.zeros(n, dtype=bool))
            elif field_.name == "part":
                columns["part"] = pa.array([posixpath.basename(path)] * n, pa.string())
            else:
                columns[field_.name] = pa.nulls(n, field_.type)
        tables.append(pa.table(columns, schema=COMMITTED_SCHEMA))
    return pa.concat_tables(tables)


def _members_of_old_rows(table: pa.Table) -> pa.Array:
    ids, sources = table.column("image_id").to_pylist(), table.column("source").to_pylist()
    return pa.array([member_of_old_row(i, s) for i, s in zip(ids, sources)], pa.string())


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

    A pure pyarrow function: `plan_locally` runs it on the whole table, `plan` on each partition of a hash
    shuffle by URI (Ray keeps each key's rows in one block there)."""
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


def retraction_rows(batch: pa.Table) -> pa.Table:
    """`PLAN_SCHEMA` rows with action "retract" -> one {"part", "source", "member"} row per part to edit."""
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
    images (``segments`` first, then ``images``; deleted when nothing is left, ``images`` first) and one
    `RETRACTION_SCHEMA` row of what was removed."""
    out = Output.of(output)
    fs, name = out.fs, group.column("part")[0].as_py()
    images_path, segments_path = out.part(IMAGES_TABLE, name), out.part(SEGMENTS_TABLE, name)
    gone = {(s, m) for s, m in zip(group.column("source").to_pylist(), group.column("member").to_pylist())}
    with fs.open(images_path, "rb") as f:
        images = pq.read_table(f)
    members = (
        images.column("member").to_pylist()
        if "member" in images.column_names
        else _members_of_old_rows(images).to_pylist()
    )
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


# ------------------------------------------------------------------------------------------------------
# The plan, on Ray workers
# ------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    refs: ray.data.Dataset | pa.Table  # `REF_SCHEMA`: what to read (a table from `plan_locally`)
    known_total: int | None  # refs to do, when known without running the plan
    skipped: int = 0  # committed rows kept
    retracted: Counts = field(default_factory=Counts)
    retracted_by_reason: dict[str, int] = field(default_factory=dict)
    unlisted: int = 0


def plan(inputs: ResolvedInputs, *, output: str, parts: list[str], partitions: int) -> Plan:
    """The refs to do, with the retractions applied, given the committed ``parts`` (see the module docstring).

    A fresh run over listed inputs pays nothing here: its refs stream at once. Any other run pays one hash
    aggregation of its file refs with the committed rows, a blocking shuffle (README "Resume"), and keeps the
    resulting plan (~100 B per input) in the object store while it runs.
    """
    import ray.data
    from ray.data.aggregate import Max, Unique

    listed = {r["uri"]: r for r in inputs.refs}  # the driver's listing, without repeats
    files = [r for r in listed.values() if r["kind"] == "file"]
    shard_refs = [r for r in listed.values() if r["kind"] != "file"]
    if not parts and not inputs.manifests:  # a fresh run over listed inputs: the listing is the plan
        refs = as_refs(pa.Table.from_pylist(files + shard_refs)) if listed else REF_SCHEMA.empty_table()
        return Plan(refs, known_total=len(files) if not shard_refs else None)

    committed = None
    if parts:
        committed = ray.data.from_items(
            [{"path": p} for p in parts], override_num_blocks=min(len(parts), 4 * partitions)
        )
        committed = committed.map_batches(
            committed_rows, batch_format="numpy", batch_size=8, fn_kwargs={"output": output}
        )
    file_refs = [ray.data.from_items(files)] if files else []
    file_refs += _manifest_refs(inputs.manifests)
    decisions = []
    if file_refs:
        keys = _union(file_refs).map_batches(file_ref_keys, batch_format="pyarrow")
        if committed is not None:
            keys = keys.union(committed.map_batches(committed_file_keys, batch_format="pyarrow"))
        shuffled = keys.repartition(partitions, keys=["uri"])  # every row of a URI in one block
        decisions.append(shuffled.map_batches(decide_file_keys, batch_format="pyarrow", batch_size=None))
    if committed is not None:
        shards = {r["uri"]: (r.get("version"), r.get("size")) for r in shard_refs}
        decisions.append(committed.map_batches(decide_members, batch_format="pyarrow", fn_kwargs={"shards": shards}))
    decided = _union(decisions).materialize()

    tally: dict[tuple[str, str, str], int] = {}
    for row in decided.map_batches(_tally, batch_format="pyarrow").iter_rows():
        key = (row["action"], row["kind"], row["reason"] or "")
        tally[key] = tally.get(key, 0) + int(row["n"])
    result = Plan(refs=_empty_refs(), known_total=None)
    result.skipped = sum(n for (action, _, _), n in tally.items() if action == SKIP)
    result.unlisted = sum(n for (action, _, _), n in tally.items() if action == UNLISTED)
    for (action, _, reason), n in tally.items():
        if action == RETRACT:
            result.retracted_by_reason[reason] = result.retracted_by_reason.get(reason, 0) + n
    if result.retracted_by_reason:  # before anything is committed: a new part may reuse a retracted one's name
        removed = (
            decided.map_batches(retraction_rows, batch_format="pyarrow")
            .groupby("part", num_partitions=partitions)
            .map_groups(retract_rows, batch_format="pyarrow", fn_kwargs={"output": output})
        )
        for row in removed.iter_rows():
            result.retracted.add(row)
    if not shard_refs:
        result.known_total = sum(
            n for (action, kind, _), n in tally.items() if kind == "file" and action in (DO, RETRACT)
        )

    refs = [decided.map_batches(_files_to_do, batch_format="pyarrow")]
    if shard_refs:
        skips = decided.map_batches(_shard_skips, batch_format="pyarrow")
        shard_rows = ray.data.from_items([{**r, "member": None} for r in shard_refs]).map_batches(
            _typed_shard_rows, batch_format="pyarrow"
        )
        grouped = (
            shard_rows.union(skips)
            .groupby("uri", num_partitions=partitions)
            .aggregate(
                Max("kind", alias_name="kind", ignore_nulls=True),
                Max("size", alias_name="size", ignore_nulls=True),
                Max("version", alias_name="version", ignore_nulls=True),
                Unique("member", alias_name="skip", ignore_nulls=True),
            )
        )
        refs.append(grouped.map_batches(_listed_shards, batch_format="pyarrow"))
    result.refs = _union(refs)
    return result


LOCAL_PLAN_MAX_PARTS = 16  # up to this many committed parts (and no manifest), the driver plans on its own


def fits_locally(inputs: ResolvedInputs, parts: list[str]) -> bool:
    """Whether `plan_locally` may plan this run: a small output, inputs all listed by the driver."""
    return len(parts) <= LOCAL_PLAN_MAX_PARTS and not inputs.manifests


def plan_locally(inputs: ResolvedInputs, *, output: str, parts: list[str]) -> Plan:
    """`plan` for a small output, in the driver process without Ray: the same functions (`decide_file_keys` on
    the whole table instead of per shuffle partition, `decide_members`) and the same retractions. A re-run with
    nothing to do then starts no cluster at all. ``Plan.refs`` is a `REF_SCHEMA` table."""
    listed = {r["uri"]: r for r in inputs.refs}
    files = [r for r in listed.values() if r["kind"] == "file"]
    shard_refs = [r for r in listed.values() if r["kind"] != "file"]
    committed = committed_rows({"path": np.array(parts, dtype=object)}, output=output)
    keys = [committed_file_keys(committed)]
    if files:
        keys.append(file_ref_keys(pa.Table.from_pylist(files)))
    shards = {r["uri"]: (r.get("version"), r.get("size")) for r in shard_refs}
    decided = pa.concat_tables([decide_file_keys(pa.concat_tables(keys)), decide_members(committed, shards=shards)])

    result = Plan(refs=_files_to_do(decided), known_total=None)
    for action, _, reason, n in zip(*_tally(decided).to_pydict().values()):
        result.skipped += n if action == SKIP else 0
        result.unlisted += n if action == UNLISTED else 0
        if action == RETRACT:
            result.retracted_by_reason[reason] = result.retracted_by_reason.get(reason, 0) + n
    retractions = retraction_rows(decided)
    for part in sorted(set(retractions.column("part").to_pylist())):
        group = retractions.filter(pc.equal(retractions.column("part"), part))
        result.retracted.add(retract_rows(group, output=output).to_pylist()[0])
    if shard_refs:
        kept = _shard_skips(decided)
        skips: dict[str, list[str]] = {}
        for uri, member in zip(kept.column("uri").to_pylist(), kept.column("member").to_pylist()):
            skips.setdefault(uri, []).append(member)
        rows = [{**r, "skip": skips.get(r["uri"], [])} for r in shard_refs]
        result.refs = pa.concat_tables([result.refs, as_refs(pa.Table.from_pylist(rows))])
    else:
        result.known_total = result.refs.num_rows
    return result


def _tally(batch: pa.Table) -> pa.Table:
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


def _files_to_do(batch: pa.Table) -> pa.Table:
    """`PLAN_SCHEMA` rows -> the `REF_SCHEMA` refs of files to do (done anew or again)."""
    todo = batch.filter(
        pc.and_(pc.equal(batch.column("kind"), "file"), pc.is_in(batch.column("action"), pa.array([DO, RETRACT])))
    )
    return as_refs(todo.select(["uri", "kind"]))


_SHARD_ROW_SCHEMA = pa.schema(
    [("uri", pa.string()), ("kind", pa.string()), ("size", pa.int64()), ("version", pa.string()),
     ("member", pa.string())]
)  # fmt: skip


def _typed_shard_rows(batch: pa.Table) -> pa.Table:
    return pa.table({f.name: batch.column(f.name).cast(f.type) for f in _SHARD_ROW_SCHEMA}, schema=_SHARD_ROW_SCHEMA)


def _shard_skips(batch: pa.Table) -> pa.Table:
    """`PLAN_SCHEMA` rows -> {"uri", "member"} of the shard members kept (`_SHARD_ROW_SCHEMA`)."""
    kept = batch.filter(pc.and_(pc.equal(batch.column("kind"), "shard"), pc.equal(batch.column("action"), SKIP)))
    n = kept.num_rows
    return pa.table(
        {"uri": kept.column("uri"), "kind": pa.nulls(n, pa.string()), "size": pa.nulls(n, pa.int64()),
         "version": pa.nulls(n, pa.string()), "member": kept.column("member")},
        schema=_SHARD_ROW_SCHEMA,
    )  # fmt: skip


def _listed_shards(batch: pa.Table) -> pa.Table:
    """Shards grouped with their kept members -> `REF_SCHEMA` refs of the listed shards (``skip`` = kept)."""
    return as_refs(batch.filter(pc.is_valid(batch.column("kind"))))


def _union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _empty_refs() -> ray.data.Dataset:
    import ray.data

    return ray.data.from_arrow(REF_SCHEMA.empty_table())


def _manifest_refs(manifests: list[str]) -> list[ray.data.Dataset]:
    """The file refs of each manifest, read and normalised by Ray workers."""
    import ray.data

    datasets = []
    for manifest in manifests:
        if manifest.lower().endswith(".parquet"):
            listing = ray.data.read_parquet(manifest, columns=["uri"])
        else:
            listing = ray.data.read_text(manifest)
        datasets.append(
            listing.map_batches(manifest_rows, batch_format="numpy", fn_kwargs={"base": manifest_base(manifest)})
        )
    return datasets
