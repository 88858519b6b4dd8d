"""Poison isolation: an input that kills its model worker gets an error row instead of failing the job.

MapReduce's "skipping bad records" (Dean & Ghemawat, OSDI 2004, §3.7), for the block call
(`pipeline.segmenting.block_call`):

1. Before an image is decoded, segmented and RLE-encoded, the block call *announces* it in flight, and it says
   when the image is *done* (encoded). The record lives in a `FlightLog` held by one small actor per run
   (`start_flight_recorder`, on the driver's node, no CPU), so it survives the model actor's death and is seen
   by the call's retry wherever Ray runs it.
2. A block call begins with `FlightLog.begin`. When the block's previous attempt never finished, its actor died:
   every image it had in flight gets a *strike* (a *death* with nothing in flight, such as a lost node, strikes
   nobody and the block is redone as before).
3. The retry runs the images without a strike as usual, then each *suspect* (one strike) alone: decoded,
   segmented and encoded with nothing else in flight, each step announced with its stage. A suspect that comes
   through is cleared.
4. A suspect whose actor dies while it is alone is *poisoned* (in flight at two deaths, the second alone): the
   retry gives it an error row, ``killed the model worker (twice) while <stage>: skipped``, not retryable
   (a re-run would only be killed again; ``--retry-poisoned`` redoes such rows on purpose), and commits its
   block-mates.

So each death spends one of the call's retries (`pipeline.run.BLOCK_CALL_RETRIES`) on finding the poison, never
on a blind repeat: k poisoned images in flight together cost 1 + k deaths, k far apart in one block 2k. A hung
model batch, or a device fault, is turned into a death by the block call itself (`pipeline.segmenting.watchdog`). Order:
the images done before a death are a prefix of the block's images, so a retry cuts the same first parts (part
names hash their ids) and nothing is committed twice.

Cost: one call to the recorder per `ANNOUNCE_CHUNK` images, not waited for in the steady state (an
announcement is sent a chunk ahead and carries the completions since the last one): BENCHMARKS.md "Poison
isolation". If the recorder itself is lost, the block calls go on without isolation (logged once): a death then
fails its retries as before. Order: a retry cuts the same parts as the attempt before it because suspects run
alone *in place* (`pipeline.segmenting.block_call.BlockSegmenter._results`), never moved to the end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

Stage = Literal["in flight", "decoding", "segmenting", "encoding"]
IN_FLIGHT: Stage = "in flight"  # announced in a normal (pipelined) window: the stage is not known
POISON_ERROR = "killed the model worker (twice)"  # the start of a poisoned image's error
RECORDER_TIMEOUT_S = 60.0  # an answer of the recorder waited for longer: isolation off for this actor
ANNOUNCE_CHUNK = 16  # images per announcement (two in flight: 32 images announced ahead of the decoder at most)


def poisoned_error(stage: str, reason: str = "") -> str:
    """The error row of an image in flight at two deaths, the second while it was alone at ``stage``."""
    why = f" ({reason})" if reason else ""
    return f"{POISON_ERROR} while {stage}{why}: skipped; a re-run keeps this row, --retry-poisoned redoes it on purpose"


def is_poisoned_error(error: str | None) -> bool:
    return bool(error) and str(error).startswith(POISON_ERROR)


@dataclass
class BlockHistory:
    """What `FlightLog.begin` tells an attempt: the images to run alone, and those to skip with their row."""

    deaths: int = 0  # earlier attempts of this block that never finished
    suspects: frozenset[str] = frozenset()  # image ids in flight at one death: run alone
    poisoned: dict[str, str] = field(default_factory=dict)  # image id -> its error row


@dataclass
class _Block:
    open: bool = False  # an attempt began and has not finished
    in_flight: dict[str, Stage] = field(default_factory=dict)
    alone: bool = False  # the images in flight are one suspect run alone
    reason: str = ""  # why the current attempt is about to die (a hung batch), if it says so
    deaths: int = 0
    strikes: dict[str, int] = field(default_factory=dict)
    poisoned: dict[str, str] = field(default_factory=dict)


class FlightLog:
    """The in-flight record of every block of one run (see the module docstring). Plain Python: the run's
    recorder actor holds one (`start_flight_recorder`); a test can hold one in process."""

    def __init__(self) -> None:
        self._blocks: dict[str, _Block] = {}

    def begin(self, key: str) -> BlockHistory:
        """An attempt of block ``key`` begins; an earlier attempt that never finished died with its images."""
        block = self._blocks.setdefault(key, _Block())
        if block.open:
            self._death(block)
        block.open, block.alone, block.reason = True, False, ""
        suspects = frozenset(i for i, n in block.strikes.items() if n > 0 and i not in block.poisoned)
        return BlockHistory(block.deaths, suspects, dict(block.poisoned))

    def _death(self, block: _Block) -> None:
        block.deaths += 1
        for image_id, stage in block.in_flight.items():
            if block.alone and block.strikes.get(image_id, 0) > 0:
                block.poisoned[image_id] = poisoned_error(stage, block.reason)
            block.strikes[image_id] = block.strikes.get(image_id, 0) + 1
        block.in_flight.clear()

    def announce(
        self, key: str, image_ids: list[str], stage: Stage = IN_FLIGHT, *, alone: bool = False, done: Sequence[str] = ()
    ) -> None:
        """``image_ids`` are in flight (at ``stage``); ``alone``: one suspect with nothing else in flight; ``done``:
        images that came through since the last call (`done`, sent along to save a call)."""
        self.done(key, list(done))
        block = self._blocks.setdefault(key, _Block(open=True))
        block.alone = alone
        for image_id in image_ids:
            block.in_flight[image_id] = stage

    def done(self, key: str, image_ids: list[str]) -> None:
        """``image_ids`` came through (encoded): no longer in flight, and a suspect among them is cleared."""
        block = self._blocks.get(key)
        if block is None:
            return
        for image_id in image_ids:
            block.in_flight.pop(image_id, None)
            block.strikes.pop(image_id, None)

    def dying(self, key: str, reason: str) -> None:
        """The current attempt is about to be killed on purpose (a hung model batch), for this reason."""
        block = self._blocks.get(key)
        if block is not None:
            block.reason = reason

    def finish(self, key: str) -> None:
        """The attempt returned: the block is committed and its record is dropped."""
        self._blocks.pop(key, None)

    def abandon(self, key: str) -> None:
        """The attempt raised (its actor alive, e.g. a commit that failed): no death, nothing in flight struck,
        whether or not Ray retries it."""
        block = self._blocks.get(key)
        if block is not None:
            block.open, block.alone = False, False
            block.in_flight.clear()

    def open_blocks(self) -> int:
        return sum(1 for s in self._blocks.values() if s.open)


def start_flight_recorder() -> Any:
    """The run's `FlightLog` in an actor on this (the driver's) node, reserving no CPU; owned by the driver,
    so it ends with the run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    recorder = ray.remote(FlightLog).options(
        num_cpus=0, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)
    )
    return recorder.remote()


