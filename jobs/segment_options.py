"""The `segment` command's options: the job's configuration (`JobConfig`) plus how this invocation runs it.

``python -m jobs.segment_options`` prints the README's option table (a test keeps it equal to ``--help``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.options import Option, markdown_table, options
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


if __name__ == "__main__":
    print(markdown_table(OPTIONS), end="")
