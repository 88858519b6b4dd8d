"""The block call: one model actor reads, decodes, segments, encodes and commits a whole work block of images.

`BlockSegmenter` is the callable class `pipeline.run` maps over the job's work blocks with an actor pool (GPU or
CPU). A *work block* is one block of refs (`pipeline.inputs.sources.REF_SCHEMA`) that one actor call gets: up to
``--rows-per-file`` listed files, or one input *shard* (a tar or Parquet file of many images). Ray Data schedules
one task per work block, so its per-block cost on the driver is paid per block, never per model batch, and only
refs (~100 B each) and part rows cross the object store: bytes and decoded pixels never leave the actor's process.

Inside one call the stages are pipelined on the actor's threads (`pipeline.segmenting.pipelining.ordered_map`):

    refs --read bytes--> image rows --decode + resize--> decoded images --(batches)--> model (its own thread)
         --rows + RLE--> result rows --gathered into parts of --rows-per-file--> commit (`pipeline.exactly_once.commit`)

so the next batch is decoded, and the previous one encoded and committed, while the model runs the current one.
Reads and commits run on an I/O pool (`IO_THREADS`), decoding, the result rows and RLE on a pool of one thread per
CPU the actor reserves (at least 2). The model is built and run on one thread the actor owns (`model_thread`),
never on the thread Ray Data calls from: it runs `PanopticSegmenter.segment` (the device's part) and nothing else,
with the next batch waiting for it (`MODEL_IN_FLIGHT`). An actor runs one call at a time: a suspect of an earlier
death must run alone in its process (`pipeline.segmenting.poison`). Every stage's busy time, the model thread's idle
time and what the call waited on are counted on the actor's clock (`pipeline.segmenting.stage_clock`), and each part row
carries the seconds since the actor's previous part (`pipeline.bottleneck` names the run's limiting stage from them;
`pipeline.segmenting.metrics` exports them).

Memory per actor is bounded by the depths below: `READ_AHEAD_BYTES` of listed input (and at most
`READ_AHEAD_FILES` files or `READ_AHEAD_SHARDS` whole tar / Parquet shards) read ahead, two chunks of
`ANNOUNCE_CHUNK` rows announced ahead of ``2 × batch_size`` images being decoded (at full size),
`MODEL_IN_FLIGHT` batches at the model, `RLE_IN_FLIGHT` batches of full-size id maps awaiting RLE, one part being
gathered and `COMMITS_IN_FLIGHT` parts being written: the README's formula ("Memory per actor"), checked by
tests/pipeline/test_actor_memory.py.

A call returns one `pipeline.schema.PART_ROW_SCHEMA` row per committed part. Ray's retry of a call whose actor
died redoes the same work block and overwrites the same part names (part names hash their image ids), so each
image is committed once; the images in flight at the death are redone one at a time, in place, and one that
kills its actor again gets an error row (`pipeline.segmenting.poison`); a model batch that hangs ends the actor
(`pipeline.segmenting.watchdog`). Any exception while reading, decoding, segmenting or encoding one image is that
image's error row (`stage_error`), never the block's failure; a failed commit is retried or fails the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from model.config import InferenceConfig
from pipeline.config import FailureConfig, InputConfig, ModelSpec, ResourceConfig, redact_uri
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.parts import PartGatherer
from pipeline.inputs.decode import UNREAD, decode_input, decoded_batch
from pipeline.inputs.ids import SHARD_ITSELF, file_id, member_id
from pipeline.inputs.readers import ImageRow, read_ref, ref_rows
from pipeline.inputs.storage import TRANSIENT_ERRORS
from pipeline.schema import EMPTY_PIXELS, PART_ROW_SCHEMA, DecodedImage
from pipeline.segmenting.metrics import PartMetrics
from pipeline.segmenting.pipelining import ordered_map
from pipeline.segmenting.poison import ANNOUNCE_CHUNK, BlockHistory, Flight
from pipeline.segmenting.prediction_tables import encode_results, prediction_table
from pipeline.segmenting.stage_clock import StageClock
from pipeline.segmenting.watchdog import HungBatchWatchdog

if TYPE_CHECKING:  # the model's module imports torch: the driver, which maps this class, never needs it
    from pipeline.segmenting.predict import PanopticSegmenter, Segmented

log = logging.getLogger(__name__)

READ_AHEAD_FILES = 64  # file refs read ahead of the decoder (object-store latency hidden by concurrency)
READ_AHEAD_SHARDS = 2  # tar / Parquet refs read ahead (each one whole shard in memory)
READ_AHEAD_BYTES = 256 << 20  # and at most these listed bytes read ahead (a larger ref alone; unlisted: a share)
MODEL_IN_FLIGHT = 2  # model batches handed to the model thread: one running, the next one waiting
RLE_IN_FLIGHT = 2  # model batches awaiting RLE
COMMITS_IN_FLIGHT = 2  # parts being written
IO_THREADS = 16  # reads and commits wait on storage, not on a CPU
DEFAULT_FAILURES = FailureConfig()


class BlockSegmenter:
    """Ray Data callable class: one work block of refs in, one `PART_ROW_SCHEMA` row per committed part out.

    Built once per model actor from the job's frozen config sections (`pipeline.config`, all picklable):

    Args:
        model: which published model (``variant``) and its checkpoint (``weights``: a local path the driver
            resolved, or ``synthetic``), built on the actor's model thread.
        device: ``cuda`` or ``cpu``: where the model runs (the driver resolved ``auto``).
        inference: the model's input size and thresholds (`model.config.InferenceConfig`), also the decoder's
            resize target.
        input: how inputs are read and bounded: ``bytes_column`` / ``id_column`` of Parquet shards,
            ``max_pixels`` (checked on the header) and ``max_bytes`` (per object).
        resources: ``batch_size`` (images per model call) and ``rows_per_file`` (images per committed part).
        cpus: the CPUs the actor reserves: the decode / RLE pool's threads (at least 2) and the metrics' budget.
        failures: the hung-batch floor and the read timeout (`FailureConfig`).
        committer: writes and commits each part (`pipeline.exactly_once.commit.OutputCommitter`, pickled as
            output and run id).
        flight_recorder: the run's in-flight record (`pipeline.segmenting.poison.start_flight_recorder`, an actor
            handle); None: no poison isolation.
    """

    flight_recorder: Any = None
    failures: FailureConfig = DEFAULT_FAILURES
    watchdog: HungBatchWatchdog | None = None
    model_thread: ThreadPoolExecutor | None = None
    clock: StageClock | None = None
    metrics: PartMetrics | None = None
    _flight: Flight | None = None  # the call running: its images are in flight at a death

    def __init__(
        self,
        *,
        model: ModelSpec,
        device: Literal["cpu", "cuda"],
        inference: InferenceConfig,
        input: InputConfig,
        resources: ResourceConfig,
        cpus: float,
        committer: OutputCommitter,
        failures: FailureConfig = DEFAULT_FAILURES,
        flight_recorder: Any = None,
    ) -> None:
        # The model is built and run on one thread of the actor's own, never on Ray Data's per-call thread: torch's
        # OpenMP team then has one master, whose workers keep spinning between parallel regions (a second master
        # makes libgomp throttle their spin-wait: a CPU actor lost a quarter of its cores to sleeping workers).
        from pipeline.segmenting.predict import PanopticSegmenter

        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-model")
        segmenter = self.model_thread.submit(
            PanopticSegmenter,
            variant=model.variant,
            weights=model.weights,
            inference=inference,
            device=device,
            encode_rle=False,
        ).result()
        self._attach(
            segmenter,
            inference=inference,
            input=input,
            resources=resources,
            cpus=cpus,
            committer=committer,
            failures=failures,
            flight_recorder=flight_recorder,
            node_id=_node_id(),
        )
        self.watchdog = HungBatchWatchdog(floor_s=failures.hung_batch_s, on_hung=self._hung)
        self.metrics = PartMetrics(tags={"run_id": committer.run_id})  # Ray metrics (`pipeline.segmenting.metrics`)

    @classmethod
    def with_model(
        cls,
        segmenter: PanopticSegmenter,
        *,
        inference: InferenceConfig,
        input: InputConfig,
        resources: ResourceConfig,
        cpus: float,
        committer: OutputCommitter,
        failures: FailureConfig = DEFAULT_FAILURES,
        flight_recorder: Any = None,
        io_threads: int = IO_THREADS,
        node_id: str = "",
    ) -> BlockSegmenter:
        """The block call around a model built elsewhere (``encode_rle=False``), outside Ray: without the actor's
        hung-batch watchdog and Ray metrics; the model runs on a thread of the call's own all the same."""
        call = cls.__new__(cls)
        call._attach(
            segmenter,
            inference=inference,
            input=input,
            resources=resources,
            cpus=cpus,
            committer=committer,
            failures=failures,
            flight_recorder=flight_recorder,
            io_threads=io_threads,
            node_id=node_id,
        )
        return call

    def _attach(
        self,
        segmenter: PanopticSegmenter,
        *,
        inference: InferenceConfig,
        input: InputConfig,
        resources: ResourceConfig,
        cpus: float,
        committer: OutputCommitter,
        failures: FailureConfig,
        flight_recorder: Any,
        node_id: str,
        io_threads: int = IO_THREADS,
    ) -> None:
        self.segmenter, self.inference, self.input, self.resources = segmenter, inference, input, resources
        self.cpus = cpus  # reserved (the metrics' CPU budget)
        self.committer, self.failures, self.flight_recorder = committer, failures, flight_recorder
        self.clock = StageClock()
        self.pool = ThreadPoolExecutor(max_workers=max(2, int(cpus)), thread_name_prefix="block-cpu")
        self.io_pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="block-io")
        self.node_id = node_id

    def __call__(self, refs: pa.Table) -> pa.Table:
        with self._clock().call():
            return self._call(refs)

    def _call(self, refs: pa.Table) -> pa.Table:
        flight = self._flight = Flight(self.flight_recorder, block_key(refs))
        history = flight.begin()
        if history.deaths:
            log.warning(
                "work block %s: redone after %d death(s) of its actor; %d image(s) run alone, %d skipped as poisoned",
                flight.key, history.deaths, len(history.suspects), len(history.poisoned),
            )  # fmt: skip
        gatherer = PartGatherer(self.resources.rows_per_file)
        commits: deque[Future[dict[str, object] | None]] = deque()
        rows: list[dict[str, object]] = []

        def commit(part: pa.Table) -> None:
            commits.append(self.io_pool.submit(self._commit, part))
            while len(commits) > COMMITS_IN_FLIGHT:
                self._collect(commits.popleft(), rows)

        try:
            for results in self._results(refs, flight, history):
                for part in gatherer.add(results):
                    commit(part)
            rest = gatherer.rest()
            if rest is not None:
                commit(rest)
            while commits:
                self._collect(commits.popleft(), rows)
        except Exception:  # raised, not died (a failed commit): a retry of it must not count a death
            flight.abandon()
            raise
        flight.finish()
        return pa.Table.from_pylist(rows, schema=PART_ROW_SCHEMA)

    def _commit(self, part: pa.Table) -> dict[str, object] | None:
        with self._clock().busy("commit"):
            row = self.committer.write_part(part, node_id=self.node_id)
        return row if row is None else {**row, "committed_at": time.time()}

    def _collect(self, future: Future[dict[str, object] | None], rows: list[dict[str, object]]) -> None:
        """A committed part's row, with the actor's stage seconds since its previous part
        (`pipeline.segmenting.stage_clock`)."""
        clock = self._clock()
        if not future.done():
            started = time.perf_counter()
            futures.wait([future])
            clock.add("waited_commit", time.perf_counter() - started)
        row = future.result()
        if row is not None:
            row = {**row, "stages": clock.take()}
            rows.append(row)
            if self.metrics is not None:
                self.metrics.record({**row, "cpus": self.cpus})

    def _results(self, refs: pa.Table, flight: Flight, history: BlockHistory) -> Iterator[pa.Table]:
        """`RESULT_SCHEMA` tables in the block's order, whatever its history (so that every attempt cuts the same
        parts): the images pipelined batch by batch, a poisoned one as its error row, and each suspect of an
        earlier death alone, once the images before it are through (`pipeline.segmenting.poison`)."""
        rows = _poisoned_in_place(self._rows(refs), history)
        suspect: list[ImageRow] = []

        def until_suspect() -> Iterator[ImageRow]:
            for row in rows:
                if row.image_id in history.suspects and not row.error:
                    suspect.append(row)
                    return
                yield row

        clock, model_thread = self._clock(), self._model_pool()
        while True:
            images = ordered_map(
                self._decode,
                _announced(until_suspect(), flight),
                pool=self.pool,
                depth=2 * self.resources.batch_size,
                on_wait=clock.waiter("decode"),
            )
            batches = (_model_batch(batch) for batch in _chunks(images, self.resources.batch_size))
            segmented = ordered_map(
                self._segment, batches, pool=model_thread, depth=MODEL_IN_FLIGHT, on_wait=clock.waiter("model")
            )
            encoded = ordered_map(
                self._encode, segmented, pool=self.pool, depth=RLE_IN_FLIGHT, on_wait=clock.waiter("rle")
            )
            for results in encoded:
                flight.done(results.column("image_id").to_pylist())
                yield results
            flight.flush()
            if not suspect:
                return
            yield self._alone(suspect.pop(), flight)

    def _alone(self, row: ImageRow, flight: Flight) -> pa.Table:
        """One suspect decoded, segmented and encoded with nothing else in flight, each stage announced."""
        flight.alone = True
        flight.announce([row.image_id], "decoding")
        image = self._decode(row)
        flight.announce([row.image_id], "segmenting")
        segmented = self._model_pool().submit(self._segment, _model_batch([image])).result()
        flight.announce([row.image_id], "encoding")
        results = self._encode(segmented)
        flight.done([row.image_id])
        flight.alone = False
        return results

    def _rows(self, refs: pa.Table) -> Iterator[ImageRow]:
        """Each image row of the block, read ahead on the I/O pool (bounded by count and by listed bytes), each
        let go of as it is handed on, not with its whole block."""
        listed = refs.column("size").to_pylist() if "size" in refs.column_names else [None] * refs.num_rows
        sizes = dict(zip(refs.column("uri").to_pylist(), listed))

        def weight(ref: tuple[str, str, list[str]]) -> int:  # its listed bytes; unlisted: a count's share
            size = sizes.get(ref[0])
            per = READ_AHEAD_FILES if ref[1] == "file" else READ_AHEAD_SHARDS
            return READ_AHEAD_BYTES // per if size is None else int(size)

        files_only = all(kind == "file" for kind in refs.column("kind").to_pylist())
        depth = READ_AHEAD_FILES if files_only else READ_AHEAD_SHARDS
        read_ahead = ordered_map(
            self._read,
            ref_rows(refs),
            pool=self.io_pool,
            depth=depth,
            weight=weight,
            max_weight=READ_AHEAD_BYTES,
            on_wait=self._clock().waiter("read"),
        )
        for image_rows in read_ahead:
            image_rows.reverse()
            while image_rows:
                yield image_rows.pop()

    def _read(self, ref: tuple[str, str, list[str]]) -> list[ImageRow]:
        with self._clock().busy("read"):
            return self._read_ref(ref)

    def _read_ref(self, ref: tuple[str, str, list[str]]) -> list[ImageRow]:
        uri, kind, skip = ref
        try:
            return read_ref(
                uri,
                kind,
                skip,
                bytes_column=self.input.bytes_column,
                id_column=self.input.id_column,
                max_bytes=self.input.max_bytes,
                read_timeout_s=self.failures.read_timeout_s,
            )
        except Exception as exc:  # any failure of one ref is its error row; the block goes on
            retryable = isinstance(exc, (*TRANSIENT_ERRORS, MemoryError))  # another node may have the memory
            return unread_ref(uri, kind, skip, stage_error("reading", exc), retryable=retryable)

    def _decode(self, row: ImageRow) -> tuple[ImageRow, DecodedImage]:
        if row.error:
            return row, UNREAD
        with self._clock().busy("decode"):
            return self._decoded(row)

    def _decoded(self, row: ImageRow) -> tuple[ImageRow, DecodedImage]:
        try:
            decoded = decode_input(row.data, max_pixels=self.input.max_pixels, inference=self.inference)
        except Exception as exc:  # beyond what decode_input turns into errors (a codec plugin's own, a bug)
            decoded = DecodedImage(EMPTY_PIXELS, b"", 1, 0, 0, stage_error("decoding", exc))
        return row._replace(data=b""), decoded  # the bytes are not needed past here

    def _segment(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Segmented]:
        """The model on one batch, on the model thread: timed (`pipeline.segmenting.stage_clock`) and watched."""
        with self._clock().model_batch():
            return batch, self._segmented(batch)

    def _segmented(self, batch: dict[str, np.ndarray]) -> Segmented:
        """The model's output of a batch (`pipeline.segmenting.watchdog` watching). A batch whose call raises is
        redone image
        by image, and an image whose own call raises gets an error row: one bad image never fails its block."""
        from pipeline.segmenting.predict import Segmented, is_device_fault

        try:
            with self._watched():
                return self.segmenter.segment(batch)
        except Exception as exc:
            if is_device_fault(exc):  # the device's context is lost: every later call would fail too
                self._end_actor(f"the device failed: {type(exc).__name__}: {exc}".splitlines()[0][:200])
            if len(batch["image_id"]) == 1:
                return Segmented({}, [stage_error("segmenting", exc)], [False])
            log.warning("a model batch raised %s; redoing its images one at a time", type(exc).__name__)
        return _concat_segmented([self._segmented(_take(batch, i)) for i in range(len(batch["image_id"]))])

    def _watched(self) -> contextlib.AbstractContextManager[None]:
        return self.watchdog.batch() if self.watchdog is not None else contextlib.nullcontext()

    def _encode(self, segmented: tuple[dict[str, np.ndarray], Segmented]) -> pa.Table:
        """A model batch's `RESULT_SCHEMA` rows (its rows, their RLE) on the CPU pool, timed as ``rle``."""
        batch, output = segmented
        with self._clock().busy("rle"):
            return self._encoded(self._prediction_rows(batch, output))

    def _prediction_rows(self, batch: dict[str, np.ndarray], output: Segmented) -> pa.Table:
        """`PREDICTION_SCHEMA` rows of a batch; a row whose own conversion raises gets an error row."""
        try:
            return self.segmenter.table(batch, output)
        except Exception as exc:
            n = len(batch["image_id"])
            if n == 1:
                return _error_predictions(batch, stage_error("encoding", exc))
        return pa.concat_tables([self._prediction_rows(_take(batch, i), _row(output, i)) for i in range(n)])

    def _encoded(self, predictions: pa.Table) -> pa.Table:
        """`encode_results`; a row whose encoding raises gets an error row instead."""
        try:
            return encode_results(predictions)
        except Exception as exc:
            if predictions.num_rows == 1:
                return encode_results(_failed(predictions, stage_error("encoding", exc)))
        return pa.concat_tables([self._encoded(predictions.slice(i, 1)) for i in range(predictions.num_rows)])

    def _clock(self) -> StageClock:
        if self.clock is None:  # a call built without __init__ (tests)
            self.clock = StageClock()
        return self.clock

    def _model_pool(self) -> ThreadPoolExecutor:
        if self.model_thread is None:
            self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-model")
        return self.model_thread

    def _hung(self, seconds: float) -> None:
        """The watchdog's verdict on the running batch (`pipeline.segmenting.watchdog`)."""
        limit = self.failures.hung_batch_s
        log.error("a model batch hung for %.0f s (--hung-batch-timeout %.0f s)", seconds, limit)
        self._end_actor(f"a model batch hung for {seconds:.0f} s")

    def _end_actor(self, reason: str) -> None:
        """Record why with the images in flight, then end this process: Ray restarts the actor and retries the
        work block, whose poison isolation runs the images that were in flight alone (`pipeline.segmenting.poison`)."""
        try:
            log.error("ending this model actor: %s", reason)
            if self._flight is not None:
                self._flight.dying(reason)  # waited for at most `pipeline.segmenting.poison.RECORDER_TIMEOUT_S`
        finally:
            end_process(ACTOR_ENDED_EXIT_CODE)  # whatever happened above


