"""`panoptic-flow` console command: one sub-command per job module.

Each sub-command is a module in `jobs/` with a ``main(argv: list[str] | None) -> int``; this file only
dispatches, so ``panoptic-flow segment ...`` and ``python -m jobs.segment ...`` are the same program. The
exit codes are those of `jobs.usage`: a bare ``panoptic-flow`` prints the help on stderr and exits 2 (as
argparse does for a missing command); ``panoptic-flow --help`` prints it on stdout and exits 0.
"""

from __future__ import annotations

import importlib
import sys

from jobs.usage import EXIT_DONE, EXIT_USAGE, report

COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("jobs.segment", "run DETR panoptic segmentation over images and write Parquet"),
    "query": ("jobs.query", "run SQL (DuckDB) over an output's segments/images tables"),
    "show": ("jobs.show", "draw one result (or a grid of results) as a PNG"),
    "export-coco": ("jobs.export_coco", "write COCO panoptic PNGs + JSON from an output"),
    "evaluate": ("jobs.evaluate", "compute PQ / SQ / RQ against COCO panoptic ground truth"),
    "register": ("jobs.register", "register an output snapshot as Delta or Iceberg tables (in place)"),
}


def _usage() -> str:
    lines = ["usage: panoptic-flow COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`panoptic-flow COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its job module's ``main``."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    if args[0] in ("-h", "--help"):
        print(_usage())
        return EXIT_DONE
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        return report("panoptic-flow", f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
