"""The shard call: one model actor reads, decodes, segments, encodes and commits a whole shard of images.

`ShardSegmenter` is the callable class `pipeline.run` maps over the job's shards with an actor pool (GPU or
CPU). A *shard* is one block of refs (`pipeline.sources.REF_SCHEMA`): up to ``--rows-per-file`` listed files,
or tar / Parquet shards. Ray Data schedules one task per shard, so its per-block cost on the driver is paid per
shard, never per model batch, and only refs (~100 B each) and part rows cross the object store: bytes and
decoded pixels never leave the actor's process.

Inside one call the stages are pipelined on the actor's thread pool (`pipeline.pipelining.ordered_map`):

    refs --read bytes--> image rows --decode + resize--> decoded images --(batches)--> model (this thread)
         --RLE--> result rows --gathered into parts of --rows-per-file--> commit (`pipeline.commit`)

so the next batch is decoded, and the previous one RLE-encoded and committed, while the model runs the current
one. Reads and commits run on an I/O pool (`IO_THREADS`), decoding and RLE on a pool of ``threads`` (the CPUs
the actor reserves). Memory per actor is bounded by the depths below: `READ_AHEAD_FILES` files (or
`READ_AHEAD_SHARDS` whole tar / Parquet shards) read ahead, ``2 × batch_size`` decoded images (≈ 2.5 MB each
at 800×1066), `RLE_IN_FLIGHT` batches awaiting RLE, one part being gathered and `COMMITS_IN_FLIGHT` parts being
written: about 64 × the input size + 2.5 MB × (3 × batch_size) + 2 parts' results, e.g. ~150 MB at batch 8 with
150 KB JPEGs and 2048-image parts of ~18 KB of results per image (plus the model).

A call returns one `pipeline.schema.PART_ROW_SCHEMA` row per committed part. Ray's retry of a call whose actor
died redoes the same shard and overwrites the same part names (part names hash their image ids), so each
image is committed once. Reading, decoding and the model's errors are per image (error rows), as before.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Literal

import pyarrow as pa

from model.predictor import InferenceConfig
from pipeline.commit import OutputCommitter
from pipeline.decode import UNREAD, decode_input, decoded_batch
from pipeline.parts import PartGatherer
from pipeline.pipelining import ordered_map
from pipeline.predict import PanopticSegmenter
from pipeline.readers import ImageRow, read_ref, ref_rows
from pipeline.results import encode_results
from pipeline.schema import PART_ROW_SCHEMA, DecodedImage

log = logging.getLogger(__name__)

READ_AHEAD_FILES = 64  # file refs read ahead of the decoder (object-store latency hidden by concurrency)
READ_AHEAD_SHARDS = 2  # tar / Parquet refs read ahead (each one whole shard in memory)
RLE_IN_FLIGHT = 2  # model batches awaiting RLE
COMMITS_IN_FLIGHT = 2  # parts being written
IO_THREADS = 16  # reads and commits wait on storage, not on a CPU


class ShardSegmenter:
    """Ray Data callable class: one shard of refs in, one `PART_ROW_SCHEMA` row per committed part out."""

    def __init__(
        self,
        *,
        variant: str,
        weights: str,
        inference: InferenceConfig,
        device: Literal["auto", "cpu", "cuda"],
        committer: OutputCommitter,
        rows_per_file: int,
        batch_size: int,
        max_pixels: int,
        max_bytes: int,
        read_timeout_s: float,
        bytes_column: str,
        id_column: str | None,
        threads: int,
    ) -> None:
        self.segmenter = PanopticSegmenter(
            variant=variant, weights=weights, inference=inference, device=device, encode_rle=False
        )
        self.inference = inference
        self.committer = committer
        self.rows_per_file, self.batch_size, self.max_pixels = rows_per_file, batch_size, max_pixels
        self.max_bytes, self.read_timeout_s = max_bytes, read_timeout_s
        self.bytes_column, self.id_column = bytes_column, id_column
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="shard-cpu")
        self.io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="shard-io")
        self.node_id = _node_id()

    def __call__(self, refs: pa.Table) -> pa.Table:
        gatherer = PartGatherer(self.rows_per_file)
        commits: deque[Future[dict[str, object] | None]] = deque()
        rows: list[dict[str, object]] = []

        def commit(part: pa.Table) -> None:
            commits.append(self.io_pool.submit(self.committer.write_part, part, node_id=self.node_id))
            while len(commits) > COMMITS_IN_FLIGHT:
                _collect(commits.popleft(), rows)

        for results in ordered_map(encode_results, self._predictions(refs), pool=self.pool, depth=RLE_IN_FLIGHT):
            for part in gatherer.add(results):
                commit(part)
        rest = gatherer.rest()
        if rest is not None:
            commit(rest)
        while commits:
            _collect(commits.popleft(), rows)
        return pa.Table.from_pylist(rows, schema=PART_ROW_SCHEMA)

    def _predictions(self, refs: pa.Table) -> Iterator[pa.Table]:
        """`pipeline.schema.PREDICTION_SCHEMA` tables of one model batch each; the model runs on this thread."""
        images = self._decoded(refs)
        while batch := list(islice(images, self.batch_size)):
            rows = {name: [getattr(row, name) for row, _ in batch] for name in ImageRow._fields}
            yield self.segmenter(decoded_batch(rows, [decoded for _, decoded in batch]))

    def _decoded(self, refs: pa.Table) -> Iterator[tuple[ImageRow, DecodedImage]]:
        """Each image row of the shard with its `DecodedImage`, read and decoded ahead on the pool."""

        def read(ref: tuple[str, str, list[str]]) -> list[ImageRow]:
            uri, kind, skip = ref
            return read_ref(
                uri,
                kind,
                skip,
                bytes_column=self.bytes_column,
                id_column=self.id_column,
                max_bytes=self.max_bytes,
                read_timeout_s=self.read_timeout_s,
            )

        def decode(row: ImageRow) -> tuple[ImageRow, DecodedImage]:
            if row.error:
                return row, UNREAD
            decoded = decode_input(row.data, max_pixels=self.max_pixels, inference=self.inference)
            return row._replace(data=b""), decoded  # the bytes are not needed past here

        files_only = all(kind == "file" for kind in refs.column("kind").to_pylist())
        depth = READ_AHEAD_FILES if files_only else READ_AHEAD_SHARDS
        read_ahead = ordered_map(read, ref_rows(refs), pool=self.io_pool, depth=depth)
        rows = (row for image_rows in read_ahead for row in image_rows)
        return ordered_map(decode, rows, pool=self.pool, depth=2 * self.batch_size)


def _collect(future: Future[dict[str, object] | None], rows: list[dict[str, object]]) -> None:
    row = future.result()
    if row is not None:
        rows.append(row)


def _node_id() -> str:
    """The Ray node this actor runs on ("" outside Ray, as in unit tests)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
