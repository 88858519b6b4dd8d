"""`bench.budget`: each step's deadline is its share, capped by the budget's end; a step with too little time
left is skipped with a note; a failing step is recorded and the next one still runs; a command past its
deadline is interrupted and its output kept."""

from __future__ import annotations

import sys
import time

import pytest

from bench.budget import Budget, run_killable


def test_a_step_gets_its_share_as_deadline() -> None:
    budget = Budget(100.0, {"a": 0.25, "b": 0.5})
    seen = {}
    record = budget.run("a", lambda deadline: {"left": Budget.left(deadline), "note": "cut after 3 passes"})
    seen["a"] = record.result["left"]
    assert 24.0 < seen["a"] <= 25.0
    assert (record.status, record.note, record.share_s) == ("done", "cut after 3 passes", 25.0)
    assert "note" not in record.result


def test_the_deadline_never_passes_the_budgets_end_and_short_steps_are_skipped() -> None:
    budget = Budget(100.0, {"a": 0.5, "b": 0.5}, start=time.monotonic() - 95.0)  # 5 s left of 100
    record = budget.run("a", lambda deadline: {"left": Budget.left(deadline)})
    assert record.status == "done" and 4.0 < record.result["left"] <= 5.0
    called = []
    skipped = budget.run("b", lambda deadline: called.append(deadline) or {}, min_s=10.0)
    assert skipped.status == "skipped" and called == [] and "s of the budget left" in skipped.note
    assert [r.name for r in budget.records] == ["a", "b"]


def test_a_failing_step_is_recorded_and_the_next_one_runs() -> None:
    budget = Budget(60.0, {"a": 0.5, "b": 0.5})

    def broken(deadline: float) -> dict:
        raise RuntimeError("no CUDA device")

    failed = budget.run("a", broken)
    assert failed.status == "error" and failed.note == "RuntimeError: no CUDA device"
    assert "no CUDA device" in failed.result["traceback"]
    assert budget.run("b", lambda deadline: {"ok": True}).result == {"ok": True}


def test_shares_must_fit_the_budget() -> None:
    with pytest.raises(ValueError, match="shares"):
        Budget(60.0, {"a": 0.7, "b": 0.4})
    with pytest.raises(ValueError, match="positive"):
        Budget(0.0, {"a": 0.5})


def test_a_command_past_its_deadline_is_interrupted_and_its_output_kept() -> None:
    script = "import time; print('started', flush=True); time.sleep(60)"
    start = time.monotonic()
    code, output, timed_out = run_killable([sys.executable, "-c", script], timeout=2.0)
    assert timed_out and code != 0 and "started" in output
    assert time.monotonic() - start < 20  # SIGINT ended it: no wait for the SIGKILL


def test_a_command_inside_its_deadline_returns_its_exit_code() -> None:
    assert run_killable([sys.executable, "-c", "print('done'); raise SystemExit(3)"], timeout=30.0) == (
        3,
        "done\n",
        False,
    )
