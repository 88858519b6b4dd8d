"""How close a speed switch's panoptic output is to the fp32 reference, and the gate that judges it.

Agreement of a result with the reference result of the same image, in two numbers:

- **pixels in matching segments**: segments of the two results are matched one to one, only within the
  same category, greedily by the number of pixels they share (largest overlap first; ties by reference
  segment id, then other segment id). A pixel agrees when its segment in the result is the match of its
  segment in the reference (a pixel with no segment in both agrees too). Greedy matching recovers every
  pair with IoU > 0.5 (the pairs panoptic quality counts): such a pair shares more pixels than either
  segment shares with anything else. Unlike a per-pixel category comparison, a segment split in two, or
  two instances of one class swapping pixels, count as disagreement.
- **equal segment lists**: the results list the same categories in the same (query) order.

Over several images the pixel share is pooled over all pixels (`Agreement.pixels`), with the worst image
beside it (`pixels_min`), and the segment lists count per image (`same_segment_lists`).

The gate (`judge`): a switch passes when it is at least as close to fp32, by both numbers, as fp32 itself is
under ±0.5 grey level of seeded uniform input noise on the same images (`input_noise`: below the uint8
quantisation of the input, i.e. a change no one could call a different image), and, on a trained
checkpoint, when at least 99 % of pixels are in matching segments. Both numbers of the switch and of the
yardstick go into its message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

from model.panoptic import PanopticResult
from model.preprocess import IMAGENET_STD

YARDSTICK_GREY_LEVELS = 0.5  # amplitude of the uniform input noise the gate compares switches with
TRAINED_FLOOR = 0.99  # on a trained checkpoint a switch must also keep this share of pixels


class ImageAgreement(NamedTuple):
    matching_pixels: int  # pixels whose segment is matched between the two results
    pixels: int  # pixels of the image (at its original size)
    same_segments: bool  # same category list, in order

    @property
    def share(self) -> float:
        return self.matching_pixels / self.pixels


class Agreement(NamedTuple):
    pixels: float  # share of all pixels (pooled over images) in matching segments
    pixels_min: float  # the worst image's share
    same_segment_lists: float  # share of images with equal segment lists
    images: int

    def describe(self) -> str:
        return (
            f"{100 * self.pixels:.2f} % of pixels in matching segments (worst image {100 * self.pixels_min:.2f} %), "
            f"equal segment lists on {round(self.same_segment_lists * self.images)}/{self.images} images"
        )


def _segment_ids(result: PanopticResult) -> np.ndarray:
    """[H, W] int64 segment id per pixel, -1 where the result has no segment."""
    if not result.segments:
        return np.full(result.id_map.shape, -1, dtype=np.int64)
    return result.id_map.astype(np.int64)


def match_segments(reference: PanopticResult, other: PanopticResult) -> dict[int, int]:
    """Reference segment id -> matched segment id of ``other`` (same category, greedy by shared pixels)."""
    if reference.id_map.shape != other.id_map.shape:
        raise ValueError(f"results of different sizes: {reference.id_map.shape} vs {other.id_map.shape}")
    if not reference.segments or not other.segments:
        return {}
    a, b = _segment_ids(reference), _segment_ids(other)
    width = int(b.max()) + 1
    shared = np.bincount((a * width + b).ravel(), minlength=(int(a.max()) + 1) * width)  # [Sa·Sb] pixel counts
    category_b = {s.id: s.category_id for s in other.segments}
    pairs = [
        (-int(shared[s.id * width + t]), s.id, t)
        for s in reference.segments
        for t in range(width)
        if category_b.get(t) == s.category_id and shared[s.id * width + t] > 0
    ]
    matched: dict[int, int] = {}
    taken: set[int] = set()
    for _, s, t in sorted(pairs):
        if s not in matched and t not in taken:
            matched[s] = t
            taken.add(t)
    return matched


def image_agreement(reference: PanopticResult, other: PanopticResult) -> ImageAgreement:
    """Agreement of ``other`` with ``reference`` for one image (see the module docstring)."""
    matched = match_segments(reference, other)
    a, b = _segment_ids(reference), _segment_ids(other)
    lookup = np.full(int(a.max()) + 2, -2, dtype=np.int64)  # unmatched reference segment: agrees with nothing
    lookup[-1] = -1  # no segment in the reference: agrees with no segment
    for s, t in matched.items():
        lookup[s] = t
    matching = int((lookup[a] == b).sum())
    same = [s.category_id for s in reference.segments] == [s.category_id for s in other.segments]
    return ImageAgreement(matching, a.size, same)


def agreement(references: Sequence[PanopticResult], others: Sequence[PanopticResult]) -> Agreement:
    """Agreement over images (same order in both): pooled pixel share, worst image, equal segment lists."""
    if len(references) != len(others) or not references:
        raise ValueError(f"need the same, non-zero number of results, got {len(references)} and {len(others)}")
    per_image = [image_agreement(r, o) for r, o in zip(references, others)]
    return Agreement(
        pixels=sum(i.matching_pixels for i in per_image) / sum(i.pixels for i in per_image),
        pixels_min=min(i.share for i in per_image),
        same_segment_lists=sum(i.same_segments for i in per_image) / len(per_image),
        images=len(per_image),
    )


class Verdict(NamedTuple):
    passed: bool
    message: str


def judge(name: str, switch: Agreement, yardstick: Agreement, *, floor: float = 0.0) -> Verdict:
    """Passes when ``switch`` is at least as close to fp32 as the noise ``yardstick`` by both numbers, and its
    pixel share is at least ``floor`` (`TRAINED_FLOOR` on a trained checkpoint, 0 otherwise)."""
    passed = (
        switch.pixels >= yardstick.pixels
        and switch.same_segment_lists >= yardstick.same_segment_lists
        and switch.pixels >= floor
    )
    rule = f"needs both at least the yardstick's{f' and at least {100 * floor:.0f} % of pixels' if floor else ''}"
    message = (
        f"{name} vs fp32: {switch.describe()}; yardstick (fp32 with ±{YARDSTICK_GREY_LEVELS} grey level of "
        f"input noise) vs fp32: {yardstick.describe()}; {rule}: {'pass' if passed else 'FAIL'}"
    )
    return Verdict(passed, message)


@contextmanager
def input_noise(model: torch.nn.Module, *, grey_levels: float = YARDSTICK_GREY_LEVELS, seed: int = 0) -> Iterator[None]:
    """While active, every forward of ``model`` (a `DetrPanoptic`, called as ``model(images, padding_mask,
    ...)``) sees its normalised images plus seeded uniform noise of ±``grey_levels`` grey levels (of 255) per
    pixel and channel, outside the padding. The same seed and call sequence give the same noise."""
    generators: dict[torch.device, torch.Generator] = {}
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def add_noise(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        images, padding_mask = args[0], args[1]  # [B, 3, H, W] float, [B, H, W] bool
        if images.device not in generators:
            generators[images.device] = torch.Generator(images.device).manual_seed(seed)
        noise = torch.rand(images.shape, generator=generators[images.device], device=images.device)  # [B, 3, H, W]
        noise = (noise * 2 - 1) * (grey_levels / 255.0) / std.to(images.device)  # in normalised units
        noise = noise.masked_fill(padding_mask[:, None], 0.0)
        noisy = (images + noise.to(images.dtype)).contiguous(memory_format=_memory_format(images))
        return (noisy, padding_mask, *args[2:]), kwargs

    handle = model.register_forward_pre_hook(add_noise, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    is_channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if is_channels_last and not images.is_contiguous() else torch.contiguous_format
