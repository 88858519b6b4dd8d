"""Where a block call's time goes (`pipeline.segmenting.stage_clock`) and the run's verdict (`pipeline.bottleneck`).

In-process block calls (no Ray) on 24 small JPEGs with one stage made slow on purpose: the decoder (CPU time per
image), the model (a sleep per batch, as a GPU's work), the RLE (CPU time per image) or the commit (a sleep per
part). The verdict must name that stage, and the part rows' clock must partition the actor's time: the parts'
wall seconds add up to the calls' own wall time, the slow stage's busy seconds to what was injected.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from model.panoptic import PanopticResult, Segment
from model.predictor import InferenceConfig
from pipeline.bottleneck import StageTotals
from pipeline.config import InputConfig, ResourceConfig
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease
from pipeline.inputs.sources import REF_SCHEMA
from pipeline.segmenting.block_call import BlockSegmenter
from pipeline.segmenting.predict import Segmented
from pipeline.segmenting.prediction_tables import prediction_table
from pipeline.segmenting.stage_clock import KEYS
from tests.pipeline.images import photo_bytes

INFERENCE = InferenceConfig(min_size=32, max_size=64)
IMAGES, BATCH = 24, 4
SLOW_S = 0.03  # per image (decode, RLE) or per batch (the model), or per part (the commit)


class _Model:
    """The device's part as a stand-in: one segment covering each image, after ``seconds`` per batch."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def segment(self, batch: dict[str, np.ndarray]) -> Segmented:
        time.sleep(self.seconds)
        errors = [str(e) for e in batch["error"]]
        results = {}
        for i, (h, w) in enumerate(zip(batch["height"], batch["width"])):
            if not errors[i]:
                id_map = np.zeros((int(h), int(w)), np.uint8)
                results[i] = PanopticResult(id_map, [Segment(0, 1, True, 0.9, int(h) * int(w), (0, 0, int(w), int(h)))])
        return Segmented(results, errors, [bool(r) for r in batch["retryable"]])

    def table(self, batch: dict[str, np.ndarray], segmented: Segmented) -> pa.Table:
        return prediction_table(batch, segmented.results, errors=segmented.errors, retryable=segmented.retryable)


def _refs(folder: Path) -> pa.Table:
    folder.mkdir()
    uris = []
    for i in range(IMAGES):
        path = folder / f"img{i:02d}.jpg"
        path.write_bytes(photo_bytes(40, 48, seed=i))
        uris.append(str(path))
    n = len(uris)
    return pa.table({"uri": uris, "kind": ["file"] * n, "skip": [[]] * n, "size": [None] * n, "version": [None] * n},
                    schema=REF_SCHEMA)  # fmt: skip


def _run(tmp_path: Path, model: _Model, *, calls: int = 2) -> tuple[StageTotals, list[dict], float]:
    """Two block calls of 12 images each on one actor (parts of 4, batches of 4); the totals the driver keeps."""
    call = BlockSegmenter.with_model(
        model,  # type: ignore[arg-type]  # a stand-in with the segmenter's two methods
        inference=INFERENCE,
        input=InputConfig(uris=(str(tmp_path / "in"),), max_pixels=10**8, max_bytes=10**8),
        resources=ResourceConfig(rows_per_file=4, batch_size=BATCH),
        cpus=2,
        committer=OutputCommitter(str(tmp_path / "out"), "r1"),
        io_threads=4,
        node_id="node-a",
    )
    refs = _refs(tmp_path / "in")
    totals, rows = StageTotals(gpu=True), []
    per_call = IMAGES // calls
    started = time.perf_counter()
    with Lease.acquire(str(tmp_path / "out"), "r1"):
        for i in range(calls):
            rows += call(refs.slice(i * per_call, per_call)).to_pylist()
    elapsed = time.perf_counter() - started
    for row in rows:
        totals.add(row)
    return totals, rows, elapsed


def _slow_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.segmenting.block_call as shard

    decode = shard.decode_input

    def decode_input(data: bytes, **kwargs: object) -> object:
        _burn(SLOW_S)  # CPU work, as decoding is
        return decode(data, **kwargs)

    monkeypatch.setattr(shard, "decode_input", decode_input)


