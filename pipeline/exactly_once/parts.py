"""A part: the unit of commit. Its name, its two Parquet files' bytes and counts, and how a shard's results are
cut into parts.

A part is one ``segments/part-<hash>.parquet`` file and one ``images/part-<hash>.parquet`` file holding the same images
(at most ``--rows-per-file``). `PartGatherer` cuts a shard's result rows into parts (files sized for queries, not one
per model batch); `split_results` turns a part's `pipeline.schema.RESULT_SCHEMA` rows into the two tables; `part_name`
hashes the sorted image ids and names the run, so the same images always get the same name in a run, whichever attempt
writes them, and a file is never rewritten by another run; `parquet_bytes` serialises a table (zstd), with an images
part's `part_counts` in its footer. How parts are committed, and what guarantees that gives, is
`pipeline.exactly_once.commit`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.inputs.ids import SHARD_ITSELF, member_id
from pipeline.schema import (
    IMAGES_SCHEMA,
    RESULT_SCHEMA,
    SEGMENTS_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    Counts,
)

PART_PREFIX = "part-"
COMPRESSION = "zstd"
COUNTS_KEY = b"panoptic_flow.counts"  # images parts: their counts as JSON in the Parquet footer


def part_name(image_ids: list[str], run_id: str) -> str:
    """``part-<hash>-<run_id>.parquet``, the hash (96 bits) taken over the sorted image ids: the same images in
    the same run, the same name, whichever attempt writes them; another run (a retraction's rewrite, a redo)
    writes a new file and never changes one that a snapshot lists (`pipeline.exactly_once.snapshots`)."""
    digest = hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}-{run_id}.parquet"


def part_run(name: str) -> str | None:
    """The run id in a part's file name (`part_name`); None for a part named before snapshots
    (``part-<hash>.parquet``)."""
    stem = name.removeprefix(PART_PREFIX).removesuffix(".parquet")
    return stem.split("-", 1)[1] if "-" in stem else None


def split_results(results: pa.Table, *, run_id: str) -> tuple[pa.Table, pa.Table]:
    """`RESULT_SCHEMA` rows -> (images table, segments table) in the output schemas; an image id repeated within
    the part becomes an error row (`_unique_ids`)."""
    results = results.cast(RESULT_SCHEMA) if results.schema != RESULT_SCHEMA else results
    results = _unique_ids(results)
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
    """The `pipeline.schema.Counts` of an ``images`` part's rows, as a dict (a format 1 part may lack
    ``retryable``: none counted)."""
    status = images.column("status")
    ok = int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0)
    retryable = images.column("retryable") if "retryable" in images.column_names else pa.array([], pa.bool_())
    counts = Counts(
        images_ok=ok,
        images_error=images.num_rows - ok,
        images_retryable=int(pc.sum(retryable).as_py() or 0),
        segments=int(np.sum(images.column("num_segments").to_numpy(zero_copy_only=False))),
    )
    return asdict(counts)