ACTOR_ENDED_EXIT_CODE = 75  # the model actor ended itself (a hung batch, a lost device)


def end_process(code: int) -> None:
    """Leave at once: no cleanup that could hang on a stuck device, thread or lock (stderr is flushed first)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


def block_key(refs: pa.Table) -> str:
    """The same key for every attempt of one work block: a hash of its refs (URIs and skipped members)."""
    digest = hashlib.sha256()
    for uri, kind, skip in ref_rows(refs):
        digest.update(json.dumps([uri, kind, skip]).encode())
    return digest.hexdigest()[:24]


def stage_error(stage: str, exc: BaseException) -> str:
    """An error row's text for an unexpected exception at a stage (redacted: no secret from a URI or a message)."""
    return redact_uri(f"{stage} failed: {type(exc).__name__}: {exc}".rstrip(": "))


def unread_ref(uri: str, kind: str, skip: list[str], error: str, *, retryable: bool) -> list[ImageRow]:
    """The error row of a ref whose reader raised: the file's row, or the shard's own (member `SHARD_ITSELF`)."""
    if kind == "file":
        return [ImageRow(file_id(uri), uri, None, None, None, b"", error, retryable)]
    if SHARD_ITSELF in skip:
        return []
    return [ImageRow(member_id(uri, SHARD_ITSELF), uri, SHARD_ITSELF, None, None, b"", error, retryable)]