def _slow_rle(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.segmenting.block_call as shard

    encode = shard.encode_results

    def encode_results(predictions: pa.Table) -> pa.Table:
        _burn(SLOW_S * predictions.num_rows)  # CPU work, as RLE is (the clock counts an RLE thread's CPU time)
        return encode(predictions)

    monkeypatch.setattr(shard, "encode_results", encode_results)


def _slow_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    write = OutputCommitter.write_part

    def write_part(self: OutputCommitter, *args: object, **kwargs: object) -> object:
        time.sleep(8 * SLOW_S)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(OutputCommitter, "write_part", write_part)


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.mark.parametrize(
    ("slow", "model_s", "expected"),
    [
        ("decode", 0.0, "decode"),
        ("model", 4 * SLOW_S, "model"),
        ("rle", 0.0, "rle"),
        ("commit", 0.0, "commit"),
    ],
)
def test_the_verdict_names_the_stage_made_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: str, model_s: float, expected: str
) -> None:
    {"decode": _slow_decode, "rle": _slow_rle, "commit": _slow_commit}.get(slow, lambda _: None)(monkeypatch)
    totals, rows, elapsed = _run(tmp_path, _Model(model_s))
    assert sum(r["images_ok"] for r in rows) == IMAGES and len(rows) == IMAGES // 4
    assert totals.limit() == expected, (totals.seconds, totals.verdict())
    verdict = totals.verdict()
    assert verdict.startswith(f"bottleneck: {expected} (") and " — " in verdict
    if expected == "model":
        assert "busy" in verdict
    else:
        assert "the model waited" in verdict and "of the time for input" in verdict
    # the parts partition the actor's time, from the first call's start to the last part's commit: never more than
    # the calls took (a span counted twice), and most of it (the calls' tails after their last part aside)
    assert 0.5 * elapsed <= totals.seconds["wall"] <= elapsed + 0.01
    injected = {"decode": SLOW_S * IMAGES, "model": model_s * IMAGES / BATCH, "rle": SLOW_S * IMAGES}
    if slow in injected:  # busy time as injected
        assert injected[slow] <= totals.seconds[slow] <= injected[slow] * 1.5 + 0.2
    if slow == "decode":
        assert totals.shares()["model_idle"] > 0.5  # the model waited for its input most of the time
    for row in rows:
        assert set(row["stages"]) == set(KEYS) and row["committed_at"] > 0


def test_verdicts_and_shares_of_hand_made_totals() -> None:
    def totals(gpu: bool, **seconds: float) -> StageTotals:
        t = StageTotals(gpu=gpu)
        t.add({"stages": {**dict.fromkeys(KEYS, 0.0), **seconds}, "committed_at": None})
        return t

    busy = totals(True, wall=10.0, model=9.6, waited_decode=3.0)  # the model busy: it is the limit whatever waited
    assert busy.verdict() == (
        "bottleneck: model (busy 96 %) — the GPUs are the limit: add GPUs (--max-actors) or try --precision bf16 "
        "(README, speed switches)"
    )
    starved = totals(True, wall=10.0, model=6.2, model_idle=3.8, decode=11.0, rle=6.0, waited_decode=1.0,
                     waited_rle=3.0)  # fmt: skip
    assert starved.verdict() == (
        "bottleneck: decode (the model waited 38 % of the time for input) — add CPUs per actor (--cpus-per-actor) "
        "or decode JPEGs on the GPU (--device-preprocess)"
    )
    assert starved.shares()["model_idle"] == pytest.approx(0.38)  # a wait on RLE is a wait for the CPU pool: decode
    assert totals(True, wall=10.0, model=5.0, decode=2.0, rle=6.0, waited_decode=3.0).limit() == "rle"
    cpu = totals(False, wall=4.0, model=1.0, waited_model=2.0)  # the call waited on the model most
    assert cpu.limit() == "model" and "the CPU model is the limit" in cpu.verdict()
    waiting = totals(True, wall=4.0, model=1.0, model_idle=3.0, between_calls=2.5, waited_read=0.5)
    assert waiting.limit() == "work"
    assert StageTotals(gpu=True).verdict() == "" and StageTotals(gpu=True).limit() is None


def test_the_in_run_rate_leaves_the_first_part_out() -> None:
    t = StageTotals(gpu=False)
    for at, n in ((100.0, 64), (102.0, 64), (104.0, 64), (106.0, 32)):
        t.add({"committed_at": at, "images_ok": n - 2, "images_error": 2})
    assert t.steady_images_per_second() == pytest.approx((64 + 64 + 32) / 6.0)
    assert StageTotals(gpu=False).steady_images_per_second() is None
