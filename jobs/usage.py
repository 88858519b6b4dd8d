"""The exit-code convention of every command, and the one-line error that reports a user's mistake.

Every ``panoptic-flow`` command exits with

- ``0``: done;
- ``1``: the job ran and failed (an unexpected error: Python's traceback and its exit code 1; a job stopped by
  its error budget, ``--max-error-rate``: one line, ``panoptic-flow segment: stopped: ...``);
- ``2``: the user's mistake: a bad flag or value, a bad job file, an output or input that is not there,
  unusable weights, a SQL error in ``query``, a ``show --where`` that matches nothing. It is reported as
  one line on stderr, ``panoptic-flow <command>: error: --flag: reason`` (plus a hint where there is
  one), without argparse's usage block (``--help`` still prints the full usage).

A command that reads an output made (wholly or partly) with the demo weights (``--weights synthetic``)
says so in one warning line on stderr (:func:`warn_if_demo_weights`).

A bare ``panoptic-flow`` prints its help on stderr and exits 2, as argparse does for a missing command.

:class:`CommandParser` is the ``argparse.ArgumentParser`` of every command (its errors are one line);
:class:`UsageError` is what a command raises for a mistake found after parsing, and :func:`run_command`
turns it (and the command's other user-error types) into the line and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from pipeline.exactly_once.output_paths import Output

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A user's mistake found by a command: ``flag`` (or None), ``reason`` and an optional ``hint``."""

    def __init__(self, reason: str, *, flag: str | None = None, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.flag = flag
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.flag}: {self.reason}" if self.flag else self.reason
        return f"{text} ({self.hint})" if self.hint else text


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with ``"; "``, surrounding blanks dropped."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_line(prog: str, error: object) -> str:
    """``<prog>: error: <error>``, on one line, without any credentials it may quote (`redact_uri`)."""
    from pipeline.config import redact_uri

    return redact_uri(f"{prog}: error: {one_line(str(error))}")


def report(prog: str, error: object) -> int:
    """Print the one-line error of ``prog`` on stderr; returns :data:`EXIT_USAGE`."""
    print(error_line(prog, error), file=sys.stderr)
    return EXIT_USAGE


def warn_if_demo_weights(prog: str, output: Output | str) -> bool:
    """Print one warning line when ``output`` was made, wholly or partly, with the demo weights (its run records
    say so: `pipeline.exactly_once.run_records.run_weights`); True then."""
    from pipeline.exactly_once.output_paths import Output
    from pipeline.exactly_once.run_records import run_weights
    from pipeline.schema import SYNTHETIC_WEIGHTS

    out = Output.resolve(output)
    weights = run_weights(out)
    demo = [run for run, uri in weights.items() if uri == SYNTHETIC_WEIGHTS]
    if not demo:
        return False
    how = "" if len(demo) == len(weights) else f" (partly: {len(demo)} of its {len(weights)} runs)"
    print(
        f"{prog}: warning: {out.uri} was made with demo weights (--weights synthetic){how}: "
        "its segments are meaningless",
        file=sys.stderr,
    )
    return True


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (flag first) and exit code 2, without the usage block."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)  # "argument --x: invalid..." -> "--x: invalid..."
        print(error_line(self.prog, f"{message} (`{self.prog} --help` lists the options)"), file=sys.stderr)
        self.exit(EXIT_USAGE)


def run_command(
    prog: str,
    body: Callable[[], int | None],
    *,
    user_errors: Sequence[type[BaseException]] = (),
) -> int:
    """Run a command's ``body``; a :class:`UsageError` or one of ``user_errors`` becomes the one-line error and
    exit code 2. Anything else propagates (a traceback, exit code 1)."""
    try:
        return int(body() or EXIT_DONE)
    except (UsageError, *user_errors) as exc:
        return report(prog, exc)
