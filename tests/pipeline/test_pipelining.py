"""`ordered_map`: results in input order, never more than ``depth`` items ahead, errors at their item."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.segmenting.pipelining import ordered_map


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


class _Recording(ThreadPoolExecutor):
    """A pool that notes each item as it is submitted (not when a thread gets to it)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers)
        self.submitted: list[int] = []

    def submit(self, fn, /, *args, **kwargs):
        self.submitted.append(args[0])
        return super().submit(fn, *args, **kwargs)


def test_items_in_flight_never_weigh_more_than_the_bound() -> None:
    """At every submission, the items submitted and not yet yielded weigh at most the bound, or the item is
    alone (heavier than the bound)."""
    rng = random.Random(7)
    weights = [rng.choice([1, 5, 30, 60, 99, 100, 101, 250]) for _ in range(200)]
    yielded: list[int] = []
    worst: list[tuple[int, int]] = []  # (weight in flight after a submission, items in flight)

    class Checking(_Recording):
        def submit(self, fn, /, *args, **kwargs):
            in_flight = [i for i in self.submitted if i not in set(yielded)] + [args[0]]
            worst.append((sum(weights[i] for i in in_flight), len(in_flight)))
            return super().submit(fn, *args, **kwargs)

    with Checking(max_workers=3) as pool:
        for r in ordered_map(lambda i: i, range(200), pool=pool, depth=8, weight=weights.__getitem__, max_weight=100):
            yielded.append(r)
    assert yielded == list(range(200))
    assert all(total <= 100 or count == 1 for total, count in worst)
    assert max(count for _, count in worst) > 2  # light items do run several at a time
    assert max(count for _, count in worst) <= 8  # and the depth still holds


def test_the_weight_bound_holds_back_submission() -> None:
    sizes = {0: 60, 1: 60, 2: 30, 3: 30, 4: 150, 5: 1}
    with _Recording(max_workers=1) as pool:
        results = ordered_map(lambda i: i, range(6), pool=pool, depth=10, weight=sizes.__getitem__, max_weight=100)
        assert next(results) == 0 and pool.submitted == [0]  # 60 + 60 > 100: item 1 waits for item 0 to go
        assert next(results) == 1 and pool.submitted == [0, 1, 2]  # 60 + 30 fit; 30 more do not: item 3 waits
        assert next(results) == 2 and pool.submitted == [0, 1, 2, 3]
        assert next(results) == 3 and pool.submitted == [0, 1, 2, 3]  # 150 > 100: item 4 waits for nothing
        assert next(results) == 4 and pool.submitted == [0, 1, 2, 3, 4]  # heavier than the bound: alone
        assert list(results) == [5]


def test_weight_arguments_are_checked() -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        with pytest.raises(ValueError, match="go together"):
            list(ordered_map(lambda i: i, [1], pool=pool, depth=1, weight=lambda i: i))
        with pytest.raises(ValueError, match="max_weight"):
            list(ordered_map(lambda i: i, [1], pool=pool, depth=1, weight=lambda i: i, max_weight=0))
        with pytest.raises(ValueError, match="negative"):
            list(ordered_map(lambda i: i, [-1], pool=pool, depth=1, weight=lambda i: i, max_weight=5))
