"""Shard calls side by side in one model actor, except a retried one: it runs with no other call beside it.

An actor runs `pipeline.run.CALLS_PER_ACTOR` shard calls at a time (the next shard is read and decoded while the
previous one finishes). Poison isolation (`pipeline.poison`) needs a suspect of an earlier death to run *alone*
in its process: were another call's images in flight beside it, a death would strike them too, and one of
them being a suspect run alone as well would be poisoned for a crash it did not cause. `CallGate` is a
readers-writer gate: a first attempt enters `shared` (side by side with other first attempts), a call whose
shard's actor died before enters `exclusive` (it waits for the calls running to finish, and the calls that
come after it wait for it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class CallGate:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._shared = 0  # calls running side by side
        self._exclusive = False  # a call running alone
        self._waiting = 0  # calls waiting to run alone (they go before new shared ones)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            self._changed.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive = False
                self._changed.notify_all()
