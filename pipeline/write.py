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
   writes), then skips every image id already in ``images/``.

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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

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
        self._seen: set[str] = set()

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

    def committed_image_ids(self) -> set[str]:
        """Image ids already committed by earlier runs (from the ``images`` parts)."""
        if not self._parts(IMAGES_TABLE):
            return set()
        dataset = pads.dataset(
            self._path(IMAGES_TABLE), format="parquet", filesystem=PyFileSystem(FSSpecHandler(self.fs))
        )
        ids = set(dataset.to_table(columns=["image_id"]).column("image_id").to_pylist())
        self._seen |= ids
        return ids

    # -- writing -----------------------------------------------------------------------------------------
    def add(self, results: pa.Table) -> None:
        """Buffer result rows (pipeline.predict.RESULT_SCHEMA); duplicates of a committed id are dropped."""
        ids = results.column("image_id").to_pylist()
        keep = []
        for i, image_id in enumerate(ids):  # first occurrence only: repeats within this table count too
            if image_id not in self._seen:
                self._seen.add(image_id)
                keep.append(i)
        if len(keep) != len(ids):
            log.info("dropping %d duplicate image ids", len(ids) - len(keep))
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
        self._buffer, self._buffered_rows = [], 0
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
