"""From merged results to RLE rows at the original size: the maps `merge_panoptic` makes at the processed size
give, through `prediction_table` (each map copied once into the column) and `encode_results` (zero-copy slices),
exactly the rows of the full-size merge it replaced (the oracle in tests/model/panoptic_oracle.py), and each
segment's RLE, area and box are pycocotools' for its mask of the full-size map."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask

from model.panoptic import PanopticResult, merge_panoptic
from pipeline.segmenting.prediction_tables import encode_results, prediction_table
from tests.model.panoptic_oracle import merge_panoptic_full_size
from tests.pipeline.images import input_columns

Case = tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]


def _cases() -> list[Case]:
    """(labels, mask logits, processed size, original size): photo-like, a map beyond 256 segments (int32), one
    shrunk, and one with no kept query."""
    rng = np.random.default_rng(3)
    coarse = torch.from_numpy(rng.normal(0, 3, (1, 12, 5, 7)).astype(np.float32))
    photo = F.interpolate(coarse, size=(15, 20), mode="bilinear")[0]  # [12, 15, 20]
    many = torch.zeros(300, 60, 100)
    for q in range(300):
        r, c = divmod(q, 20)
        many[q, 4 * r : 4 * r + 4, 5 * c : 5 * c + 5] = 9.0
    photo_labels = torch.from_numpy(rng.choice([1, 3, 100, 100, 150], size=12)).long()
    return [
        (photo_labels, photo, (60, 80), (451, 603)),
        (torch.ones(300, dtype=torch.long), many, (60, 100), (121, 199)),
        (photo_labels, photo, (60, 80), (37, 41)),
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, 15, 20), (60, 80), (90, 120)),
    ]


def _table(merge: Callable[..., PanopticResult], cases: list[Case]) -> pa.Table:
    results: dict[int, PanopticResult] = {}
    for i, (labels, logits, size, original) in enumerate(cases):
        scores = torch.linspace(0.86, 0.99, len(labels))
        results[i] = merge(scores, labels, logits, processed_size=size, original_size=original)
    n = len(cases) + 1  # and an error row
    batch = {
        **input_columns([f"img{i}.jpg" for i in range(n)]),
        "height": np.array([c[3][0] for c in cases] + [0]),
        "width": np.array([c[3][1] for c in cases] + [0]),
    }
    errors = [""] * len(cases) + ["corrupt"]
    return encode_results(prediction_table(batch, results, errors=errors, retryable=[False] * n))


def test_rle_rows_equal_those_of_the_full_size_merge() -> None:
    cases = _cases()
    new = _table(merge_panoptic, cases)
    assert new.equals(_table(merge_panoptic_full_size, cases))
    counts = [len(segments) for segments in new.column("segments").to_pylist()]
    assert counts[0] > 2 and counts[1] == 300 and counts[3:] == [0, 0]  # 300: an int32 map through bytes and back
    assert new.column("status").to_pylist()[-1] == "error"

    for i, (labels, logits, size, original) in enumerate(cases):
        scores = torch.linspace(0.86, 0.99, len(labels))
        id_map = merge_panoptic_full_size(scores, labels, logits, processed_size=size, original_size=original).id_map
        for segment in new.column("segments")[i].as_py():
            reference = coco_mask.encode(np.asfortranarray((id_map == segment["segment_id"]).astype(np.uint8)))
            assert segment["rle"]["counts"] == reference["counts"].decode("ascii")
            assert segment["rle"]["size"] == list(original)
            assert segment["area"] == int(coco_mask.area(reference))
            assert segment["bbox"] == coco_mask.toBbox(reference).astype(int).tolist()