def _poisoned_in_place(rows: Iterator[ImageRow], history: BlockHistory) -> Iterator[ImageRow]:
    """``rows``, a poisoned image's replaced by its error row (it is never decoded again)."""
    for row in rows:
        if row.image_id in history.poisoned:
            error = history.poisoned[row.image_id]
            log.warning("%s: %s", redact_uri(row.image_id), error)  # which image, which stage, what to do
            yield row._replace(data=b"", error=error, retryable=False)
        else:
            yield row


def _announced(rows: Iterator[ImageRow], flight: Flight) -> Iterator[ImageRow]:
    """``rows``, each announced in flight (`pipeline.segmenting.poison`) before it is handed on: `ANNOUNCE_CHUNK` at
    a time,
    the next chunk's announcement sent while this one's rows are handed on (so that its answer is there)."""
    chunk = list(islice(rows, ANNOUNCE_CHUNK))
    ack = flight.announce_ahead([row.image_id for row in chunk if not row.error])
    while chunk:
        flight.wait(ack)
        following = list(islice(rows, ANNOUNCE_CHUNK))
        ack = flight.announce_ahead([row.image_id for row in following if not row.error])
        yield from chunk
        chunk = following


def _chunks(items: Iterator[tuple[ImageRow, DecodedImage]], size: int) -> Iterator[list[tuple[ImageRow, DecodedImage]]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _model_batch(batch: list[tuple[ImageRow, DecodedImage]]) -> dict[str, np.ndarray]:
    rows = {name: [getattr(row, name) for row, _ in batch] for name in ImageRow._fields}
    return decoded_batch(rows, [decoded for _, decoded in batch])


def _take(batch: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {name: column[i : i + 1] for name, column in batch.items()}


def _row(output: Segmented, i: int) -> Segmented:
    results = {0: output.results[i]} if i in output.results else {}
    return Segmented(results, output.errors[i : i + 1], output.retryable[i : i + 1])


def _concat_segmented(outputs: list[Segmented]) -> Segmented:
    """Single-row outputs, in order, as one."""
    from pipeline.segmenting.predict import Segmented

    results = {i: out.results[0] for i, out in enumerate(outputs) if 0 in out.results}
    return Segmented(results, [out.errors[0] for out in outputs], [out.retryable[0] for out in outputs])


def _error_predictions(batch: dict[str, np.ndarray], error: str) -> pa.Table:
    n = len(batch["image_id"])
    return prediction_table(batch, {}, errors=[error] * n, retryable=[False] * n)


def _failed(predictions: pa.Table, error: str) -> pa.Table:
    """`PREDICTION_SCHEMA` rows turned into error rows (no id map, no segments)."""
    n = predictions.num_rows
    replaced = {
        "error": pa.array([error] * n, pa.string()),
        "retryable": pa.array([False] * n, pa.bool_()),
        "id_map": pa.array([b""] * n, pa.large_binary()),
        "segments": pa.array([[]] * n, predictions.schema.field("segments").type),
    }
    for name, column in replaced.items():
        predictions = predictions.set_column(predictions.schema.get_field_index(name), name, column)
    return predictions


def _node_id() -> str:
    """The Ray node this actor runs on ("" outside Ray, as in unit tests)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
