"""Retraction is a commit-protocol hook fenced by the lease, and copy-on-write: the rows a part keeps are written as a
new part of the run, and no committed file is ever changed or deleted (`pipeline.exactly_once.commit.OutputCommitter.
retract`); a run that lost its lease before a retraction writes nothing. In the driver, without Ray."""

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


def _opened(committer: OutputCommitter, parts: list[str]) -> OutputCommitter:
    """``committer`` with its snapshot log holding ``parts`` (as `OutputCommitter.prepare` leaves it)."""
    committer.snapshots.open({Path(p).name: 0 for p in parts})
    return committer


def _new_files(output: Path, before: dict[str, bytes]) -> list[str]:
    after = files_of(output)
    assert {name: after[name] for name in before} == before  # copy on write: every earlier file as it was
    return sorted(set(after) - set(before))


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
        holder = _opened(OutputCommitter(str(output), "taker"), parts)
        plan = decide(listing(), committer=holder, parts=parts, executor=InDriver())
    finally:
        taker.release()
    assert plan.retracted_by_reason == {"retryable": 2, "repeated": 1, "changed": 2}
    new = _new_files(output, files)  # part a keeps rows: written anew by the run; b and c: nothing left; d untouched
    assert len(new) == 2 and all(name.endswith("-taker.parquet") for name in new)
    assert sorted(holder.snapshots.live) == sorted({Path(new[0]).name, "part-d.parquet"})  # what its snapshot lists


def test_a_lease_lost_between_two_parts_stops_the_retraction_at_the_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part's retraction checks the lease in the store, as each commit does: taken over after the first
    part was rewritten, the run leaves every later part as it was."""
    output = tmp_path / "out"
    parts = write_output(output)
    files = files_of(output)
    lease = Lease.acquire(str(output), "stalled")
    committer = _opened(OutputCommitter(str(output), "stalled", lease=lease), parts)
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
    new = _new_files(output, files)  # part-a's rest written, b and c untouched
    assert [name.split("/")[0] for name in new] == ["images", "segments"] and new[0].endswith("-stalled.parquet")
    assert [r["image_id"] for r in pq.read_table(output / new[0]).to_pylist()] == ["/in/kept.jpg"]
