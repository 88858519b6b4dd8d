"""A watchdog on the model's batches: a batch that never returns is turned into a dead actor.

A model call that hangs (a kernel that never finishes, a driver deadlock) would hold its shard, and the shard
queued behind it on the same actor, until Ray Data's no-progress timeout (hours). `HungBatchWatchdog` watches
the batch running on the model thread from a thread of its own: one that runs longer than ``floor_s``
(``--hung-batch-timeout``) *and* ``FACTOR`` times this actor's typical batch (the median of its recent ones) is
hung, and ``on_hung`` is called with how long it ran. The block call's ``on_hung`` records the reason with the
in-flight images (`pipeline.segmenting.poison`) and ends the process, so that Ray restarts the actor and retries the
shard, whose poison isolation then runs the batch's images one at a time.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

FACTOR = 20.0  # a batch this many times the typical one (and past the floor) is hung
RECENT = 32  # batches the typical duration is taken over


class HungBatchWatchdog:
    """``with watchdog.batch(): model(batch)`` on the model thread; ``on_hung(seconds)`` from the watchdog's own
    thread when the batch runs past `limit_s`. One batch at a time."""

    def __init__(self, *, floor_s: float, on_hung: Callable[[float], None], poll_s: float | None = None) -> None:
        if floor_s <= 0:
            raise ValueError(f"floor_s must be positive, got {floor_s}")
        self.floor_s, self.on_hung = floor_s, on_hung
        self.poll_s = poll_s if poll_s is not None else min(1.0, floor_s / 10)
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._started: float | None = None  # monotonic start of the running batch
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def limit_s(self) -> float:
        """How long a batch may run: the floor, or `FACTOR` × the median recent batch if that is longer."""
        with self._lock:
            typical = statistics.median(self._recent) if self._recent else 0.0
        return max(self.floor_s, FACTOR * typical)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hung-batch-watchdog", daemon=True)
            self._thread.start()
        started = time.monotonic()
        with self._lock:
            self._started = started
        try:
            yield
        finally:
            with self._lock:
                self._started = None
                self._recent.append(time.monotonic() - started)

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            with self._lock:
                started = self._started
            if started is None:
                continue
            elapsed = time.monotonic() - started
            if elapsed > self.limit_s():
                self.on_hung(elapsed)
                return
