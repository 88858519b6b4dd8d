"""Bounded pipelining inside one process: a stage's work runs on a thread pool, a fixed number of items ahead.

`ordered_map` is the one helper the shard call (`pipeline.shard`) composes its stages with: reading bytes,
decoding, RLE and commits run on threads (Pillow, numpy, zstd, Arrow and socket I/O release the GIL) while the
calling thread runs the model. Results come back in input order, and at most ``depth`` items are in flight per
stage, so a stage's memory is bounded by ``depth`` items whatever the input's length.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, pool: ThreadPoolExecutor, depth: int) -> Iterator[R]:
    """``fn(item)`` for each item, computed on ``pool`` up to ``depth`` items ahead of the consumer, yielded in
    order. An exception raised by ``fn`` is raised here, at its item; the work still queued is cancelled when
    the consumer stops early (or fails), so nothing runs on after it."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
