"""The readers' choice of snapshot: ``--snapshot N`` and ``--as-of-run RUN_ID`` (``query``, ``show``,
``export-coco``, ``evaluate``), and the output they open with it.

Without either, a reader reads the output's latest snapshot (`pipeline.exactly_once.snapshots`): both tables as
one commit left them, whatever runs meanwhile. A snapshot or run that is not in the log is the user's mistake
(exit code 2: `SNAPSHOT_ERRORS`).
"""

from __future__ import annotations

import argparse

from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.snapshots import SnapshotNotFound
from pipeline.reading.output_tables import OutputNotFoundError, check_output

SNAPSHOT_ERRORS = (OutputNotFoundError, SnapshotNotFound)
"""What opening an output raises for a user's mistake: a folder that holds no output, a snapshot not kept."""


def add_snapshot_options(parser: argparse.ArgumentParser) -> None:
    """``--snapshot N`` and ``--as-of-run RUN_ID`` (one or the other)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--snapshot", type=int, metavar="N", default=None,
        help="read snapshot N of the output (default: the latest; `query OUTPUT 'FROM snapshots'` lists them)",
    )  # fmt: skip
    group.add_argument(
        "--as-of-run", metavar="RUN_ID", default=None,
        help="read the output as run RUN_ID left it (its last snapshot; run ids are in _runs/)",
    )  # fmt: skip


def open_output(args: argparse.Namespace) -> Output:
    """``args.output`` resolved once, checked to hold an output, and pinned to the snapshot the flags name."""
    return check_output(Output.of(args.output), snapshot=args.snapshot, as_of_run=args.as_of_run)
