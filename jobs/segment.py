"""`python -m jobs.segment` / `panoptic-flow segment`: DETR panoptic segmentation of images into Parquet.

Runs on the Ray cluster named by RAY_ADDRESS (as under `ray job submit --working-dir . -- python -m
jobs.segment ...`) or, when none is set, on an embedded local Ray. Re-running the same command with the
same --output resumes: committed images are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from jobs.options import add_options, build, flag_message, parse_values
from jobs.segment_options import OPTIONS, RunOptions
from jobs.usage import EXIT_FAILED, CommandParser, UsageError, report, run_command
from pipeline.config import JobConfig, redact_uri

# Ray retries a task that its memory monitor killed without bound by default (``task_oom_retries`` -1,
# "infinite oom retries"): one input that outgrows a worker's memory would make a job run forever. The owner
# of Ray Data's tasks is this driver process, which reads the setting from its environment when Ray starts
# (an embedded local Ray's processes inherit it too). Set here, before Ray is imported; a value set by the
# user wins.
OOM_RETRIES = 3
# Ray's core worker installs abseil's failure-signal handler in every process, the driver included: on SIGTERM
# it prints a stack trace and arms a 3-second alarm that aborts the process (SIGABRT, exit code 134) while the
# run is still marking its record and releasing its lease. Off in this driver (and in an embedded local Ray's
# processes, which inherit it): SIGTERM is then a Python exception, handled below.
RAY_ENVIRONMENT = {"RAY_task_oom_retries": str(OOM_RETRIES), "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}

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
    from pipeline.exactly_once.output_paths import Output
    from pipeline.inputs.storage import is_local

    out = Output.of(output)
    if is_local(out.fs) and out.fs.isfile(out.root):
        raise UsageError(f"the output {redact_uri(output)} is a file; give a folder or prefix", flag="--output")


class Stopped(BaseException):
    """The job was stopped by a signal (SIGTERM: what ``ray job stop`` and schedulers send). A BaseException,
    like KeyboardInterrupt, so that `pipeline.run.run_job` marks its run failed and releases the lease on the way
    out, and nothing catches it as an ordinary error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


STOP_EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}  # 143, 130


def _stopped_line(signum: int) -> str:
    return f"panoptic-flow segment: stopped by {signal.Signals(signum).name}; re-run the same command to resume"


class RedactSecrets(logging.Filter):
    """A handler filter: every record's message (and traceback) passes through `redact_uri` before it is shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact_uri(message), None
        return True


def _redact_handlers(*loggers: str) -> None:
    """`RedactSecrets` on every handler of these loggers ("" the root; Ray's own loggers have handlers of their
    own and do not propagate)."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())


def _set_up_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _redact_handlers("")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit codes (`jobs.usage`): 0 done; 1 the job failed (its traceback, redacted), or was
    stopped by its error budget (one line, `pipeline.error_budget`); 2 a user's mistake (one line); 143 / 130
    stopped by SIGTERM / SIGINT (one line; the run record says failed, the lease is released, re-running
    resumes). Nothing printed or logged here carries a secret (`pipeline.config.redact_uri`)."""
    config, run = parse_job(argv)
    _set_up_logging()
    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return _run(config, run)
    except Stopped as exc:
        return _stop(exc.signum)
    except KeyboardInterrupt:
        return _stop(signal.SIGINT)
    except SystemExit as exc:  # `ray.init` replaces the SIGTERM handler by one that calls sys.exit(SIGTERM)
        if exc.code == signal.SIGTERM:
            return _stop(signal.SIGTERM)
        raise
    except Exception:
        print(redact_uri(traceback.format_exc()), end="", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(config: JobConfig, run: RunOptions) -> int:
    # Ray loads here, after the arguments are checked (and never for --help); torch only in the model actors
    from model.checkpoint_source import CheckpointError, CheckpointNotFound
    from pipeline.error_budget import ErrorBudgetExceeded
    from pipeline.exactly_once.lease import LeaseHeld
    from pipeline.exactly_once.run_records import SettingsChanged
    from pipeline.inputs.sources import InputError
    from pipeline.run import OutputError, run_job
    from pipeline.segmenting.resources import ClusterError

    _redact_handlers("ray", "ray.data")  # configured when Ray was imported, just now

    def body() -> int:
        check_output_is_a_folder(config.output)
        try:
            summary = run_job(config, **dataclasses.asdict(run))
        except CheckpointNotFound as exc:
            raise UsageError(redact_uri(str(exc)), flag="--weights", hint=WEIGHTS_HINT) from exc
        except CheckpointError as exc:
            raise UsageError(redact_uri(str(exc)), flag="--weights") from exc
        except (InputError, OutputError, LeaseHeld, SettingsChanged, ClusterError) as exc:
            raise UsageError(redact_uri(str(exc))) from exc
        except ErrorBudgetExceeded as exc:  # the job ran and failed: one line, no traceback
            print(redact_uri(f"{PROG}: {exc}"), file=sys.stderr)
            return EXIT_FAILED
        print(redact_uri(summary.line(config.output)))
        if summary.bottleneck:
            print(summary.bottleneck)
        return 0

    return run_command(PROG, body)


def _stop(signum: int) -> int:
    """One line, then Ray shut down here (not at interpreter exit, where a signal-interrupted core worker could
    abort the process); the exit code says which signal."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM while shutting down changes nothing
    signal.alarm(0)  # no abort armed by a failure-signal handler (see RAY_ENVIRONMENT) may cut the shutdown short
    print(_stopped_line(signum), file=sys.stderr, flush=True)
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return STOP_EXIT_CODES[signum]


if __name__ == "__main__":
    sys.exit(main())
