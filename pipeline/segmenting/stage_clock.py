"""Where a model actor's time goes: the busy time of each stage of the block call, and what waited on what.

One `StageClock` per model actor (`pipeline.segmenting.block_call.BlockSegmenter`). Its threads add to it as they work:

- *busy* seconds per stage (`STAGES`): ``read`` and ``commit`` as wall time (they wait on storage), ``decode``
  (decode, resize and the model batch's assembly) and ``rle`` (the result rows and their RLE) as the thread's
  CPU time, ``model`` as the model thread's wall time per batch (the device's work and the model thread's own);
- ``model_idle``: the model thread with no batch to run (on a GPU actor: the GPU waiting for input), and
  ``model_device``: the model thread waiting inside a batch (wall minus its CPU time: for the device's results,
  or for torch's other threads on a CPU actor);
- ``waited_<stage>``: the block call's orchestrating thread blocked on that stage's next result (the stage it
  waits on most is the one that holds the call back), ``between_calls``: the actor with no block call at all
  (waiting for work from Ray Data), and ``call_cpu``: the orchestrating thread's own CPU time (serial work).

`take` hands out what was added since the previous `take` together with the actor's wall time over the same
span, so the part rows of one actor (each takes once, as it is committed) partition its time: their sums over a
run are the actor's totals (`pipeline.bottleneck` turns them into shares and a verdict).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pyarrow as pa

STAGES = ("read", "decode", "model", "rle", "commit")
"""The block call's stages, in pipeline order."""

WAITED = tuple(f"waited_{stage}" for stage in STAGES)
KEYS = ("wall", *STAGES, "model_idle", "model_device", *WAITED, "between_calls", "call_cpu")
"""The fields of a part row's ``stages`` (seconds of one actor since its previous part)."""

STAGE_SECONDS_STRUCT = pa.struct([(key, pa.float64()) for key in KEYS])

_WALL_STAGES = frozenset({"read", "commit", "model"})  # timed by the clock on the wall; the rest by thread CPU


class StageClock:
    """Thread-safe accumulators of one actor's stage seconds (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(KEYS, 0.0)
        self._since: float | None = None  # when the span of the next `take` began (the first call's start)
        self._first_call: float | None = None
        self._model_free_since: float | None = None  # the model thread's last batch end
        self._calls = 0  # block calls running
        self._no_call_since: float | None = None
        self._thread = threading.local()  # the orchestrating thread's CPU time when last counted

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self._seconds[key] += seconds

    @contextlib.contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        """Time the block as ``stage``'s busy time (on the wall or as this thread's CPU, by the stage)."""
        clock = time.perf_counter if stage in _WALL_STAGES else time.thread_time
        started = clock()
        try:
            yield
        finally:
            self.add(stage, clock() - started)

    @contextlib.contextmanager
    def model_batch(self) -> Iterator[None]:
        """Time one model batch on the model thread: its wall time, its waits inside, the idle time before it."""
        started, cpu = time.perf_counter(), time.thread_time()
        with self._lock:
            free = self._model_free_since if self._model_free_since is not None else self._first_call
            if free is not None:
                self._seconds["model_idle"] += max(0.0, started - free)
        try:
            yield
        finally:
            ended = time.perf_counter()
            wall = ended - started
            with self._lock:
                self._seconds["model"] += wall
                self._seconds["model_device"] += max(0.0, wall - (time.thread_time() - cpu))
                self._model_free_since = ended

    def waiter(self, stage: str) -> Callable[[float], None]:
        """What `pipeline.segmenting.pipelining.ordered_map` reports the consumer's waits on ``stage`` to."""
        key = f"waited_{stage}"
        return lambda seconds: self.add(key, seconds)

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Around one block call on its orchestrating thread: its CPU time, and the actor's time between calls."""
        now = time.perf_counter()
        self._thread.cpu = time.thread_time()
        with self._lock:
            if self._since is None:
                self._since = self._first_call = now
            if self._calls == 0 and self._no_call_since is not None:
                self._seconds["between_calls"] += now - self._no_call_since
            self._calls += 1
        try:
            yield
        finally:
            self._count_call_cpu()
            self._thread.cpu = None
            with self._lock:
                self._calls -= 1
                if self._calls == 0:
                    self._no_call_since = time.perf_counter()

    def _count_call_cpu(self) -> None:
        marked = getattr(self._thread, "cpu", None)
        if marked is not None:  # on a call's orchestrating thread
            now = time.thread_time()
            self.add("call_cpu", now - marked)
            self._thread.cpu = now

    def take(self) -> dict[str, float]:
        """The seconds added since the previous take, and ``wall``: the actor's time over the same span."""
        self._count_call_cpu()
        now = time.perf_counter()
        with self._lock:
            taken = dict(self._seconds)
            self._seconds = dict.fromkeys(KEYS, 0.0)
            taken["wall"] = now - self._since if self._since is not None else 0.0
            self._since = now
        return taken
