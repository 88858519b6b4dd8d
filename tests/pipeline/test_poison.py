"""The in-flight record's rules (`pipeline.poison.FlightLog`), one case each, without Ray."""

from __future__ import annotations

from pipeline.poison import POISON_ERROR, Flight, FlightLog, is_poisoned_error, poisoned_error


def test_a_first_attempt_has_no_history() -> None:
    log = FlightLog()
    history = log.begin("s")
    assert (history.deaths, history.suspects, history.poisoned) == (0, frozenset(), {})


def test_a_death_strikes_the_images_in_flight_and_not_those_done() -> None:
    log = FlightLog()
    log.begin("s")
    log.announce("s", ["a", "b", "c"])
    log.done("s", ["a"])
    history = log.begin("s")  # the first attempt never finished: it died with b and c in flight
    assert history.deaths == 1 and history.suspects == {"b", "c"} and history.poisoned == {}


def test_a_death_with_nothing_in_flight_strikes_nobody() -> None:
    log = FlightLog()
    log.begin("s")
    log.announce("s", ["a"])
    log.done("s", ["a"])
    history = log.begin("s")  # e.g. a node lost while the call committed
    assert history.deaths == 1 and history.suspects == frozenset() and history.poisoned == {}


def test_a_suspect_killed_again_alone_is_poisoned_with_its_stage_and_a_cleared_one_is_not_a_suspect() -> None:
    log = FlightLog()
    log.begin("s")
    log.announce("s", ["a", "b", "c"])
    log.begin("s")
    log.announce("s", ["a"], "decoding", alone=True)
    log.announce("s", ["a"], "segmenting", alone=True)
    log.done("s", ["a"])  # a came through alone: cleared
    log.announce("s", ["b"], "decoding", alone=True)
    log.dying("s", "a model batch hung for 301 s")
    history = log.begin("s")  # died with b alone
    assert history.deaths == 2 and history.suspects == {"c"}
    assert history.poisoned == {"b": poisoned_error("decoding", "a model batch hung for 301 s")}
    assert history.poisoned["b"].startswith(f"{POISON_ERROR} while decoding (a model batch hung for 301 s): skipped")
    assert is_poisoned_error(history.poisoned["b"]) and not is_poisoned_error("decoding failed: x")


def test_two_deaths_in_pipelined_windows_never_poison() -> None:
    """Two deaths with the same image in a normal window (say two lost nodes): still only a suspect."""
    log = FlightLog()
    for _ in range(2):
        log.begin("s")
        log.announce("s", ["a", "b"])
    history = log.begin("s")
    assert history.deaths == 2 and history.suspects == {"a", "b"} and history.poisoned == {}


def test_a_finished_shard_is_forgotten_and_shards_are_apart() -> None:
    log = FlightLog()
    log.begin("s")
    log.begin("t")
    log.announce("s", ["a"])
    log.finish("t")
    assert log.open_shards() == 1
    log.finish("s")
    assert log.open_shards() == 0 and log.begin("s").deaths == 0


def test_a_flight_without_a_recorder_does_nothing() -> None:
    flight = Flight(None, "s")
    flight.announce(["a"])
    assert flight.begin().deaths == 0
