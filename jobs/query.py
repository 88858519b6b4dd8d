"""`panoptic-flow query OUTPUT "SQL"`: DuckDB SQL over an output's tables.

Views (all read lazily from the Parquet files, filters and projections pushed down):

- ``segments``, ``images``: the two tables (columns in ``pipeline/schema.py``).
- ``image_categories``: one row per ``ok`` image: ``image_id, source, width, height, num_segments,
  categories`` (MAP category name -> number of segments) and ``category_list`` (sorted distinct names).
- ``category_counts``: one row per category: ``category_id, category, isthing, segments, images,
  total_area, mean_score``.

How the files are reached: each table is a ``pyarrow.dataset`` built by :func:`pipeline.outputs.open_table`
(fsspec -> ``pyarrow.fs.PyFileSystem(FSSpecHandler)``, so ``s3://`` goes through s3fs and the usual AWS
configuration) and registered with DuckDB as an Arrow scan. DuckDB never opens a URL itself, so its
``httpfs`` extension (downloaded on first use) is never needed, and the file-selection rules (recursive,
``_``/``.`` files skipped, no hive columns) are the same as in every other command.

Example: images with a dog covering more than 5 % of the frame::

    SELECT DISTINCT s.image_id
    FROM segments s JOIN images i USING (image_id)
    WHERE s.category = 'dog' AND s.area > 0.05 * i.width * i.height
    ORDER BY s.image_id
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from typing import Any, Literal

import duckdb

from pipeline.outputs import OutputNotFoundError, check_output, open_table
from pipeline.schema import IMAGES_TABLE, SEGMENTS_TABLE

OutputFormat = Literal["table", "csv", "json"]

DOG_OVER_5_PERCENT = """
SELECT DISTINCT s.image_id
FROM segments s JOIN images i USING (image_id)
WHERE s.category = 'dog' AND s.area > 0.05 * i.width * i.height
ORDER BY s.image_id
"""

_VIEWS = {
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


def connect(output: str, *, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``segments``, ``images``, ``image_categories``, ``category_counts``.

    The connection keeps the Arrow datasets alive; listing the files happens here, reading happens per
    query. Raises :class:`~pipeline.outputs.OutputNotFoundError` when ``output`` holds no output.
    """
    check_output(output)
    con = duckdb.connect(database)
    for table in (SEGMENTS_TABLE, IMAGES_TABLE):
        con.register(table, open_table(output, table))
    for name, sql in _VIEWS.items():
        con.execute(f"CREATE TEMP VIEW {name} AS {sql}")
    return con


def run_query(
    con: duckdb.DuckDBPyConnection, sql: str, *, limit: int | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows (at most ``limit``) of ``sql``."""
    result = con.execute(sql)
    if result.description is None:  # a statement without a result set
        return [], []
    columns = [d[0] for d in result.description]
    rows = result.fetchall() if limit is None else result.fetchmany(limit)
    return columns, rows


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def format_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: OutputFormat) -> str:
    """Render a result: an aligned text ``table``, ``csv`` with a header, or ``json`` (one object a line)."""
    if fmt == "json":
        return "".join(json.dumps(dict(zip(columns, row)), default=str, ensure_ascii=False) + "\n" for row in rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[("" if v is None else _cell(v)) for v in row] for row in rows])
        return buffer.getvalue()
    if fmt != "table":
        raise ValueError(f"format must be table, csv or json, got {fmt!r}")
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="panoptic-flow query",
        description="Run DuckDB SQL over an output's views: segments, images, image_categories, category_counts.",
        epilog=f"example (images with a dog larger than 5% of the frame):\n{DOG_OVER_5_PERCENT}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", help="output folder or URI (e.g. out/ or s3://bucket/run)")
    p.add_argument("sql", help="SQL to run")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="default: table")
    p.add_argument("--limit", type=int, default=None, help="print at most N rows (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the query's result to stdout."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        parser.error(f"--limit must be >= 0, got {args.limit}")
    try:
        con = connect(args.output)
    except OutputNotFoundError as e:  # a mistyped folder: say so, rather than print 0 rows
        print(f"panoptic-flow query: {e}", file=sys.stderr)
        return 2
    try:
        columns, rows = run_query(con, args.sql, limit=args.limit)
    except duckdb.Error as e:
        print(f"panoptic-flow query: {e}", file=sys.stderr)
        return 1
    finally:
        con.close()
    if columns:
        sys.stdout.write(format_rows(columns, rows, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
