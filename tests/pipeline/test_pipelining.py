"""`ordered_map`: results in input order, never more than ``depth`` items ahead, errors at their item."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.pipelining import ordered_map


def test_results_come_in_input_order_whatever_finishes_first() -> None:
    gates = {i: threading.Event() for i in range(6)}

    def work(i: int) -> int:
        gates[i].wait(5)  # item i waits until every later item has started
        return i * i

    def items():
        for i in range(6):
            yield i
            if i:
                gates[i - 1].set()  # the earlier item is released only once a later one is submitted
        gates[5].set()

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(ordered_map(work, items(), pool=pool, depth=3)) == [i * i for i in range(6)]


def test_at_most_depth_items_are_taken_ahead_of_the_consumer() -> None:
    taken: list[int] = []

    def items():
        for i in range(10):
            taken.append(i)
            yield i

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = ordered_map(lambda i: i, items(), pool=pool, depth=3)
        assert next(results) == 0
        assert taken == [0, 1, 2]  # the first result, and two more in flight
        assert next(results) == 1 and taken == [0, 1, 2, 3]
        assert list(results) == list(range(2, 10))


def test_an_error_is_raised_at_its_item_and_the_queued_work_is_cancelled() -> None:
    started: list[int] = []
    release = threading.Event()

    def work(i: int) -> int:
        started.append(i)
        if i == 1:
            raise ValueError("bad item 1")
        if i > 1:
            release.wait(5)
        return i

    with ThreadPoolExecutor(max_workers=1) as pool:  # one thread: items 2.. queue behind item 1
        results = ordered_map(work, range(100), pool=pool, depth=4)
        assert next(results) == 0
        with pytest.raises(ValueError, match="bad item 1"):
            next(results)
        release.set()
    assert max(started) <= 4  # nothing past the depth was submitted, and what was queued did not all run


def test_depth_must_be_positive() -> None:
    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(ValueError, match="depth"):
        list(ordered_map(lambda i: i, [1], pool=pool, depth=0))
