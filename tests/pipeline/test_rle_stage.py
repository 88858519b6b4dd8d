"""RLE on CPU workers (``encode_rle=False`` + `encode_results`) gives exactly the rows of RLE in the actor."""

from __future__ import annotations

import numpy as np

from model.predictor import InferenceConfig
from pipeline.decode import decode_batch
from pipeline.predict import PanopticSegmenter, encode_results
from tests.pipeline.images import photo_bytes

INFERENCE = InferenceConfig(min_size=64, max_size=107)


def test_deferred_rle_rows_equal_the_actor_rows() -> None:
    named = [
        ("a.jpg", photo_bytes(72, 96, seed=1)),
        ("bad.jpg", b"not an image"),
        ("b.png", photo_bytes(64, 80, fmt="PNG", seed=2)),
    ]
    data = np.empty(len(named), dtype=object)
    data[:] = [payload for _, payload in named]
    rows = {
        "image_id": np.array([name for name, _ in named], dtype=object),
        "source": np.array([name for name, _ in named], dtype=object),
        "data": data,
        "error": np.array([""] * len(named), dtype=object),
    }
    decoded = decode_batch(rows, max_pixels=10**8, inference=INFERENCE)
    segmenter = PanopticSegmenter(variant="detr-r50-panoptic", weights="synthetic", inference=INFERENCE, device="cpu")
    in_actor = segmenter(decoded)
    segmenter.encode_rle = False  # the same model, as built with encode_rle=False
    deferred = segmenter(decoded)
    assert deferred["id_map"][0].dtype == np.uint8 and deferred["id_map"][0].shape == (72, 96)
    assert sum(len(r["segments"]) for r in in_actor.to_pylist()) > 0  # something to encode
    assert encode_results(deferred).equals(in_actor)
