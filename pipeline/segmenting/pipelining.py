"""Bounded pipelining inside one process: a stage's work runs on a thread pool, a fixed number of items ahead.

`ordered_map` is the one helper the block call (`pipeline.segmenting.block_call`) composes its stages with: reading
bytes, decoding, RLE and commits run on threads (Pillow, numpy, zstd, Arrow and socket I/O release the GIL) while the
calling thread runs the model. Results come back in input order, and at most ``depth`` items are in flight per
stage, so a stage's memory is bounded by ``depth`` items whatever the input's length; given a ``weight`` per
item (its bytes) and a ``max_weight``, also by that many bytes whatever the items' sizes. Given ``on_wait``, the
seconds the consumer spends blocked on a result are reported to it (`pipeline.segmenting.stage_clock`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    pool: ThreadPoolExecutor,
    depth: int,
    weight: Callable[[T], int] | None = None,
    max_weight: int | None = None,
    on_wait: Callable[[float], None] | None = None,
) -> Iterator[R]:
    """``fn(item)`` for each item, computed on ``pool`` up to ``depth`` items ahead of the consumer, yielded in
    order. An exception raised by ``fn`` is raised here, at its item; the work still queued is cancelled when
    the consumer stops early (or fails), so nothing runs on after it.

    With ``weight`` and ``max_weight``, an item is also held back while the items in flight (submitted, not yet
    yielded) would weigh more than ``max_weight`` with it, unless nothing is in flight: an item heavier than
    the bound runs alone. So the items in flight weigh at most ``max(max_weight, the heaviest item)``, the
    item last yielded aside (the next one is submitted only once the consumer asks for its next result).
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    if (weight is None) != (max_weight is None):
        raise ValueError("weight and max_weight go together")
    if max_weight is not None and max_weight < 1:
        raise ValueError(f"max_weight must be at least 1, got {max_weight}")
    pending: deque[tuple[Future[R], int]] = deque()
    in_flight = 0  # the weight of `pending`
    try:
        for item in items:
            cost = weight(item) if weight is not None else 0
            if cost < 0:
                raise ValueError(f"weights must not be negative, got {cost}")
            while pending and max_weight is not None and in_flight + cost > max_weight:
                future, done = pending.popleft()
                in_flight -= done
                yield _result(future, on_wait)
            pending.append((pool.submit(fn, item), cost))
            in_flight += cost
            if len(pending) >= depth:
                future, done = pending.popleft()
                in_flight -= done
                yield _result(future, on_wait)
        while pending:
            future, done = pending.popleft()
            in_flight -= done
            yield _result(future, on_wait)
    finally:
        for future, _ in pending:
            future.cancel()


def _result(future: Future[R], on_wait: Callable[[float], None] | None) -> R:
    if on_wait is None or future.done():
        return future.result()
    started = time.perf_counter()
    try:
        return future.result()
    finally:
        on_wait(time.perf_counter() - started)
