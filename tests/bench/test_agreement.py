"""`bench.agreement`: the segment-agreement metric on hand-computed maps, the gate's rule and message, and the
seeded input noise of its yardstick."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.agreement import Agreement, agreement, image_agreement, input_noise, judge, match_segments
from model.categories import is_thing
from model.panoptic import PanopticResult, Segment
from model.preprocess import IMAGENET_STD


def _result(rows: list[str], categories: list[int]) -> PanopticResult:
    """A result from a picture: each character is a segment id ('.' only in a map without segments)."""
    id_map = np.array([[0 if c == "." else int(c) for c in row] for row in rows], dtype=np.uint8)
    segments = [
        Segment(i, c, is_thing(c), 0.9, int((id_map == i).sum()), (0, 0, 1, 1)) for i, c in enumerate(categories)
    ]
    return PanopticResult(id_map, segments)


PERSON, DOG, SKY = 1, 18, 187  # two things and a stuff class

HALVES = _result(["0011", "0011", "0011", "0011"], [PERSON, SKY])


def test_identical_results_agree_fully() -> None:
    assert image_agreement(HALVES, HALVES) == (16, 16, True)


def test_renumbered_segments_match_by_category_but_the_lists_differ() -> None:
    swapped = _result(["1100", "1100", "1100", "1100"], [PERSON, SKY][::-1])  # same regions, other order
    assert match_segments(HALVES, swapped) == {0: 1, 1: 0}
    assert image_agreement(HALVES, swapped) == (16, 16, False)


def test_two_instances_trading_pixels_count_as_disagreement() -> None:
    """A per-pixel category comparison reads 100 % here: both maps are 'person' everywhere."""
    reference = _result(["0000", "0000", "1111", "1111"], [PERSON, PERSON])
    other = _result(["0000", "0000", "0000", "1111"], [PERSON, PERSON])
    # shared pixels: (0, 0) = 8, (1, 0) = 4, (1, 1) = 4 -> 0-0 first, then 1-1: 8 + 4 of 16 pixels
    assert match_segments(reference, other) == {0: 0, 1: 1}
    assert image_agreement(reference, other) == (12, 16, True)


def test_a_split_segment_keeps_only_its_larger_part() -> None:
    whole = _result(["0000", "0000", "0000", "0000"], [DOG])
    split = _result(["0000", "0000", "0000", "1111"], [DOG, DOG])
    assert match_segments(whole, split) == {0: 0}
    assert image_agreement(whole, split) == (12, 16, False)


def test_segments_of_different_categories_never_match() -> None:
    other = _result(["0011", "0011", "0011", "0011"], [DOG, SKY])  # same shapes, the left one is a dog
    assert match_segments(HALVES, other) == {1: 1}
    assert image_agreement(HALVES, other) == (8, 16, False)


def test_greedy_matching_takes_the_largest_overlap_first() -> None:
    # reference: 0 = 6 px, 1 = 10 px (both dogs); other: one dog of 12 px covering all of 0 and half of 1
    reference = _result(["0001", "0001", "1111", "1111"], [DOG, DOG])
    other = _result(["0000", "0000", "0000", "1111"], [DOG, DOG])
    # shared: (0, 0) = 6, (1, 0) = 6, (1, 1) = 4; tie at 6 -> the lower reference id (0) wins, then 1-1
    assert match_segments(reference, other) == {0: 0, 1: 1}
    assert image_agreement(reference, other) == (10, 16, True)


def test_results_without_segments() -> None:
    empty = _result(["....", "...."], [])
    one = _result(["0000", "0000"], [DOG])
    assert image_agreement(empty, empty) == (8, 8, True)
    assert image_agreement(empty, one) == (0, 8, False)
    assert image_agreement(one, empty) == (0, 8, False)


def test_agreement_pools_pixels_over_images() -> None:
    small_ref = _result(["00", "11"], [PERSON, SKY])
    small_other = _result(["00", "00"], [DOG])  # nothing matches
    result = agreement([HALVES, small_ref], [HALVES, small_other])
    assert result == Agreement(pixels=16 / 20, pixels_min=0.0, same_segment_lists=0.5, images=2)


def test_agreement_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="different sizes"):
        image_agreement(HALVES, _result(["00", "00"], [PERSON]))
    with pytest.raises(ValueError, match="same, non-zero number"):
        agreement([HALVES], [])


def test_the_gate_needs_both_numbers_at_least_the_yardsticks() -> None:
    yardstick = Agreement(pixels=0.97, pixels_min=0.90, same_segment_lists=0.5, images=6)
    assert judge("bf16", Agreement(0.98, 0.95, 0.5, 6), yardstick).passed
    assert judge("bf16", Agreement(0.97, 0.80, 0.5, 6), yardstick).passed  # ties pass; the worst image is shown
    assert not judge("bf16", Agreement(0.96, 0.95, 1.0, 6), yardstick).passed
    assert not judge("bf16", Agreement(0.99, 0.95, 2 / 6, 6), yardstick).passed
    assert not judge("bf16", Agreement(0.98, 0.95, 0.5, 6), yardstick, floor=0.99).passed
    assert judge("bf16", Agreement(0.995, 0.95, 0.5, 6), yardstick, floor=0.99).passed


def test_the_gate_message_reports_both_numbers_of_both() -> None:
    verdict = judge("fp16", Agreement(0.9612, 0.7, 2 / 6, 6), Agreement(0.98, 0.93, 4 / 6, 6), floor=0.99)
    assert not verdict.passed
    for part in (
        "fp16 vs fp32",
        "96.12 %",
        "worst image 70.00 %",
        "2/6 images",
        "98.00 %",
        "4/6 images",
        "±0.5 grey level",
        "99 %",
        "FAIL",
    ):
        assert part in verdict.message


class _Echo(torch.nn.Module):
    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor, *, threshold: float) -> torch.Tensor:
        return images


def test_input_noise_is_bounded_seeded_off_the_padding_and_removed_afterwards() -> None:
    model = _Echo()
    images = torch.zeros(2, 3, 8, 8)
    padding = torch.zeros(2, 8, 8, dtype=torch.bool)
    padding[1, 5:, :] = True
    with input_noise(model, grey_levels=0.5, seed=3):
        first = model(images, padding, threshold=0.85)
        second = model(images, padding, threshold=0.85)
    with input_noise(model, grey_levels=0.5, seed=3):
        again = model(images, padding, threshold=0.85)
    in_grey_levels = first * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # back to grey levels
    assert in_grey_levels.abs().max() <= 0.5 + 1e-5
    assert in_grey_levels[~padding[:, None].expand_as(first)].abs().min() > 0  # noise everywhere else
    assert in_grey_levels.abs().mean() == pytest.approx(0.25, abs=0.05)  # uniform on [-0.5, 0.5]
    assert torch.equal(first[1, :, 5:], torch.zeros(3, 3, 8))
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert torch.equal(model(images, padding, threshold=0.85), images)  # hook gone
