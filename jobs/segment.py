"""`python -m jobs.segment` / `panoptic-flow segment`: DETR panoptic segmentation of images into Parquet.

Runs on the Ray cluster named by RAY_ADDRESS (as under `ray job submit --working-dir . -- python -m
jobs.segment ...`) or, when none is set, on an embedded local Ray. Re-running the same command with the
same --output resumes: committed images are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from jobs.options import Option, add_options, build, options, parse_values
from pipeline.config import JobConfig


@dataclass(frozen=True)
class RunOptions:
    """How this invocation runs the job: `pipeline.run.run_job`'s keyword arguments, by the same names.

    Not part of the job's configuration (`JobConfig`, recorded in ``_runs/<run_id>.json``). A new keyword argument of
    ``run_job`` that users set is a new field here, with ``metadata["help"]``.
    """

    allow_synthetic: bool = field(
        default=False,
        metadata={
            "option": "allow-synthetic-weights",
            "help": "with `--weights auto`: fall back to demo weights when the official file is unreachable "
            "(used by `make run`)",
        },
    )
    show_progress: bool = field(default=True, metadata={"option": "no-progress", "help": "no progress bar"})
    take_over_lease: bool = field(
        default=False,
        metadata={
            "help": "take the output's lease although another run seems to hold it (only when that run is dead: "
            "a lease on an object store expires 2 min after its holder stops renewing it)"
        },
    )
    verbose: bool = field(
        default=False, metadata={"help": "also show Ray Data's own messages (execution plans, memory advice)"}
    )
    allow_mixed_settings: bool = field(
        default=False,
        metadata={
            "help": "resume into an output made with other model settings (variant, weights, sizes, threshold, "
            "precision, batch mode, device preprocessing) on purpose: its rows then mix both"
        },
    )


OPTIONS: list[Option] = options(JobConfig) + options(RunOptions)

_EPILOG = """job file: every option above can also come from a YAML file given with --config; flags override it:

  # job.yaml
  input: [s3://bucket/images/]
  output: s3://bucket/runs/r50/
  device: cuda
  max-actors: 16

  python -m jobs.segment --config job.yaml --max-actors 4
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from the fields of `JobConfig` and `RunOptions` (see `jobs/options.py`)."""
    parser = argparse.ArgumentParser(
        prog="panoptic-flow segment",
        description="Run DETR panoptic segmentation over images and write Parquet tables (segments/, images/).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, OPTIONS)
    return parser


def parse_job(argv: Sequence[str] | None = None) -> tuple[JobConfig, RunOptions]:
    """The job's configuration and run options from ``argv`` (and the ``--config`` job file it names).

    A bad flag, job file or value exits with a one-line error and code 2 (argparse's ``SystemExit``).
    """
    parser = build_parser()
    values = parse_values(parser, OPTIONS, argv)
    try:
        return build(JobConfig, values), build(RunOptions, values)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    config, run = parse_job(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # torch and Ray load here, after the arguments are checked (and never for --help)
    from model.checkpoint import CheckpointError
    from pipeline.lease import LeaseHeld
    from pipeline.resources import ClusterError
    from pipeline.resume import SettingsChanged
    from pipeline.run import OutputError, run_job
    from pipeline.sources import InputError

    try:
        summary = run_job(config, **dataclasses.asdict(run))
    except (InputError, CheckpointError, OutputError, LeaseHeld, SettingsChanged, ClusterError) as exc:
        print(f"panoptic-flow segment: error: {exc}", file=sys.stderr)
        return 2
    print(summary.line(config.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
