"""`panoptic-flow query OUTPUT "SQL"`: DuckDB SQL over an output's tables.

The views (``segments``, ``images``, ``image_categories``, ``category_counts``) are those of
:mod:`pipeline.reading.duckdb_views`.

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

from jobs.snapshot_options import SNAPSHOT_ERRORS, add_snapshot_options, open_output
from jobs.usage import CommandParser, UsageError, run_command, warn_if_demo_weights
from pipeline.reading.duckdb_views import VIEWS, connect

PROG = "panoptic-flow query"
# errors of the SQL itself (syntax, unknown table or column, a cast or type that fails): the user's mistake;
# I/O and internal errors stay failures of the job (exit 1)
SQL_ERRORS = (duckdb.ProgrammingError, duckdb.DataError, duckdb.NotSupportedError)

OutputFormat = Literal["table", "csv", "json"]

DOG_OVER_5_PERCENT = """
SELECT DISTINCT s.image_id
FROM segments s JOIN images i USING (image_id)
WHERE s.category = 'dog' AND s.area > 0.05 * i.width * i.height
ORDER BY s.image_id
"""


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
    p = CommandParser(
        prog=PROG,
        description="Run DuckDB SQL over an output's views: segments, images, image_categories, category_counts.",
        epilog=f"example (images with a dog larger than 5% of the frame):\n{DOG_OVER_5_PERCENT}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", help="output folder or URI (e.g. out/ or s3://bucket/run)")
    add_snapshot_options(p)
    p.add_argument("sql", help="SQL to run")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="default: table")
    p.add_argument("--limit", type=int, default=None, help="print at most N rows (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the query's result to stdout. Exit code 0 done, 2 a user's mistake including an
    SQL error (`jobs.usage`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        parser.error(f"--limit: must be >= 0, got {args.limit}")

    def body() -> int:
        out = open_output(args)  # resolved once and pinned to one snapshot, for every reader below
        con = connect(out)  # a mistyped folder: say so, rather than print 0 rows
        try:
            warn_if_demo_weights(PROG, out)
            try:
                columns, rows = run_query(con, args.sql, limit=args.limit)
            except SQL_ERRORS as exc:
                reason = str(exc).split("\n\n", 1)[0]  # DuckDB's first paragraph; the rest points at the column
                raise UsageError(reason, flag="SQL", hint=f"views: {', '.join(VIEWS)}") from None
        finally:
            con.close()
        if columns:
            sys.stdout.write(format_rows(columns, rows, args.format))
        return 0

    return run_command(PROG, body, user_errors=SNAPSHOT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