class Flight:
    """One block attempt's side of the record. Announcements are sent a chunk ahead and waited for before the
    chunk is handed on (the actor may die right after); completions are gathered and sent along with the next
    announcement, or by `flush` without waiting (a lost or late one only leaves images suspects), always before an
    image runs alone.
    ``recorder`` is the run's recorder actor, a `FlightLog` in process (tests), or None (no isolation)."""

    def __init__(self, recorder: Any, key: str) -> None:
        self.recorder, self.key = recorder, key
        self.alone = False
        self._done: list[str] = []

    def begin(self) -> BlockHistory:
        return self._wait(self._send("begin", self.key)) or BlockHistory()

    def announce(self, image_ids: list[str], stage: Stage = IN_FLIGHT) -> None:
        """``image_ids`` in flight (at ``stage``), recorded before this returns."""
        self.wait(self.announce_ahead(image_ids, stage))

    def announce_ahead(self, image_ids: list[str], stage: Stage = IN_FLIGHT) -> Any:
        """Send the announcement; `wait` for what this returns before any of ``image_ids`` is handled."""
        if not image_ids:
            return None
        done, self._done = self._done, []  # sent along: one call per chunk in the steady state
        return self._send("announce", self.key, image_ids, stage, alone=self.alone, done=done)

    def wait(self, ack: Any) -> None:
        self._wait(ack)

    def done(self, image_ids: list[str]) -> None:
        """``image_ids`` came through: sent with the next announcement, or by `flush` (at once when alone)."""
        self._done.extend(image_ids)
        if len(self._done) >= 4 * ANNOUNCE_CHUNK or self.alone:
            self.flush()

    def flush(self) -> None:
        if self._done:
            self._send("done", self.key, self._done)
            self._done = []

    def dying(self, reason: str) -> None:
        self._wait(self._send("dying", self.key, reason))

    def finish(self) -> None:
        self._send("finish", self.key)

    def abandon(self) -> None:
        self._wait(self._send("abandon", self.key))

    def _send(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The call's result (in process) or its object ref (on Ray); None without a recorder."""
        if self.recorder is None:
            return None
        if isinstance(self.recorder, FlightLog):
            return _Done(getattr(self.recorder, method)(*args, **kwargs))
        import ray

        try:
            return getattr(self.recorder, method).remote(*args, **kwargs)
        except ray.exceptions.RayError as exc:
            self._lost(exc)
            return None

    def _wait(self, sent: Any) -> Any:
        if sent is None:
            return None
        if isinstance(sent, _Done):
            return sent.value
        import ray

        try:
            return ray.get(sent, timeout=RECORDER_TIMEOUT_S)
        except ray.exceptions.RayError as exc:  # gone, unreachable or stuck: never the block's failure
            self._lost(exc)
            return None

    def _lost(self, exc: BaseException) -> None:
        """The recorder is gone, unreachable or stuck: this actor goes on without isolation."""
        log.warning("the in-flight recorder is gone (%s); poison isolation is off for this actor", exc)
        self.recorder = None


@dataclass
class _Done:
    value: Any  # a call's result, in process
