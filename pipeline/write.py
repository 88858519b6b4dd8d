"""Committing results: Parquet parts written whole, the images part last, resumable by image id.

Layout under OUTPUT/::

    segments/part-<run>-<seq>.parquet   one row per segment   (pipeline.schema.SEGMENTS_SCHEMA)
    images/part-<run>-<seq>.parquet     one row per image     (pipeline.schema.IMAGES_SCHEMA)
    _run.json                           the run's configuration, weights checksum and versions
    _SUCCESS                            written when a run finished, with its counts

Protocol (exactly once per image across crashes and re-runs):

1. a part's ``segments`` file is written first, then its ``images`` file: the images file is the commit
   record of every image in the part (ok or error). Each file appears whole: local files are written under
   a hidden temporary name and renamed; object stores publish an object only when its upload completes;
2. a re-run first deletes ``segments`` parts that have no ``images`` part (a crash between the two
   writes), then skips every image id already in ``images/``. That filter runs on Ray workers
   (`pipeline.run.build_refs`, fed by the stage functions below): the driver holds the list of committed
   parts, never the committed ids.

A part is written once at least ``rows_per_file`` images are buffered (whole result blocks, so parts hold
a little more), zstd-compressed: files sized for queries, not one file per image.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.schema import IMAGES_SCHEMA, IMAGES_TABLE, SEGMENTS_SCHEMA, SEGMENTS_TABLE, STATUS_OK

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"


def split_results(results: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Result rows with nested ``segments`` -> (images table, segments table) in the output schemas."""
    segments_list = results.column("segments").combine_chunks()
    images = pa.table(
        {
            "image_id": results.column("image_id"),
            "source": results.column("source"),
            "width": results.column("width"),
            "height": results.column("height"),
            "status": results.column("status"),
            "error": results.column("error"),
            "num_segments": pc.fill_null(pc.list_value_length(segments_list), 0).cast(pa.int32()),
        },
        schema=IMAGES_SCHEMA,
    )
    flat = pc.list_flatten(segments_list)  # struct array, one element per segment
    parents = pc.list_parent_indices(segments_list)
    columns = {
        "image_id": pc.take(results.column("image_id"), parents),
        "source": pc.take(results.column("source"), parents),
    }
    for name in ("segment_id", "category_id", "category", "isthing", "score", "area", "bbox", "rle"):
        columns[name] = flat.field(name)
    segments = pa.table(columns).cast(SEGMENTS_SCHEMA)
    return images, segments


