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

from jobs.options import add_options, build, flag_message, parse_values
from jobs.segment_options import OPTIONS, RunOptions
from jobs.usage import CommandParser, UsageError, report, run_command
from pipeline.config import JobConfig, redact_uri

PROG = "panoptic-flow segment"
WEIGHTS_HINT = "use --weights PATH for a checkpoint on disk, or --weights synthetic for demo weights"


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
    parser = CommandParser(
        prog=PROG,
        description="Run DETR panoptic segmentation over images and write Parquet tables (segments/, images/).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, OPTIONS)
    return parser


def parse_job(argv: Sequence[str] | None = None) -> tuple[JobConfig, RunOptions]:
    """The job's configuration and run options from ``argv`` (and the ``--config`` job file it names).

    A bad flag, job file or value exits with a one-line error naming the flag, and code 2 (``SystemExit``).
    """
    parser = build_parser()
    values = parse_values(parser, OPTIONS, argv)
    try:
        return build(JobConfig, values), build(RunOptions, values)
    except ValueError as exc:
        raise SystemExit(report(PROG, flag_message(str(exc), OPTIONS))) from None


def check_output_is_a_folder(output: str) -> None:
    """Raise `UsageError` when the local ``output`` exists as a file: checked before the weights are fetched.
    (An object store is first reached by the run, whose error says how it could not be.)"""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(output)
    if isinstance(fs, LocalFileSystem) and fs.isfile(path):
        raise UsageError(f"the output {redact_uri(output)} is a file; give a folder or prefix", flag="--output")


def _without_credentials(line: str, config: JobConfig) -> str:
    """``line`` with every URI the user gave written as in the run record (no ``user:password@``, no query)."""
    for uri in sorted({*config.input.uris, config.output, config.model.weights}, key=len, reverse=True):
        line = line.replace(uri, redact_uri(uri))
    return line


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit code 0 done, 1 the job failed, 2 a user's mistake (`jobs.usage`)."""
    config, run = parse_job(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # torch and Ray load here, after the arguments are checked (and never for --help)
    from model.checkpoint import CheckpointError, CheckpointNotFound
    from pipeline.lease import LeaseHeld
    from pipeline.resume import SettingsChanged
    from pipeline.run import ClusterError, OutputError, run_job
    from pipeline.sources import InputError

    def body() -> int:
        check_output_is_a_folder(config.output)
        try:
            summary = run_job(config, **dataclasses.asdict(run))
        except CheckpointNotFound as exc:
            raise UsageError(_without_credentials(str(exc), config), flag="--weights", hint=WEIGHTS_HINT) from exc
        except CheckpointError as exc:
            raise UsageError(_without_credentials(str(exc), config), flag="--weights") from exc
        except (InputError, OutputError, LeaseHeld, SettingsChanged, ClusterError) as exc:
            raise UsageError(_without_credentials(str(exc), config)) from exc
        print(summary.line(config.output))
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
