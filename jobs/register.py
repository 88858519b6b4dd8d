"""`panoptic-flow register OUTPUT --format delta|iceberg`: one snapshot of an output registered, in place, as a
Delta table or an Apache Iceberg table per output table (`pipeline.reading.lakehouse`), so that Spark, Trino,
DuckDB or Polars read it through their own catalog. No Parquet file is copied or rewritten.

The snapshot is the latest by default, or ``--snapshot N`` / ``--as-of-run RUN_ID`` (`jobs.snapshot_options`).
Exit codes (`jobs.usage`): 0 registered (or already registered), 2 a user's mistake: no output, a snapshot not
kept, an output without snapshots, an ``s3://`` output without ``--catalog`` for Iceberg, the extra not installed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.snapshot_options import SNAPSHOT_ERRORS, add_snapshot_options, open_output
from jobs.usage import CommandParser, UsageError, run_command
from pipeline.exactly_once.snapshots import snapshot_at
from pipeline.reading.lakehouse import DEFAULT_NAMESPACE, register_delta, register_iceberg
from pipeline.reading.output_tables import NO_SNAPSHOT, snapshot_files
from pipeline.schema import IMAGES_TABLE, SEGMENTS_TABLE

PROG = "panoptic-flow register"


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Register one snapshot of an output as a Delta or an Iceberg table per output table (in place).",
    )
    p.add_argument("output", help="output folder or URI")
    p.add_argument("--format", choices=["delta", "iceberg"], required=True, help="the table format to register")
    add_snapshot_options(p)
    p.add_argument(
        "--catalog", default=None, metavar="NAME",
        help="Iceberg: a catalog pyiceberg's load_catalog knows (~/.pyiceberg.yaml, PYICEBERG_CATALOG__NAME__*); "
        "default for a local output: a SQLite catalog in OUTPUT/_iceberg/",
    )  # fmt: skip
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"Iceberg namespace (default: {DEFAULT_NAMESPACE})")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print what was registered. Exit code 0 done, 2 a user's mistake (`jobs.usage`)."""
    args = _parser().parse_args(argv)
    # pyiceberg warns for each column of a file without Parquet statistics (a part with no segments has none)
    logging.getLogger("pyiceberg.io.pyarrow").setLevel(logging.ERROR)

    def body() -> int:
        out = open_output(args)
        if out.at == NO_SNAPSHOT:
            raise UsageError(
                f"{args.output} has no snapshots yet (written before they existed)",
                hint="run the same `segment` command on it once: its start writes the first snapshot",
            )
        snapshot = snapshot_at(out, out.at)  # type: ignore[arg-type]
        uris = snapshot_files(out)
        files = {table: [out.part(table, uri.rsplit("/", 1)[-1]) for uri in uris[table]]
                 for table in (SEGMENTS_TABLE, IMAGES_TABLE)}  # fmt: skip
        try:
            if args.format == "delta":
                versions = register_delta(out, files, snapshot=snapshot.seq, run_id=snapshot.run_id)
                where = ", ".join(f"{table}: Delta version {v}" for table, v in versions.items())
            else:
                tables = register_iceberg(out, files, snapshot=snapshot.seq, run_id=snapshot.run_id,
                                          catalog=args.catalog, namespace=args.namespace)  # fmt: skip
                where = ", ".join(tables.values())
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        except ValueError as exc:  # an s3:// output without --catalog, a newer snapshot registered already
            raise UsageError(str(exc)) from None
        print(f"registered snapshot {snapshot.seq} (run {snapshot.run_id}, {len(snapshot.parts)} parts): {where}")
        return 0

    return run_command(PROG, body, user_errors=SNAPSHOT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
