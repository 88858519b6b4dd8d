"""Panoptic Quality (PQ = SQ × RQ, Kirillov et al. 2019), following panopticapi's ``pq_compute`` rules.

Pure numpy. One image at a time (:func:`image_stats`) gives per-category counts that add up
(:class:`ClassStats`), and :func:`pq_average` turns the totals into PQ / SQ / RQ. The rules are those of
``cocodataset/panopticapi/panopticapi/evaluation.py``:

- Id maps use the COCO panoptic convention: ``VOID`` (0) is no segment, in ground truth and predictions.
- A prediction matches a ground-truth segment only if both have the same category, the ground truth is not
  crowd, and IoU > 0.5 with ``union = pred_area + gt_area - intersection - |pred ∩ gt VOID|``.
  Ground-truth areas are taken from the annotation (``area``) as panopticapi does; predicted areas are
  counted in the id map.
- Unmatched non-crowd ground truth is a false negative. Crowd segments are collected per category
  (when a category has several crowd segments the last one listed is used, as in panopticapi).
- An unmatched prediction is ignored when ``(|pred ∩ VOID| + |pred ∩ crowd of its category|) / pred_area
  > 0.5``, else it is a false positive.
- Per class: ``PQ = Σ IoU / (TP + FP/2 + FN/2)``, ``SQ = Σ IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``;
  the averages run over the classes with ``TP + FP + FN > 0``.

Unit: fractions in [0, 1], exactly what panopticapi's ``pq_compute`` returns (its printed table is ×100).
One deliberate difference: with no class to average (``n == 0``) panopticapi divides by zero; here the
averages are 0.0 with ``n = 0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

VOID = 0
OFFSET = 256 * 256 * 256  # ids are < 2**24 (three 8-bit PNG channels)


class Segment(NamedTuple):
    """One entry of a COCO panoptic ``segments_info`` list."""

    id: int  # value of the segment's pixels in the id map (never VOID)
    category_id: int
    iscrowd: bool = False
    area: int | None = None  # ground truth: the annotation's area; None = count pixels


def segments_from_coco(segments_info: Iterable[Mapping[str, Any]]) -> list[Segment]:
    """COCO ``segments_info`` dicts (``id``, ``category_id``, optional ``iscrowd`` / ``area``) -> Segments."""
    return [
        Segment(
            id=int(s["id"]),
            category_id=int(s["category_id"]),
            iscrowd=bool(s.get("iscrowd", 0)),
            area=None if s.get("area") is None else int(s["area"]),
        )
        for s in segments_info
    ]


@dataclass
class ClassStats:
    """Counts of one category, summable over images: ``a += b``."""

    iou: float = 0.0  # sum of the IoUs of the matched pairs
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: ClassStats) -> ClassStats:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class Quality(NamedTuple):
    """PQ / SQ / RQ as fractions in [0, 1]; ``n`` = number of classes averaged (0 for a single class)."""

    pq: float
    sq: float
    rq: float
    n: int = 0


def add_stats(total: dict[int, ClassStats], other: Mapping[int, ClassStats]) -> dict[int, ClassStats]:
    """Add ``other`` into ``total`` category by category (in place) and return ``total``."""
    for category_id, stats in other.items():
        total.setdefault(category_id, ClassStats()).__iadd__(stats)
    return total


def image_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Segment],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Segment],
    *,
    categories: Iterable[int] | None = None,
) -> dict[int, ClassStats]:
    """Per-category TP / FP / FN / IoU-sum of one image.

    Args:
        gt_ids: ``[H, W]`` integer id map of the ground truth (``VOID`` = 0).
        gt_segments: the ground truth's segments; ``area`` None means "count the pixels".
        pred_ids: ``[H, W]`` integer id map of the prediction (``VOID`` = 0).
        pred_segments: the prediction's segments; ``iscrowd`` and ``area`` are ignored.
        categories: known category ids; a predicted segment of another category is an error.

    Raises:
        ValueError: the maps differ in size, or prediction map and list disagree (an id in one but not
            the other), or a predicted category is unknown: panopticapi's sanity checks.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth is {list(gt_ids.shape)} but prediction is {list(pred_ids.shape)}")
    gt_by_id = {s.id: s for s in gt_segments}
    pred_by_id = {s.id: s for s in pred_segments}
    known = None if categories is None else set(categories)

    # predicted areas, checked against the list
    pred_area: dict[int, int] = {}
    labels, counts = np.unique(pred_ids, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label == VOID:
            continue
        if label not in pred_by_id:
            raise ValueError(f"predicted segment id {label} is in the id map but not in the segment list")
        if known is not None and pred_by_id[label].category_id not in known:
            raise ValueError(f"predicted segment {label} has unknown category_id {pred_by_id[label].category_id}")
        pred_area[label] = count
    absent = sorted(set(pred_by_id) - set(pred_area))
    if absent:
        raise ValueError(f"predicted segment ids {absent} are in the segment list but cover no pixel")

    gt_area: dict[int, int] = {}
    gt_labels, gt_counts = np.unique(gt_ids, return_counts=True)
    gt_pixels = dict(zip(gt_labels.tolist(), gt_counts.tolist()))
    for s in gt_segments:
        gt_area[s.id] = s.area if s.area is not None else gt_pixels.get(s.id, 0)

    # intersections: |gt == g ∧ pred == p| for every pair present
    joint = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)  # [H, W]
    pair_labels, pair_counts = np.unique(joint, return_counts=True)
    intersection = {
        (int(lab // OFFSET), int(lab % OFFSET)): int(cnt)
        for lab, cnt in zip(pair_labels.tolist(), pair_counts.tolist())
    }

    stats: dict[int, ClassStats] = {}

    def cat(category_id: int) -> ClassStats:
        return stats.setdefault(category_id, ClassStats())

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (g, p), inter in intersection.items():
        if g not in gt_by_id or p not in pred_by_id:
            continue
        gt, pred = gt_by_id[g], pred_by_id[p]
        if gt.iscrowd or gt.category_id != pred.category_id:
            continue
        union = pred_area[p] + gt_area[g] - inter - intersection.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:
            cat(gt.category_id).tp += 1
            cat(gt.category_id).iou += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_category: dict[int, int] = {}
    for gt in gt_segments:
        if gt.id in gt_matched:
            continue
        if gt.iscrowd:
            crowd_by_category[gt.category_id] = gt.id  # the last crowd segment of a category wins
            continue
        cat(gt.category_id).fn += 1

    for pred in pred_segments:
        if pred.id in pred_matched:
            continue
        ignored = intersection.get((VOID, pred.id), 0)
        if pred.category_id in crowd_by_category:
            ignored += intersection.get((crowd_by_category[pred.category_id], pred.id), 0)
        if ignored / pred_area[pred.id] > 0.5:
            continue
        cat(pred.category_id).fp += 1
    return stats


def class_quality(stats: ClassStats) -> Quality:
    """PQ / SQ / RQ of one class (all 0.0 when it has no TP, FP or FN)."""
    denominator = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
    if denominator == 0:
        return Quality(0.0, 0.0, 0.0)
    sq = stats.iou / stats.tp if stats.tp else 0.0
    return Quality(stats.iou / denominator, sq, stats.tp / denominator)


def pq_average(
    stats: Mapping[int, ClassStats], categories: Mapping[int, bool], *, isthing: bool | None = None
) -> tuple[Quality, dict[int, Quality]]:
    """Average PQ / SQ / RQ over ``categories`` (id -> isthing), restricted to things / stuff if asked.

    Returns the average (over classes with TP + FP + FN > 0) and every selected class's own values.
    """
    per_class: dict[int, Quality] = {}
    pq = sq = rq = 0.0
    n = 0
    for category_id, category_isthing in categories.items():
        if isthing is not None and bool(category_isthing) != isthing:
            continue
        s = stats.get(category_id, ClassStats())
        per_class[category_id] = class_quality(s)
        if s.tp + s.fp + s.fn == 0:
            continue
        n += 1
        pq += per_class[category_id].pq
        sq += per_class[category_id].sq
        rq += per_class[category_id].rq
    if n == 0:
        return Quality(0.0, 0.0, 0.0, 0), per_class
    return Quality(pq / n, sq / n, rq / n, n), per_class