@dataclass
class OutputWriter:
    """Buffers result rows and commits them in parts (see the module docstring)."""

    output: str
    run_id: str
    rows_per_file: int = 2048
    counts: dict[str, int] = field(default_factory=lambda: {"images_ok": 0, "images_error": 0, "segments": 0})

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.output)
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._buffer: list[pa.Table] = []
        self._buffered_rows = 0
        self._seq = 0
        self._buffered_ids: set[str] = set()  # ids of the part being buffered: bounded by rows_per_file

    # -- resume ------------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _parts(self, table: str) -> set[str]:
        try:
            names = self.fs.ls(self._path(table), detail=False)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(n) for n in names if posixpath.basename(n).endswith(".parquet")}

    def remove_orphans(self) -> int:
        """Delete segments parts whose images part is missing (a crash between the two writes) and hidden
        temporary files of a write that was interrupted."""
        orphans = self._parts(SEGMENTS_TABLE) - self._parts(IMAGES_TABLE)
        for name in sorted(orphans):
            log.warning("removing uncommitted segments part %s from an interrupted run", name)
            self.fs.rm(self._path(SEGMENTS_TABLE, name))
        for table in (SEGMENTS_TABLE, IMAGES_TABLE):
            try:
                names = self.fs.ls(self._path(table), detail=False)
            except FileNotFoundError:
                continue
            for name in names:
                if posixpath.basename(name).startswith(".") and name.endswith(".tmp"):
                    self.fs.rm(name)
        return len(orphans)

    def committed_parts(self) -> list[str]:
        """Paths (in ``self.fs``) of the committed ``images`` parts, the commit records of earlier runs."""
        return sorted(self._path(IMAGES_TABLE, name) for name in self._parts(IMAGES_TABLE))

    # -- writing -----------------------------------------------------------------------------------------
    def add(self, results: pa.Table) -> None:
        """Buffer result rows (pipeline.predict.RESULT_SCHEMA).

        Inputs reach the model once each (repeats and committed ids are removed before reading, see
        `pipeline.run.build_refs`); as a cheap guard, a repeat of an id within the part being buffered is
        dropped. Nothing run-wide is kept: memory does not grow with the number of inputs.
        """
        ids = results.column("image_id").to_pylist()
        keep = []
        for i, image_id in enumerate(ids):  # first occurrence only: repeats within this table count too
            if image_id not in self._buffered_ids:
                self._buffered_ids.add(image_id)
                keep.append(i)
        if len(keep) != len(ids):
            log.warning("dropping %d repeated image ids", len(ids) - len(keep))
            results = results.take(pa.array(keep, type=pa.int64()))  # typed: an empty list has no type
        if results.num_rows:
            self._buffer.append(results)
            self._buffered_rows += results.num_rows
        if self._buffered_rows >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one part (segments first, images last)."""
        if not self._buffer:
            return
        results = pa.concat_tables(self._buffer)
        self._buffer, self._buffered_rows, self._buffered_ids = [], 0, set()
        images, segments = split_results(results)
        name = f"part-{self.run_id}-{self._seq:06d}.parquet"
        self._seq += 1
        self._write(SEGMENTS_TABLE, name, segments)
        self._write(IMAGES_TABLE, name, images)  # the commit record
        ok = int(pc.sum(pc.equal(images.column("status"), STATUS_OK)).as_py() or 0)
        self.counts["images_ok"] += ok
        self.counts["images_error"] += images.num_rows - ok
        self.counts["segments"] += segments.num_rows

    def _write(self, table: str, name: str, data: pa.Table) -> None:
        final = self._path(table, name)
        self.fs.makedirs(self._path(table), exist_ok=True)
        if self._local:
            temporary = self._path(table, f".{name}.{uuid.uuid4().hex}.tmp")
            pq.write_table(data, temporary, compression="zstd")
            os.replace(temporary, final)
        else:
            with self.fs.open(final, "wb") as f:  # the object is published when the upload completes
                pq.write_table(data, f, compression="zstd")

    def write_json(self, name: str, payload: dict) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(self._path(name), "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)

    def clear_success(self) -> None:
        if self.fs.exists(self._path(SUCCESS_FILE)):
            self.fs.rm(self._path(SUCCESS_FILE))


# ------------------------------------------------------------------------------------------------------
# Ray stage functions over the committed ``images`` parts (pure: no Ray import; `pipeline.run` wires them)
# ------------------------------------------------------------------------------------------------------


def committed_file_keys(batch: pa.Table) -> pa.Table:
    """Committed images rows {"image_id", "source"} -> {"uri", "listed": 0, "committed": 1} for the rows of
    whole files (``image_id == source``), the other side of the aggregation in `pipeline.sources.files_to_do`."""
    files = batch.filter(pc.equal(batch.column("image_id"), batch.column("source")))
    n = files.num_rows
    return pa.table(
        {
            "uri": files.column("image_id").cast(pa.string()),
            "listed": pa.array(np.zeros(n, dtype=np.int8)),
            "committed": pa.array(np.ones(n, dtype=np.int8)),
        }
    )


def committed_shard_members(batch: pa.Table, *, kinds: dict[str, str]) -> pa.Table:
    """Committed images rows {"image_id", "source"} -> {"uri": source, "kind", "image_id"} for the rows read
    from one of the shards in ``kinds`` ({shard URI: "tar" | "parquet"}; the driver's own listing)."""
    index = pc.index_in(batch.column("source").cast(pa.string()), value_set=pa.array(list(kinds), pa.string()))
    found = pc.is_valid(index)
    return pa.table(
        {
            "uri": batch.column("source").cast(pa.string()).filter(found),
            "kind": pa.array(list(kinds.values()), pa.string()).take(index.filter(found)),
            "image_id": batch.column("image_id").cast(pa.string()).filter(found),
        }
    )


def committed_rows(batch: dict[str, np.ndarray], *, fs: fsspec.AbstractFileSystem) -> dict[str, np.ndarray]:
    """{"path"} of committed ``images`` parts -> {"num_rows"} read from each part's Parquet footer."""
    counts = []
    for path in batch["path"]:
        with fs.open(str(path), "rb") as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    return {"num_rows": np.array(counts, dtype=np.int64)}
