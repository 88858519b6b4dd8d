"""`pipeline.call_gate.CallGate`: first attempts side by side, a retried call alone (before later first attempts)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from pipeline.call_gate import CallGate

WAIT_S = 10.0  # bounded waits for what must happen; "must not happen" is checked after its cause is in place


def _entered(gate: CallGate, kind: str, inside: threading.Event, leave: threading.Event) -> threading.Thread:
    def run() -> None:
        with gate.exclusive() if kind == "exclusive" else gate.shared():
            inside.set()
            leave.wait(WAIT_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _waiting_on(gate: CallGate, count: Callable[[], bool]) -> None:
    with gate._changed:  # the gate's own state: a thread is blocked in it, not merely late
        assert gate._changed.wait_for(count, timeout=WAIT_S)


def test_first_attempts_run_side_by_side() -> None:
    gate = CallGate()
    inside = [threading.Event(), threading.Event()]
    leave = threading.Event()
    threads = [_entered(gate, "shared", event, leave) for event in inside]
    assert all(event.wait(WAIT_S) for event in inside)  # both in at once
    leave.set()
    for thread in threads:
        thread.join(WAIT_S)


def test_a_retry_waits_for_the_running_calls_and_later_calls_wait_for_it() -> None:
    gate = CallGate()
    first_in, first_leave = threading.Event(), threading.Event()
    retry_in, retry_leave = threading.Event(), threading.Event()
    later_in, later_leave = threading.Event(), threading.Event()
    first = _entered(gate, "shared", first_in, first_leave)
    assert first_in.wait(WAIT_S)
    retry = _entered(gate, "exclusive", retry_in, retry_leave)
    _waiting_on(gate, lambda: gate._waiting == 1)  # the retry is blocked behind the running call
    later = _entered(gate, "shared", later_in, later_leave)
    assert not retry_in.is_set() and not later_in.is_set()
    first_leave.set()
    assert retry_in.wait(WAIT_S)  # the running call left: the retry runs
    assert not later_in.is_set() and gate._shared == 0  # alone: the later call waits for it
    retry_leave.set()
    assert later_in.wait(WAIT_S)
    later_leave.set()
    for thread in (first, retry, later):
        thread.join(WAIT_S)
    assert (gate._shared, gate._exclusive, gate._waiting) == (0, False, 0)
