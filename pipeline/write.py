"""Commits: the model actor's shard call commits its result rows as Parquet parts; nothing passes through the driver.

Layout under OUTPUT/::

    segments/part-<hash>.parquet   one row per segment   (pipeline.schema.SEGMENTS_SCHEMA)
    images/part-<hash>.parquet     one row per image     (pipeline.schema.IMAGES_SCHEMA): the commit record
    _runs/<run_id>.json            each run's settings, weights checksum, versions and counts
    _SUCCESS                       the last run finished: its counts and the output's totals
    _lease.json                    the lease of the run writing the output (`pipeline.lease`)

`write_part` commits one part of at most ``--rows-per-file`` images (`PartGatherer` cuts a shard's results
into parts: files sized for queries, not one per model batch): its ``segments`` file, then its ``images``
file, each published whole (`pipeline.storage.publish`). The part is named after a hash of its sorted
image ids, so Ray's retry of a shard call whose actor died (before, between or after the two files)
overwrites the same two objects instead of adding a second copy. Every commit checks first that the run
still holds the output's lease. The driver writes the run's record to ``_runs/`` and removes ``_SUCCESS``
before any shard call starts. A shard call returns one small row per part (`PART_ROW_SCHEMA`): the driver
sees those, never results.

The protocol as a whole (what is committed, what a resume redoes) is stated in `pipeline.resume`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.ids import SHARD_ITSELF, member_id
from pipeline.lease import check_holder
from pipeline.output_paths import Output
from pipeline.schema import (
    IMAGES_SCHEMA,
    IMAGES_TABLE,
    RESULT_SCHEMA,
    SEGMENTS_SCHEMA,
    SEGMENTS_TABLE,
    STATUS_ERROR,
    STATUS_OK,
)
from pipeline.storage import publish

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
COMPRESSION = "zstd"
COUNTS_KEY = b"panoptic_flow.counts"  # images parts: their counts as JSON in the Parquet footer


def part_name(image_ids: list[str]) -> str:
    """``part-<hash>.parquet``, the hash (96 bits) taken over the sorted image ids: the same images, the same
    name, whichever attempt writes them."""
    digest = hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


def split_results(results: pa.Table, *, run_id: str) -> tuple[pa.Table, pa.Table]:
    """`RESULT_SCHEMA` rows -> (images table, segments table) in the output schemas."""
    results = results.cast(RESULT_SCHEMA) if results.schema != RESULT_SCHEMA else results
    segments_list = results.column("segments").combine_chunks()
    counts = pc.fill_null(pc.list_value_length(segments_list), 0).cast(pa.int32())
    n = results.num_rows
    images = pa.table(
        {
            **{name: results.column(name) for name in IMAGES_SCHEMA.names if name in RESULT_SCHEMA.names},
            "num_segments": counts,
            "run_id": pa.array([run_id] * n, pa.string()),
        }
    ).select(IMAGES_SCHEMA.names)
    flat = pc.list_flatten(segments_list)  # struct array, one element per segment
    parents = pc.list_parent_indices(segments_list)
    columns = {name: pc.take(results.column(name), parents) for name in ("image_id", "source")}
    columns |= {name: flat.field(name) for name in SEGMENTS_SCHEMA.names if name not in columns}
    return images.cast(IMAGES_SCHEMA), pa.table(columns).cast(SEGMENTS_SCHEMA)


def write_part(results: pa.Table, *, output: str, run_id: str, node_id: str = "") -> dict[str, object] | None:
    """Commit ``results`` (`RESULT_SCHEMA` rows) as one part under ``output``. Returns its `PART_ROW_SCHEMA`
    row (None for no rows). Raises `pipeline.lease.LeaseLost` when the run no longer holds the output."""
    if results.num_rows == 0:
        return None
    started = time.perf_counter()
    out = Output.of(output)
    images, segments = split_results(_unique_ids(results), run_id=run_id)
    name = part_name(images.column("image_id").to_pylist())
    check_holder(output, run_id)
    counts = part_counts(images)
    written = publish(out.fs, out.part(SEGMENTS_TABLE, name), parquet_bytes(segments))
    written += publish(out.fs, out.part(IMAGES_TABLE, name), parquet_bytes(images, counts=counts))  # commit
    return {"part": name, **counts, "bytes": written, "node_id": node_id, "seconds": time.perf_counter() - started}


class PartGatherer:
    """Result tables in, whole parts out: `add` returns the parts of exactly ``rows_per_file`` rows that became
    full (in order), `rest` what is left at the end of a shard. Holds less than one part."""

    def __init__(self, rows_per_file: int) -> None:
        self.rows_per_file = rows_per_file
        self._held: list[pa.Table] = []
        self._rows = 0

    def add(self, results: pa.Table) -> list[pa.Table]:
        self._held.append(results)
        self._rows += results.num_rows
        parts = []
        while self._rows >= self.rows_per_file:
            table = pa.concat_tables(self._held)
            parts.append(table.slice(0, self.rows_per_file))
            rest = table.slice(self.rows_per_file)
            self._held, self._rows = [rest], rest.num_rows
        return parts

    def rest(self) -> pa.Table | None:
        table = pa.concat_tables(self._held) if self._rows else None
        self._held, self._rows = [], 0
        return table


def _unique_ids(results: pa.Table) -> pa.Table:
    """Rows whose id came before in this part (``--id-column`` values repeated across shards; inputs are
    de-duplicated upstream) become error rows under the id of their shard and member."""
    ids = results.column("image_id").to_pylist()
    if len(set(ids)) == len(ids):
        return results
    rows = results.to_pylist()
    first: dict[str, str] = {}
    for row in rows:
        if row["image_id"] in first:
            error = f"repeated image id {row['image_id']!r} (also read from {first[row['image_id']]})"
            row |= {"image_id": member_id(row["source"], row["member"] or SHARD_ITSELF), "error": error}
            row |= {"status": STATUS_ERROR, "retryable": False, "segments": []}
        else:
            first[row["image_id"]] = row["source"]
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def parquet_bytes(table: pa.Table, *, counts: dict[str, int] | None = None) -> bytes:
    """A table as the bytes of a Parquet file (zstd); ``counts`` go into an images part's footer."""
    if counts is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), COUNTS_KEY: json.dumps(counts)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue().to_pybytes()


def part_counts(images: pa.Table) -> dict[str, int]:
    """The `pipeline.schema.Counts` of an ``images`` part's rows, as a dict."""
    status = images.column("status")
    ok = int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0)
    retryable = images.column("retryable") if "retryable" in images.column_names else pa.array([], pa.bool_())
    return {
        "images_ok": ok,
        "images_error": images.num_rows - ok,
        "images_retryable": int(pc.sum(retryable).as_py() or 0),
        "segments": int(np.sum(images.column("num_segments").to_numpy(zero_copy_only=False))),
    }
