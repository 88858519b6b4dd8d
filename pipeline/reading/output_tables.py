"""An output's tables read back: is it an output, its tables' files and bytes, a lazy dataset, one image's rows.

An output ``OUTPUT/`` (a local path or any fsspec URI such as ``s3://bucket/run``) holds
``segments/**.parquet`` and ``images/**.parquet`` (files may sit in nested sub-folders; names starting
with ``_`` or ``.`` are ignored), ``_runs/<run_id>.json`` (each run's record, read by
:mod:`pipeline.exactly_once.run_records`)
and maybe ``_SUCCESS``. The column contract is :mod:`pipeline.schema`.

Every function takes the output resolved once (a :class:`~pipeline.exactly_once.output_paths.Output`, as the
commands pass it) or its URI (resolved here). Everything here is plain fsspec/pyarrow. Reading an output one row per
image (in process or on Ray) is :mod:`pipeline.reading.packed_images`; masks and id maps are decoded by
:mod:`pipeline.segmenting.rle`.
"""

from __future__ import annotations

from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pipeline.exactly_once.output_paths import Output
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


class OutputNotFoundError(FileNotFoundError):
    """``OUTPUT`` holds no panoptic-flow output (a mistyped folder, or not an output at all)."""


def check_output(output: Output | str) -> Output:
    """``output`` resolved, after checking that it holds an output: ``images/``, ``segments/``, ``_runs/`` or
    ``_lease.json`` (a run takes the lease before anything else, so a run in flight counts); else raise
    :class:`OutputNotFoundError`.

    The readers below treat a missing table as empty; the commands call this first so that a mistyped
    folder is one clear error rather than zero rows.
    """
    out = Output.resolve(output)
    markers = [out.table(IMAGES_TABLE), out.table(SEGMENTS_TABLE), out.runs, out.lease]
    if any(out.fs.exists(marker) for marker in markers):
        return out
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


def table_files(output: Output | str, table: TableName) -> tuple[list[str], fsspec.AbstractFileSystem]:
    """The sorted Parquet files of one table (searched recursively) and the fsspec filesystem they are on.

    Paths are filesystem paths (no protocol). A missing table folder gives an empty list.
    """
    if table not in TABLE_SCHEMAS:
        raise ValueError(f"table must be one of {sorted(TABLE_SCHEMAS)}, got {table!r}")
    out = Output.resolve(output)
    fs, folder = out.fs, out.table(table)
    if not fs.isdir(folder):
        return [], fs
    files = [p for p in fs.find(folder) if _is_data_file(p[len(folder) + 1 :])]
    return sorted(files), fs


def table_bytes(output: Output | str) -> int:
    """Bytes of the Parquet files of both tables of ``output``."""
    out = Output.resolve(output)
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
    out = Output.resolve(output)
    image_filter = pc.field("image_id") == image_id
    images = open_table(out, IMAGES_TABLE).to_table(filter=image_filter).to_pylist()
    segments = open_table(out, SEGMENTS_TABLE).to_table(filter=image_filter).to_pylist()
    return (images[0] if images else None), sorted(segments, key=lambda r: r["segment_id"])
