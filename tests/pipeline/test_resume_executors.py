"""The start of a run plans the same way in the driver and on Ray: one composition
(`pipeline.exactly_once.resume.decide`)
over two executors gives the same `Plan`, the same output state and the same retractions, on an output with
something for every decision (`tests.pipeline.resume_outputs`), with `LOCAL_PLAN_MAX_PARTS` lowered so that
the Ray path runs on a small output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.exactly_once import resume
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease
from pipeline.exactly_once.resume import Start
from pipeline.exactly_once.resume_executors import OnRay
from tests.pipeline.resume_outputs import files_of, listing, write_output


def _start(output: Path, monkeypatch: pytest.MonkeyPatch, *, max_local_parts: int) -> tuple[Start, list[str]]:
    """The start on a fresh copy of the fixture, and the parts its snapshot would list."""
    write_output(output)
    monkeypatch.setattr(resume, "LOCAL_PLAN_MAX_PARTS", max_local_parts)
    started: list[bool] = []
    with Lease.acquire(str(output), "rerun") as lease:
        committer = OutputCommitter(str(output), "rerun", lease=lease)
        start = resume.start(committer, listing(), settings={}, start_ray=lambda: started.append(True))
    return start, sorted(committer.snapshots.live)


def _refs(refs: Any) -> list[dict[str, Any]]:
    rows = refs.to_pylist() if isinstance(refs, pa.Table) else list(refs.iter_rows())
    return sorted(({**r, "skip": sorted(r["skip"] or [])} for r in rows), key=lambda r: r["uri"])


def test_the_driver_and_ray_give_the_same_plan_and_retract_the_same_rows(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_output(tmp_path / "fixture")
    fixture = files_of(tmp_path / "fixture")
    in_driver, driver_live = _start(tmp_path / "driver", monkeypatch, max_local_parts=16)
    on_ray, ray_live = _start(tmp_path / "ray", monkeypatch, max_local_parts=1)  # 4 parts: planned on Ray
    assert isinstance(in_driver.plan.refs, pa.Table) and not isinstance(on_ray.plan.refs, pa.Table)

    refs = _refs(in_driver.plan.refs)
    assert refs == _refs(on_ray.plan.refs)
    assert [(r["uri"], r["kind"], r["skip"]) for r in refs] == [
        ("/in/changed.jpg", "file", []),
        ("/in/flaky.jpg", "file", []),
        ("/in/flaky2.jpg", "file", []),
        ("/in/fresh.jpg", "file", []),
        ("/in/fresh2.jpg", "file", []),
        ("/in/new.tar", "tar", ["a.jpg"]),  # its committed member kept
        ("/in/old.tar", "tar", []),  # changed: done whole
        ("/in/twice.jpg", "file", []),
    ]
    for plan in (in_driver.plan, on_ray.plan):
        plan.refs = None
    assert in_driver.plan == on_ray.plan
    assert (in_driver.plan.skipped, in_driver.plan.unlisted, in_driver.plan.files_to_do) == (2, 1, 6)
    assert in_driver.plan.retracted_by_reason == {"retryable": 2, "repeated": 1, "changed": 2}
    assert in_driver.plan.retracted.images == 6  # twice.jpg's two rows
    assert in_driver.state.totals == on_ray.state.totals and in_driver.state.totals.images == 9

    driver_files, ray_files = files_of(tmp_path / "driver"), files_of(tmp_path / "ray")
    assert driver_files == ray_files  # the same new parts, to the byte
    assert {name: driver_files[name] for name in fixture} == fixture  # copy on write: the committed files unchanged
    new = sorted(set(driver_files) - set(fixture))  # part a keeps rows, written anew; b and c: nothing left
    assert len(new) == 2 and all(name.endswith("-rerun.parquet") for name in new)
    assert driver_live == ray_live == sorted([Path(new[0]).name, "part-d.parquet"])  # the start snapshot's parts


def test_retractions_on_ray_workers_check_the_lease_before_they_change_a_part(
    ray_session: None, tmp_path: Path
) -> None:
    """The committer pickled for the workers is (output, run id): its `retract` hook reads the lease in the store,
    so a run whose lease another run took changes no part, whichever worker retracts it."""
    output = tmp_path / "out"
    parts = write_output(output)
    files = files_of(output)
    lease = Lease.acquire(str(output), "stalled")
    committer = OutputCommitter(str(output), "stalled", lease=lease)
    lease.release()
    taker = Lease.acquire(str(output), "taker")  # another run holds the output now
    try:
        with pytest.raises(Exception, match=r"run stalled does not hold the lease .*not retracting rows from part-"):
            resume.decide(listing(), committer=committer, parts=parts, executor=OnRay(partitions=2))
    finally:
        taker.release()
    assert files_of(output) == files  # file by file: nothing rewritten, nothing deleted
