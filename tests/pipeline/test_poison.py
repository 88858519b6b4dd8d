"""The in-flight record's rules (`pipeline.segmenting.poison.FlightLog`), one case each, and ``--retry-poisoned``'s
reading
of committed rows, without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.exactly_once.inspection import committed_rows
from pipeline.schema import IMAGES_SCHEMA
from pipeline.segmenting.poison import POISON_ERROR, Flight, FlightLog, is_poisoned_error, poisoned_error


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
    assert log.open_blocks() == 1
    log.finish("s")
    assert log.open_blocks() == 0 and log.begin("s").deaths == 0


def test_a_flight_without_a_recorder_does_nothing() -> None:
    flight = Flight(None, "s")
    flight.announce(["a"])
    assert flight.begin().deaths == 0


def _images_part(path: Path, errors: list[str | None]) -> None:
    rows = [
        {"image_id": f"/in/{i}.jpg", "source": f"/in/{i}.jpg", "member": None, "width": None, "height": None,
         "status": "ok" if e is None else "error", "error": e, "retryable": False, "num_segments": 0,
         "run_id": "r0", "input_size": 10, "input_version": "v"}
        for i, e in enumerate(errors)
    ]  # fmt: skip
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), path)


def test_retry_poisoned_reads_a_poisoned_row_as_retryable_and_nothing_else(tmp_path: Path) -> None:
    part = tmp_path / "out" / "images" / "part-a.parquet"
    _images_part(part, [None, poisoned_error("decoding"), "corrupt image header: x"])
    batch = {"path": np.array([str(part)], dtype=object)}
    assert committed_rows(batch, output=str(tmp_path / "out"))["retryable"].to_pylist() == [False, False, False]
    again = committed_rows(batch, output=str(tmp_path / "out"), retry_poisoned=True)
    assert again["retryable"].to_pylist() == [False, True, False]


def test_an_attempt_that_raised_is_no_death_when_it_is_retried() -> None:
    """A call that raised (its actor alive: a commit that failed after its retries) and is retried by Ray on
    the same actor: its images in flight are not struck."""
    log = FlightLog()
    log.begin("s")
    log.announce("s", ["a", "b"])
    log.abandon("s")
    history = log.begin("s")
    assert history.deaths == 0 and history.suspects == frozenset()
