"""`bench.in_run.in_run_rate`: the rate inside one run leaves out start-up and tail, and parallel actors'
waves of parts do not inflate it."""

from __future__ import annotations

import pytest

from bench.in_run import in_run_rate


def test_start_up_and_tail_are_outside_the_window() -> None:
    # 10 parts of 10 images at 5 images/s after a 30 s start; the last part comes 20 s late (a slow tail)
    events = [(30.0 + 2.0 * i, 10) for i in range(9)] + [(30.0 + 16.0 + 20.0, 10)]
    rate = in_run_rate(events)
    assert rate["images_per_s"] == pytest.approx(5.0)
    assert rate["window_events"] == [0, 8]  # from 10 % done to 90 % done
    assert (rate["images"], rate["events"]) == (100, 10)


def test_parallel_actors_finishing_in_waves_give_their_true_rate() -> None:
    # 2 actors, parts of 10 images in lockstep every 4 s: 5 images/s in all; 11 parts
    events = [(4.0 * (1 + i // 2) + 0.01 * (i % 2), 10) for i in range(11)]
    rate = in_run_rate(events, actors=2)
    assert rate["images_per_s"] == pytest.approx(5.0, rel=0.01)
    assert rate["window_events"] == [1, 7]  # the second part of wave 0 to the second of wave 3
    naive = in_run_rate(events, actors=1)  # from one wave's second part to a later wave's first: a part short
    assert naive["images_per_s"] < 4.5


def test_too_few_events_for_a_window_raise() -> None:
    with pytest.raises(ValueError, match="more parts needed"):
        in_run_rate([(1.0, 50), (2.0, 50)])
