"""What a run did, as the job reports it: the summary line it prints and the report in ``_SUCCESS`` and in its
record (`pipeline.exactly_once.commit.OutputCommitter.on_write_complete`). The counts are `pipeline.schema.Counts`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.schema import Counts


@dataclass(kw_only=True)
class RunSummary:
    run_id: str
    this_run: Counts  # committed by this run
    parts: int  # committed by this run
    skipped_committed: int  # committed before, kept
    redone: dict[str, int]  # committed before, retracted and done again, by reason
    unlisted: int  # committed before, not among this run's inputs (kept)
    quarantined: int  # unreadable parts moved aside
    totals: Counts  # the whole output after this run
    seconds: float
    parts_by_node: dict[str, int]  # parts committed by this run, by the Ray node that wrote them
    left_out: str = ""  # listed files left out by their extension, and how to include them ("" for none)
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # this run's error rows, by `error_kind`
    stages: dict[str, Any] = field(default_factory=dict)  # where the actors' time went (`pipeline.bottleneck`)

    @property
    def bottleneck(self) -> str:
        """The verdict line (``bottleneck: decode (...) — remedy``), "" when no part was measured."""
        return str(self.stages.get("verdict") or "")

    @property
    def images_ok(self) -> int:
        return self.this_run.images_ok

    @property
    def images_error(self) -> int:
        return self.this_run.images_error

    @property
    def segments(self) -> int:
        return self.this_run.segments

    @property
    def images_per_second(self) -> float:
        return self.this_run.images / self.seconds if self.seconds > 0 else 0.0

    def line(self, output: str) -> str:
        """The one-line summary the job prints."""
        run = self.this_run
        redone = "".join(f", {n} redone ({reason})" for reason, n in sorted(self.redone.items()))
        extra = f", {self.unlisted} committed images not among the inputs (kept)" if self.unlisted else ""
        extra += f", {self.quarantined} unreadable parts moved to _quarantine/" if self.quarantined else ""
        return (
            (
                f"done: {run.images_ok} images ok, {run.images_error} errors ({run.images_retryable} retryable), "
                f"{run.segments} segments, {self.skipped_committed} already committed{redone}{extra}, "
                f"{self.images_per_second:.2f} images/s ({self.seconds:.1f} s) -> {output} now holds "
                f"{self.totals.images} images ({self.totals.images_ok} ok, {self.totals.images_error} errors, "
                f"{self.totals.images_retryable} retryable), {self.totals.segments} segments"
            )
            + (f"; {self.left_out}" if self.left_out else "")
            + self._error_kinds()
        )

    def _error_kinds(self, most: int = 3) -> str:
        """``; errors: 2 killed the model worker, 1 not found`` (the most common kinds), or ""."""
        if not self.errors_by_kind:
            return ""
        kinds = sorted(self.errors_by_kind.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{n} {kind}" for kind, n in kinds[:most])
        more = f", {sum(n for _, n in kinds[most:])} other" if len(kinds) > most else ""
        return f"; errors: {text}{more} (the images table's error column says why, image by image)"

    def report(self) -> dict[str, Any]:
        """``_SUCCESS``'s content, also added to the run's record: this run's counts and the output's totals."""
        return {
            "run_id": self.run_id,
            "this_run": {**asdict(self.this_run), "parts": self.parts, "skipped_committed": self.skipped_committed,
                         "redone": self.redone, "unlisted": self.unlisted, "quarantined": self.quarantined,
                         "seconds": self.seconds, "errors_by_kind": self.errors_by_kind, "stages": self.stages},
            "output": {**asdict(self.totals), "images": self.totals.images},
        }  # fmt: skip
