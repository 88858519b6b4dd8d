"""Reading what an output has committed: each images part's counts (`inspect_parts`, from its footer) and its
rows as the resume matches them (`committed_rows`).

Both are Ray stage functions over ``{"path"}`` batches of committed images parts (plain pyarrow: CPU workers
import this module without torch); `inspect_output` runs the first in the driver for a small output, on Ray
workers otherwise, and has the committer quarantine every part that cannot be read (`pipeline.exactly_once.commit`).
Parts of output format 1 (`pipeline.schema.OUTPUT_FORMAT_VERSION`) lack the footer counts, the ``member`` and
the ``retryable`` columns: they are read from their columns and old ids here, and nowhere else.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.parts import COUNTS_KEY, part_counts
from pipeline.inputs.ids import member_of_old_row
from pipeline.schema import COMMITTED_SCHEMA, INSPECTION_SCHEMA, Counts
from pipeline.segmenting.poison import is_poisoned_error

if TYPE_CHECKING:
    from pipeline.exactly_once.commit import OutputCommitter

INSPECTION_BLOCKS = 64  # at most this many Ray tasks read the footers of a large output


@dataclass
class OutputState:
    """What a run found in its output before doing anything."""

    parts: list[str] = field(default_factory=list)  # committed images parts (paths in the output's fs)
    totals: Counts = field(default_factory=Counts)  # over those parts
    quarantined: list[str] = field(default_factory=list)  # part names moved aside


def inspect_output(committer: OutputCommitter, parts: list[str], *, local: bool) -> OutputState:
    """The committed ``parts``' counts, read from their footers (here when ``local``, else by Ray workers);
    each unreadable part quarantined by ``committer``."""
    state = OutputState()
    if not parts:
        return state
    output = committer.out.uri
    if local:
        rows: Any = inspect_parts({"path": np.array(parts, dtype=object)}, output=output).to_pylist()
    else:
        import ray.data

        paths = ray.data.from_items(
            [{"path": p} for p in parts], override_num_blocks=min(len(parts), INSPECTION_BLOCKS)
        )
        rows = paths.map_batches(inspect_parts, batch_format="numpy", fn_kwargs={"output": output}).iter_rows()
    for row in rows:
        if row["problem"]:
            committer.quarantine(row["path"], problem=row["problem"])
            state.quarantined.append(posixpath.basename(row["path"]))
        else:
            state.parts.append(row["path"])
            state.totals.add(row)
            committer.snapshots.count(posixpath.basename(row["path"]), row)  # from the footer, for the snapshot
    state.parts.sort()
    return state


def inspect_parts(batch: dict[str, np.ndarray], *, output: str) -> pa.Table:
    """{"path"} of committed ``images`` parts -> their counts from the Parquet footer (format 1 parts without
    them: from their columns), or the ``problem`` that makes a part unreadable (`INSPECTION_SCHEMA`)."""
    fs = Output.of(output).fs  # on a worker: the output resolved as everywhere
    rows = []
    for path in (str(p) for p in batch["path"]):
        row: dict[str, Any] = {"path": path, "problem": None}
        try:
            with fs.open(path, "rb") as f:
                file = pq.ParquetFile(f)
                metadata = file.schema_arrow.metadata or {}
                if COUNTS_KEY in metadata:
                    row |= json.loads(metadata[COUNTS_KEY])
                else:  # format 1
                    columns = [c for c in ("status", "retryable", "num_segments") if c in file.schema_arrow.names]
                    row |= part_counts(file.read(columns=columns))
        except FileNotFoundError:
            continue  # gone since the listing (moved aside by hand): nothing committed there any more
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            row["problem"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=INSPECTION_SCHEMA)


def committed_rows(batch: dict[str, np.ndarray], *, output: str, retry_poisoned: bool = False) -> pa.Table:
    """{"path"} of committed ``images`` parts -> one `COMMITTED_SCHEMA` row per committed image. Format 1 parts
    get ``member`` from their old ids (``shard#member``) and ``retryable`` false. With ``retry_poisoned``
    (``--retry-poisoned``), a row of an image that killed its model worker twice (`pipeline.segmenting.poison`) reads as
    retryable, so that the plan redoes it."""
    fs = Output.of(output).fs  # on a worker: the output resolved as everywhere
    tables = [COMMITTED_SCHEMA.empty_table()]
    for path in (str(p) for p in batch["path"]):
        with fs.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            names = set(file.schema_arrow.names)
            wanted = ("image_id", *COMMITTED_SCHEMA.names, *(("error",) if retry_poisoned else ()))
            table = file.read(columns=[c for c in wanted if c in names])
        n = table.num_rows
        columns = {}
        for field_ in COMMITTED_SCHEMA:
            if field_.name in names:
                columns[field_.name] = table.column(field_.name).cast(field_.type)
            elif field_.name == "member":
                columns["member"] = members_of(table)
            elif field_.name == "retryable":
                columns["retryable"] = pa.array(np.zeros(n, dtype=bool))
            elif field_.name == "part":
                columns["part"] = pa.array([posixpath.basename(path)] * n, pa.string())
            else:
                columns[field_.name] = pa.nulls(n, field_.type)
        if retry_poisoned and "error" in names:
            poisoned = pa.array([is_poisoned_error(e) for e in table.column("error").to_pylist()], pa.bool_())
            columns["retryable"] = pc.or_(columns["retryable"], poisoned)
        tables.append(pa.table(columns, schema=COMMITTED_SCHEMA))
    return pa.concat_tables(tables)


def members_of(images: pa.Table) -> pa.Array:
    """The ``member`` column of images rows: the column itself, or for a format 1 part, read from the ids."""
    if "member" in images.column_names:
        return images.column("member")
    ids, sources = images.column("image_id").to_pylist(), images.column("source").to_pylist()
    return pa.array([member_of_old_row(i, s) for i, s in zip(ids, sources)], pa.string())
