"""`pipeline.segmenting.watchdog.HungBatchWatchdog`: a batch past the floor and 20x the typical one is reported,
once."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.segmenting.watchdog import FACTOR, HungBatchWatchdog


def test_a_batch_that_runs_past_its_limit_is_reported_while_it_runs() -> None:
    hung = threading.Event()
    seconds: list[float] = []
    watchdog = HungBatchWatchdog(floor_s=0.3, on_hung=lambda s: (seconds.append(s), hung.set()), poll_s=0.02)
    with watchdog.batch():
        assert hung.wait(timeout=10)  # reported while the batch still runs
    assert len(seconds) == 1 and seconds[0] > 0.3


def test_batches_within_the_limit_are_not_reported() -> None:
    seconds: list[float] = []
    watchdog = HungBatchWatchdog(floor_s=0.5, on_hung=seconds.append, poll_s=0.02)
    for _ in range(5):
        with watchdog.batch():
            time.sleep(0.05)
    time.sleep(0.1)
    assert seconds == []


def test_the_limit_is_the_floor_or_twenty_typical_batches() -> None:
    watchdog = HungBatchWatchdog(floor_s=1.0, on_hung=lambda s: None)
    assert watchdog.limit_s() == 1.0
    watchdog._recent.extend([0.2, 0.3, 0.25])  # a slow model: 20x its median
    assert watchdog.limit_s() == pytest.approx(FACTOR * 0.25)


def test_a_floor_must_be_positive() -> None:
    with pytest.raises(ValueError, match="floor_s"):
        HungBatchWatchdog(floor_s=0, on_hung=lambda s: None)
