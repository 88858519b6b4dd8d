"""PQ / SQ / RQ on hand-computed cases, following panopticapi's ``pq_compute`` definition.

Units: fractions (panopticapi's returned values); a perfect prediction is 1.0 (printed as 100).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.reading.panoptic_quality import (
    VOID,
    ClassStats,
    Segment,
    add_stats,
    class_quality,
    image_stats,
    pq_average,
    segments_from_coco,
)

PERSON, DOG, TREE, SKY = 1, 18, 184, 187  # things: PERSON, DOG; stuff: TREE, SKY
CATEGORIES = {PERSON: True, DOG: True, TREE: False, SKY: False}


def square(ids: np.ndarray, value: int, y0: int, x0: int, size: int = 10) -> np.ndarray:
    ids[y0 : y0 + size, x0 : x0 + size] = value
    return ids


def test_perfect_prediction_is_one_everywhere() -> None:
    gt = square(np.full((20, 20), 1, np.uint32), 2, 5, 5)  # sky background (id 1), a person (id 2)
    pred = square(np.full((20, 20), 7, np.uint32), 9, 5, 5)  # same pixels, other ids
    stats = image_stats(gt, [Segment(1, SKY), Segment(2, PERSON)], pred, [Segment(7, SKY), Segment(9, PERSON)])
    assert stats[SKY] == ClassStats(iou=1.0, tp=1, fp=0, fn=0)
    assert stats[PERSON] == ClassStats(iou=1.0, tp=1, fp=0, fn=0)
    overall, per_class = pq_average(stats, CATEGORIES)
    assert overall == (1.0, 1.0, 1.0, 2)  # panopticapi prints 100.0
    assert per_class[DOG] == (0.0, 0.0, 0.0, 0)  # no TP/FP/FN: reported 0, not averaged


def test_three_pixel_shift_of_a_square() -> None:
    # 20x20, sky everywhere except a 10x10 person; the prediction's person is 3 px to the right.
    gt = square(np.full((20, 20), 1, np.uint32), 2, 0, 0)
    pred = square(np.full((20, 20), 1, np.uint32), 2, 0, 3)
    stats = image_stats(gt, [Segment(1, SKY), Segment(2, PERSON)], pred, [Segment(1, SKY), Segment(2, PERSON)])
    # person: intersection 10*7 = 70, union 100 + 100 - 70 = 130
    assert stats[PERSON].tp == 1
    assert stats[PERSON].iou == pytest.approx(70 / 130)
    # sky: areas 300 and 300, intersection = 400 - |union of the squares| = 400 - 130 = 270
    assert stats[SKY].iou == pytest.approx(270 / 330)
    overall, per_class = pq_average(stats, CATEGORIES)
    assert per_class[PERSON] == pytest.approx((70 / 130, 70 / 130, 1.0, 0))
    assert overall.pq == pytest.approx((70 / 130 + 270 / 330) / 2)
    assert overall.rq == 1.0


def test_a_six_pixel_shift_is_a_false_positive_and_a_false_negative() -> None:
    gt = square(np.full((20, 20), 1, np.uint32), 2, 0, 0)
    pred = square(np.full((20, 20), 1, np.uint32), 2, 0, 6)  # IoU 40 / 160 = 0.25
    stats = image_stats(gt, [Segment(1, SKY), Segment(2, PERSON)], pred, [Segment(1, SKY), Segment(2, PERSON)])
    assert stats[PERSON] == ClassStats(iou=0.0, tp=0, fp=1, fn=1)
    assert class_quality(stats[PERSON]) == (0.0, 0.0, 0.0, 0)


def test_void_is_excluded_from_the_union() -> None:
    # ground truth: a 10x10 person, the rest VOID; prediction shifted 3 px: 30 of its pixels lie on VOID
    gt = square(np.full((20, 20), VOID, np.uint32), 2, 0, 0)
    pred = square(np.full((20, 20), VOID, np.uint32), 5, 0, 3)
    stats = image_stats(gt, [Segment(2, PERSON)], pred, [Segment(5, PERSON)])
    # union = 100 + 100 - 70 - |pred ∩ VOID| (30) = 100, so IoU = 0.7 (not 70/130)
    assert stats[PERSON].iou == pytest.approx(0.7)
    assert stats[PERSON].tp == 1


def test_a_prediction_mostly_on_void_is_ignored() -> None:
    gt = np.full((10, 10), VOID, np.uint32)
    gt[:, :4] = 1  # tree on the left 40 px, VOID elsewhere
    pred = np.full((10, 10), 3, np.uint32)  # one dog over everything: 60 % on VOID
    stats = image_stats(gt, [Segment(1, TREE)], pred, [Segment(3, DOG)])
    assert DOG not in stats  # ignored: neither TP nor FP
    assert stats[TREE] == ClassStats(fn=1)


def test_crowd_region_makes_a_prediction_not_a_false_positive() -> None:
    gt = np.full((10, 20), 1, np.uint32)  # sky
    gt[:, 10:] = 2  # a person crowd on the right half (100 px)
    gt_segments = [Segment(1, SKY), Segment(2, PERSON, iscrowd=True)]
    pred = np.full((10, 20), 1, np.uint32)
    pred[:, 10:] = 0
    pred[:, 12:] = 4  # a person of 80 px, all inside the crowd
    pred[:, 10:12] = 1  # sky also covers the two crowd columns: pred sky = 120 px
    stats = image_stats(gt, gt_segments, pred, [Segment(1, SKY), Segment(4, PERSON)])
    assert PERSON not in stats  # not matched (crowd is never matched), not FP (80/80 on crowd), no FN
    # sky: intersection 100, union 120 + 100 - 100 = 120
    assert stats[SKY].iou == pytest.approx(100 / 120)

    # the same pixels as a dog: a crowd of another category does not excuse it -> FP
    stats = image_stats(gt, gt_segments, pred, [Segment(1, SKY), Segment(4, DOG)])
    assert stats[DOG] == ClassStats(fp=1)


def test_exactly_half_on_crowd_is_still_a_false_positive() -> None:
    gt = np.full((10, 20), 1, np.uint32)
    gt[:, 10:] = 2  # person crowd, right half
    pred = np.full((10, 20), 1, np.uint32)
    pred[:, 5:15] = 4  # 100 px person: 50 on sky, 50 on the crowd -> 0.5 is not > 0.5
    stats = image_stats(
        gt, [Segment(1, SKY), Segment(2, PERSON, iscrowd=True)], pred, [Segment(1, SKY), Segment(4, PERSON)]
    )
    assert stats[PERSON] == ClassStats(fp=1)


def test_a_class_only_in_ground_truth_and_a_class_only_in_predictions() -> None:
    gt = square(np.full((20, 20), 1, np.uint32), 2, 0, 0)  # sky + a person
    pred = square(np.full((20, 20), 1, np.uint32), 8, 10, 10)  # sky + a dog elsewhere
    stats = image_stats(gt, [Segment(1, SKY), Segment(2, PERSON)], pred, [Segment(1, SKY), Segment(8, DOG)])
    assert stats[PERSON] == ClassStats(fn=1)
    assert stats[DOG] == ClassStats(fp=1)
    # sky: 300 and 300 px, intersection 400 - 200 = 200, IoU = 200 / 400
    assert stats[SKY] == ClassStats(iou=0.0, tp=0, fp=1, fn=1)  # IoU exactly 0.5 is not > 0.5
    overall, per_class = pq_average(stats, CATEGORIES)
    assert per_class[PERSON].pq == 0.0 and per_class[DOG].pq == 0.0
    assert overall == (0.0, 0.0, 0.0, 3)  # person, dog and sky are all counted


def test_things_and_stuff_are_averaged_separately() -> None:
    stats = {
        PERSON: ClassStats(iou=1.6, tp=2, fp=0, fn=0),  # PQ 0.8, SQ 0.8, RQ 1
        DOG: ClassStats(iou=0.6, tp=1, fp=1, fn=0),  # PQ 0.6/1.5 = 0.4, SQ 0.6, RQ 2/3
        SKY: ClassStats(iou=0.9, tp=1, fp=0, fn=1),  # PQ 0.6, SQ 0.9, RQ 2/3
    }
    things, _ = pq_average(stats, CATEGORIES, isthing=True)
    stuff, per_stuff = pq_average(stats, CATEGORIES, isthing=False)
    everything, _ = pq_average(stats, CATEGORIES)
    assert things == pytest.approx((0.6, 0.7, 5 / 6, 2))
    assert stuff == pytest.approx((0.6, 0.9, 2 / 3, 1))
    assert set(per_stuff) == {TREE, SKY}
    assert everything == pytest.approx(((0.8 + 0.4 + 0.6) / 3, (0.8 + 0.6 + 0.9) / 3, (1 + 2 / 3 + 2 / 3) / 3, 3))
    assert pq_average({}, CATEGORIES) == ((0.0, 0.0, 0.0, 0), dict.fromkeys(CATEGORIES, (0.0, 0.0, 0.0, 0)))


def test_ground_truth_area_comes_from_the_annotation() -> None:
    gt = square(np.zeros((20, 20), np.uint32), 2, 0, 0)
    pred = square(np.zeros((20, 20), np.uint32), 5, 0, 0)
    (gt_segment,) = segments_from_coco([{"id": 2, "category_id": PERSON, "iscrowd": 0, "area": 130}])
    stats = image_stats(gt, [gt_segment], pred, [Segment(5, PERSON)])
    assert stats[PERSON].iou == pytest.approx(100 / 130)  # union = 100 + 130 - 100 - 0


def test_stats_add_up_over_images() -> None:
    total = add_stats({}, {PERSON: ClassStats(0.7, 1, 0, 0)})
    add_stats(total, {PERSON: ClassStats(0.9, 1, 1, 0), SKY: ClassStats(fn=1)})
    assert total == {PERSON: ClassStats(1.6, 2, 1, 0), SKY: ClassStats(0.0, 0, 0, 1)}


def test_prediction_sanity_checks() -> None:
    gt = np.ones((4, 4), np.uint32)
    pred = np.ones((4, 4), np.uint32)
    with pytest.raises(ValueError, match="not in the segment list"):
        image_stats(gt, [Segment(1, SKY)], pred, [])
    with pytest.raises(ValueError, match="cover no pixel"):
        image_stats(gt, [Segment(1, SKY)], pred, [Segment(1, SKY), Segment(2, DOG)])
    with pytest.raises(ValueError, match="unknown category_id 999"):
        image_stats(gt, [Segment(1, SKY)], pred, [Segment(1, 999)], categories=CATEGORIES)
    with pytest.raises(ValueError, match="ground truth is"):
        image_stats(gt, [Segment(1, SKY)], np.ones((4, 5), np.uint32), [Segment(1, SKY)])
