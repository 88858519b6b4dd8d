"""An output's tables as DuckDB views: ``segments``, ``images``, ``image_categories``, ``category_counts``,
``snapshots``.

Views (all read lazily from the Parquet files, filters and projections pushed down):

- ``segments``, ``images``: the two tables (columns in ``pipeline/schema.py``).
- ``image_categories``: one row per ``ok`` image: ``image_id, source, width, height, num_segments,
  categories`` (MAP category name -> number of segments) and ``category_list`` (sorted distinct names).
- ``category_counts``: one row per category: ``category_id, category, isthing, segments, images,
  total_area, mean_score``.
- ``snapshots``: one row per kept snapshot (`pipeline.exactly_once.snapshots`): ``seq, run_id, kind, written,
  parts, images, segments`` and ``read`` (true for the one the other views read).

The views read one snapshot of the output (the latest by default, or ``snapshot`` / ``as_of_run``:
:func:`pipeline.reading.output_tables.pin`), so ``segments`` and ``images`` always agree.

How the files are reached: each table is a ``pyarrow.dataset`` built by
:func:`pipeline.reading.output_tables.open_table`
(fsspec -> ``pyarrow.fs.PyFileSystem(FSSpecHandler)``, so ``s3://`` goes through s3fs and the usual AWS
configuration) and registered with DuckDB as an Arrow scan. DuckDB never opens a URL itself, so its
``httpfs`` extension (downloaded on first use) is never needed, and the file-selection rules (recursive,
``_``/``.`` files skipped, no hive columns) are the same as in every other command.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.snapshots import describe_snapshots
from pipeline.reading.output_tables import NO_SNAPSHOT, check_output, open_table
from pipeline.schema import IMAGES_TABLE, SEGMENTS_TABLE

_VIEW_SQL = {
    "image_categories": """
        SELECT i.image_id, any_value(i.source) AS source, any_value(i.width) AS width,
               any_value(i.height) AS height, count(s.segment_id) AS num_segments,
               coalesce(histogram(s.category) FILTER (WHERE s.category IS NOT NULL),
                        MAP {}::MAP(VARCHAR, UBIGINT)) AS categories,
               coalesce(list(DISTINCT s.category ORDER BY s.category)
                        FILTER (WHERE s.category IS NOT NULL), []::VARCHAR[]) AS category_list
        FROM images i LEFT JOIN segments s ON s.image_id = i.image_id
        WHERE i.status = 'ok'
        GROUP BY i.image_id
    """,
    "category_counts": """
        SELECT category_id, any_value(category) AS category, any_value(isthing) AS isthing,
               count(*) AS segments, count(DISTINCT image_id) AS images,
               sum(area) AS total_area, avg(score) AS mean_score
        FROM segments
        GROUP BY category_id
    """,
}


SNAPSHOTS_SCHEMA = pa.schema(
    [("seq", pa.int64()), ("run_id", pa.string()), ("kind", pa.string()), ("written", pa.string()),
     ("parts", pa.int64()), ("images", pa.int64()), ("segments", pa.int64()), ("read", pa.bool_())]
)  # fmt: skip

VIEWS = (SEGMENTS_TABLE, IMAGES_TABLE, *_VIEW_SQL, "snapshots")
"""The names a query can use."""


def connect(
    output: Output | str, *, snapshot: int | None = None, as_of_run: str | None = None, database: str = ":memory:"
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``segments``, ``images``, ``image_categories``, ``category_counts`` over
    one snapshot (the latest, or ``snapshot`` / ``as_of_run``), and ``snapshots``.

    The connection keeps the Arrow datasets alive; listing the files happens here, reading happens per
    query. Raises :class:`~pipeline.reading.output_tables.OutputNotFoundError` when ``output`` holds no output,
    `pipeline.exactly_once.snapshots.SnapshotNotFound` for a snapshot or run not in its log.
    """
    out = check_output(output, snapshot=snapshot, as_of_run=as_of_run)
    con = duckdb.connect(database)
    for table in (SEGMENTS_TABLE, IMAGES_TABLE):
        con.register(table, open_table(out, table))
    for name, sql in _VIEW_SQL.items():
        con.execute(f"CREATE TEMP VIEW {name} AS {sql}")
    listed = describe_snapshots(out) if out.at != NO_SNAPSHOT else []
    rows = [{**row, "read": row["seq"] == out.at} for row in listed]
    con.register("snapshots", pa.Table.from_pylist(rows, schema=SNAPSHOTS_SCHEMA))
    return con
