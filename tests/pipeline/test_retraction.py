"""Retraction is a commit-protocol hook fenced by the lease: a run that lost its lease before a retraction write
rewrites and deletes nothing (`pipeline.exactly_once.commit.OutputCommitter.retract`). In the driver, without Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.exactly_once import commit
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease, LeaseLost, check_holder
from pipeline.exactly_once.resume import decide
from pipeline.exactly_once.resume_executors import InDriver
from tests.pipeline.resume_outputs import files_of, listing, write_output


def _rows(output: Path) -> dict[str, list[dict[str, object]]]:
    """Each part file's rows, by path."""
    return {str(p.relative_to(output)): pq.read_table(p).to_pylist() for p in sorted(output.glob("*/part-*.parquet"))}


def _take_over(output: Path, lease: Lease) -> Lease:
    """Another run takes the output: the stalled run's lease ends and run "taker" holds it."""
    lease.release()
    return Lease.acquire(str(output), "taker")


def test_a_run_that_lost_its_lease_before_its_first_retraction_changes_no_part(tmp_path: Path) -> None:
    output = tmp_path / "out"
    parts = write_output(output)
    files, rows = files_of(output), _rows(output)
    lease = Lease.acquire(str(output), "stalled")
    committer = OutputCommitter(str(output), "stalled", lease=lease)
    taker = _take_over(output, lease)
    try:
        with pytest.raises(LeaseLost, match=r"run stalled does not hold the lease .*'run_id': 'taker'.*not retracting"):
            decide(listing(), committer=committer, parts=parts, executor=InDriver())
        assert _rows(output) == rows  # row by row
        assert files_of(output) == files  # file by file: nothing rewritten, nothing deleted

        # the run that holds the lease retracts the same rows: the plan has retractions to fence
        plan = decide(listing(), committer=OutputCommitter(str(output), "taker"), parts=parts, executor=InDriver())
    finally:
        taker.release()
    assert plan.retracted_by_reason == {"retryable": 2, "repeated": 1, "changed": 2}
    assert "images/part-c.parquet" not in files_of(output) and files_of(output) != files


def test_a_lease_lost_between_two_parts_stops_the_retraction_at_the_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part's retraction checks the lease in the store, as each commit does: taken over after the first
    part was rewritten, the run leaves every later part as it was."""
    output = tmp_path / "out"
    parts = write_output(output)
    files = files_of(output)
    lease = Lease.acquire(str(output), "stalled")
    committer = OutputCommitter(str(output), "stalled", lease=lease)
    checks: list[str] = []
    taken: list[Lease] = []

    def taken_over_after_one_part(output_uri: str, run_id: str, **kwargs: str) -> None:
        checks.append(kwargs.get("not_doing", ""))
        if len(checks) == 2:
            taken.append(_take_over(output, lease))
        check_holder(output_uri, run_id, **kwargs)

    monkeypatch.setattr(commit, "check_holder", taken_over_after_one_part)
    try:
        with pytest.raises(LeaseLost, match=r"not retracting rows from part-b\.parquet"):
            decide(listing(), committer=committer, parts=parts, executor=InDriver())
    finally:
        for held in taken or [lease]:
            held.release()
    after = files_of(output)
    changed = sorted(name for name in files if after.get(name) != files[name])
    assert changed == ["images/part-a.parquet", "segments/part-a.parquet"]  # part-a retracted, b and c untouched
    assert [r["image_id"] for r in pq.read_table(output / "images" / "part-a.parquet").to_pylist()] == ["/in/kept.jpg"]
