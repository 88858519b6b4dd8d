"""An output's tables read back: is it an output, the snapshot read, its tables' files and bytes, a lazy dataset,
one image's rows.

An output ``OUTPUT/`` (a local path or any fsspec URI such as ``s3://bucket/run``) holds ``segments/`` and
``images/`` Parquet files, ``_snapshots/<seq>.json`` (which files make each snapshot of both tables:
:mod:`pipeline.exactly_once.snapshots`), ``_runs/<run_id>.json`` (each run's record, read by
:mod:`pipeline.exactly_once.run_records`) and maybe ``_SUCCESS``. The column contract is :mod:`pipeline.schema`.

Readers read one snapshot: `pin` fixes it once (the latest by default, or ``--snapshot N`` / ``--as-of-run RUN``),
and every table read through the pinned `Output` lists that snapshot's files, so ``segments`` and ``images`` agree
whatever runs meanwhile. An output written before snapshots existed has no log: its folders are globbed
(``**.parquet``, files in nested sub-folders too; names starting with ``_`` or ``.`` are ignored).
`snapshot_files` gives the same file lists to any other reader (DuckDB's ``read_parquet([...])``, Polars,
pyarrow).

Every function takes the output resolved once (a :class:`~pipeline.exactly_once.output_paths.Output`, as the
commands pass it) or its URI (resolved here). Everything here is plain fsspec/pyarrow. Reading an output one row per
image (in process or on Ray) is :mod:`pipeline.reading.packed_images`; masks and id maps are decoded by
:mod:`pipeline.segmenting.rle`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.snapshots import read_snapshot, snapshot_at
from pipeline.inputs.storage import is_local
from pipeline.schema import (
    IMAGES_SCHEMA,
    IMAGES_TABLE,
    LEASE_FILE,
    RUNS_FOLDER,
    SEGMENTS_SCHEMA,
    SEGMENTS_TABLE,
)

TableName = Literal["segments", "images"]

TABLE_SCHEMAS: dict[str, pa.Schema] = {SEGMENTS_TABLE: SEGMENTS_SCHEMA, IMAGES_TABLE: IMAGES_SCHEMA}
"""The declared schema of each table, by its folder name."""

NO_SNAPSHOT = 0
"""`Output.at` of an output without a snapshot log (written before snapshots existed): its folders are globbed."""


class OutputNotFoundError(FileNotFoundError):
    """``OUTPUT`` holds no panoptic-flow output (a mistyped folder, or not an output at all)."""


def check_output(output: Output | str, *, snapshot: int | None = None, as_of_run: str | None = None) -> Output:
    """``output`` resolved and pinned (`pin`), after checking that it holds an output: ``images/``, ``segments/``,
    ``_snapshots/``, ``_runs/`` or ``_lease.json`` (a run takes the lease before anything else, so a run in flight
    counts); else raise :class:`OutputNotFoundError`.

    The readers below treat a missing table as empty; the commands call this first so that a mistyped
    folder is one clear error rather than zero rows.
    """
    out = Output.resolve(output)
    markers = [out.table(IMAGES_TABLE), out.table(SEGMENTS_TABLE), out.snapshots, out.runs, out.lease]
    if any(out.fs.exists(marker) for marker in markers):
        return pin(out, snapshot=snapshot, as_of_run=as_of_run)
    if not out.fs.exists(out.root):
        raise OutputNotFoundError(f"no output at {out.uri!r}: no such folder or prefix")
    raise OutputNotFoundError(
        f"no output at {out.uri!r}: it has no {IMAGES_TABLE}/, {SEGMENTS_TABLE}/, {RUNS_FOLDER}/ or {LEASE_FILE} "
        "(is it the --output of a segment run?)"
    )


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow filesystem over ``fs``: native for local paths, ``PyFileSystem(FSSpecHandler)`` otherwise."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _is_data_file(relative: str) -> bool:
    parts = relative.split("/")
    return parts[-1].endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts)


def pin(output: Output | str, *, snapshot: int | None = None, as_of_run: str | None = None) -> Output:
    """``output`` pinned to one snapshot (`Output.at`): ``snapshot``, or the last one run ``as_of_run`` wrote, or
    the latest; `NO_SNAPSHOT` for an output without a snapshot log. Raises
    `pipeline.exactly_once.snapshots.SnapshotNotFound` for a snapshot or run not in the log."""
    out = Output.resolve(output)
    if out.at is not None and snapshot is None and as_of_run is None:
        return out
    found = read_snapshot(out, snapshot, as_of_run=as_of_run)
    return replace(out, at=found.seq if found is not None else NO_SNAPSHOT)


def table_files(output: Output | str, table: TableName) -> tuple[list[str], fsspec.AbstractFileSystem]:
    """The sorted Parquet files of one table in the snapshot ``output`` is pinned to (`pin`; not pinned: the
    latest), or for an output without snapshots, its folder searched recursively; and the fsspec filesystem they
    are on. Paths are filesystem paths (no protocol). A missing table folder gives an empty list.
    """
    if table not in TABLE_SCHEMAS:
        raise ValueError(f"table must be one of {sorted(TABLE_SCHEMAS)}, got {table!r}")
    out = pin(output)
    if out.at != NO_SNAPSHOT:
        return snapshot_at(out, out.at).files(out, table), out.fs  # type: ignore[arg-type]
    fs, folder = out.fs, out.table(table)
    if not fs.isdir(folder):
        return [], fs
    files = [p for p in fs.find(folder) if _is_data_file(p[len(folder) + 1 :])]
    return sorted(files), fs


def snapshot_files(
    output: Output | str, *, snapshot: int | None = None, as_of_run: str | None = None
) -> dict[str, list[str]]:
    """``{"segments": [...], "images": [...]}``: the URIs of both tables' files in one snapshot (the latest by
    default; see `pin`), for any Parquet reader, e.g. ``duckdb.read_parquet(files["segments"])``,
    ``polars.scan_parquet(files["images"])`` or ``pyarrow.dataset.dataset(files["images"])``. Local outputs give
    paths, others full URIs (``s3://...``)."""
    out = pin(output, snapshot=snapshot, as_of_run=as_of_run)
    uris = {}
    for table in (SEGMENTS_TABLE, IMAGES_TABLE):
        files, fs = table_files(out, table)  # type: ignore[arg-type]
        uris[table] = files if is_local(fs) else [fs.unstrip_protocol(p) for p in files]
    return uris


def table_bytes(output: Output | str) -> int:
    """Bytes of the Parquet files of both tables of ``output``."""
    out = pin(output)
    total = 0
    for table in (IMAGES_TABLE, SEGMENTS_TABLE):
        files, fs = table_files(out, table)
        total += sum(int(fs.size(p)) for p in files)
    return total


def open_table(output: Output | str, table: TableName) -> ds.Dataset:
    """A lazy ``pyarrow.dataset.Dataset`` over ``OUTPUT/<table>/`` with the declared schema.

    Folder names are not turned into partition columns (``segments/shard=3/part-0.parquet`` adds no
    ``shard`` column); a table without files is an empty dataset with the declared schema.
    """
    files, fs = table_files(output, table)
    return ds.dataset(files, schema=TABLE_SCHEMAS[table], format="parquet", filesystem=arrow_filesystem(fs))


def read_image_rows(output: Output | str, image_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The ``images`` row (or None) and the ``segments`` rows (by ``segment_id``) of one image."""
    out = pin(output)  # both tables from one snapshot
    image_filter = pc.field("image_id") == image_id
    images = open_table(out, IMAGES_TABLE).to_table(filter=image_filter).to_pylist()
    segments = open_table(out, SEGMENTS_TABLE).to_table(filter=image_filter).to_pylist()
    return (images[0] if images else None), sorted(segments, key=lambda r: r["segment_id"])
