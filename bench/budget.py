"""A hard time budget split into named steps, each with its own share; a step out of time is skipped with a note.

Made for scarce machines (a GPU lent for minutes): the whole command must end inside its budget whatever
happens, and say what it left out. Each step gets ``share × total`` seconds from the moment it starts, never
past the budget's end; a step that finds less than its ``min_s`` left is skipped. Steps receive their
deadline (a `time.monotonic` value) and are expected to stop between units of work when it has passed
(`Budget.left`), noting what they cut; a step that raises is recorded with its error and the next one runs.
`run_killable` runs a command that must not outlast a deadline (interrupted, then killed, output kept).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    name: str
    status: str  # "done", "skipped" (no time left) or "error"
    seconds: float
    share_s: float
    result: dict | None = None
    note: str = ""


@dataclass
class Budget:
    total_s: float
    shares: dict[str, float]  # step name -> share of total_s (the shares may add up to less than 1)
    start: float = field(default_factory=time.monotonic)
    records: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.total_s <= 0:
            raise ValueError(f"budget must be positive, got {self.total_s} s")
        if any(s <= 0 for s in self.shares.values()) or sum(self.shares.values()) > 1 + 1e-9:
            raise ValueError(f"shares must be positive and add up to at most 1, got {self.shares}")

    @property
    def end(self) -> float:
        return self.start + self.total_s

    @staticmethod
    def left(deadline: float) -> float:
        """Seconds until ``deadline`` (negative once passed)."""
        return deadline - time.monotonic()

    def run(self, name: str, step: Callable[[float], dict], *, min_s: float = 1.0) -> StepRecord:
        """Run ``step(deadline)`` inside its share, or skip it when less than ``min_s`` is left for it."""
        now = time.monotonic()
        share_s = self.shares[name] * self.total_s
        deadline = min(now + share_s, self.end)
        if deadline - now < min_s:
            record = StepRecord(
                name, "skipped", 0.0, share_s, note=f"skipped: {max(0.0, self.end - now):.0f} s of the budget left"
            )
        else:
            log.info("step %s: up to %.0f s", name, deadline - now)
            try:
                result = step(deadline)
                record = StepRecord(name, "done", time.monotonic() - now, share_s, result, result.pop("note", ""))
            except Exception as exc:  # one broken step must not cost the others their time
                log.exception("step %s failed", name)
                record = StepRecord(name, "error", time.monotonic() - now, share_s, note=f"{type(exc).__name__}: {exc}")
                record.result = {"traceback": traceback.format_exc(limit=8)}
        self.records.append(record)
        return record


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_killable(
    cmd: list[str], *, timeout: float, env: dict | None = None, cwd: Path | None = None
) -> tuple[int | None, str, bool]:
    """(exit code, stdout + stderr, timed out). Past ``timeout``: SIGINT to the process group (Ray shuts down
    cleanly on it), then SIGKILL 20 s later. The child gets SIGINT's default action back: a shell starts
    background commands (``make gpu-check &``, ``nohup``) with SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    try:
        output, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, output, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        return proc.returncode, output, True
