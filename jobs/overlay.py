"""Drawing results: segments over their image, labels laid out on them, contact sheets (pure numpy + PIL).

:func:`render_overlay` fills each segment with its colour blended at ``alpha`` (the category's COCO colour;
things get a per-instance jitter seeded by (category, segment id) so neighbouring instances differ and colours
are stable between runs), then outlines it, unless the outline would be more than :data:`MAX_OUTLINE_SHARE` of
the segment's pixels (a segment smaller than ~7×7 pixels, a thin sliver, or scattered fragments: outlines would
hide them and, with many such segments, the photo), then labels it ``"<category> <score>"``. Labels
(:func:`layout_labels`) sit inside their own segment, as deep inside it as they fit, so they never cover another
segment and never overlap each other (segments are disjoint); a segment too small or thin for its label gets it,
in a second pass, over the segment's centre with most of the label on the segment, if that covers no other
label; otherwise the label is not drawn and :func:`draw_overlay` says so.

:func:`contact_sheet` puts several pictures on one sheet sized to them; :func:`mark_demo` adds the banner
:data:`DEMO_BANNER` above a picture of an output made with the demo weights. Used by ``panoptic-flow show``
(`jobs.show`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.categories import category_by_id

DEMO_BANNER = "demo weights: segments are meaningless"
MAX_OUTLINE_SHARE = 0.5  # segments that would be mostly outline are filled only
_JITTER = 48  # max per-channel offset of a thing instance's colour from its category colour
DEFAULT_ALPHA = 0.4  # fill opacity: the colours tell segments apart, the photo stays readable
_LABEL_PADDING = 2  # pixels between a label's text and the edge of its box
_LABEL_MARGIN = 2  # pixels kept free between two labels
_MIN_OVER = 0.6  # second pass: at least this fraction of a label's box lies on its segment
_SEARCH_SIDE = 1024  # labels are placed on a grid of at most about this many cells per side


@dataclass(frozen=True)
class OverlaySegment:
    """One segment to draw."""

    segment_id: int
    category_id: int
    category: str
    isthing: bool
    score: float
    bbox: tuple[int, int, int, int]  # [x, y, w, h] pixels
    mask: np.ndarray  # [H, W] bool

    @property
    def label(self) -> str:
        return f"{self.category} {self.score:.2f}"


def segment_color(category_id: int, segment_id: int, *, isthing: bool) -> tuple[int, int, int]:
    """RGB fill colour: the category's COCO colour, jittered per instance for things (deterministic)."""
    category = category_by_id(category_id)
    if category is not None:
        base = np.array(category.color, dtype=np.int64)
    else:  # unknown category: a stable colour of its own
        base = np.random.default_rng([category_id, 7]).integers(0, 256, size=3)
    if isthing:
        base = base + np.random.default_rng([category_id, segment_id]).integers(-_JITTER, _JITTER + 1, size=3)
    r, g, b = (int(v) for v in np.clip(base, 0, 255))
    return r, g, b


def blend(pixels: np.ndarray, color: Sequence[int], alpha: float) -> np.ndarray:
    """``round((1 - alpha) * pixels + alpha * color)`` as uint8; ``pixels`` is ``[..., 3]``."""
    mixed = (1.0 - alpha) * pixels.astype(np.float64) + alpha * np.asarray(color, dtype=np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)  # [H+2, W+2]
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]  # [H, W]
    return mask & ~interior


def _font(height: int, width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(10, min(height, width) // 40))


class Label(NamedTuple):
    """One drawn label: its text and its box ``(x0, y0, x1, y1)`` in pixels (``x1``, ``y1`` exclusive)."""

    segment_id: int
    text: str
    box: tuple[int, int, int, int]


class Overlay(NamedTuple):
    """A drawn result: ``pixels`` ``[H, W, 3]`` uint8, the labels drawn and the texts of those left out."""

    pixels: np.ndarray
    labels: list[Label]
    unplaced: list[str]


def render_overlay(
    image: np.ndarray,
    segments: Sequence[OverlaySegment],
    *,
    alpha: float = DEFAULT_ALPHA,
    outlines: bool = True,
    labels: bool = True,
) -> np.ndarray:
    """Draw ``segments`` over ``image`` (``[H, W, 3]`` uint8 RGB); returns a new ``[H, W, 3]`` uint8 array.

    Inside a segment's mask, without outlines or labels, the pixel is exactly
    ``blend(image, segment_color(...), alpha)``; pixels outside every mask are unchanged.
    """
    return draw_overlay(image, segments, alpha=alpha, outlines=outlines, labels=labels).pixels


def draw_overlay(
    image: np.ndarray,
    segments: Sequence[OverlaySegment],
    *,
    alpha: float = DEFAULT_ALPHA,
    outlines: bool = True,
    labels: bool = True,
) -> Overlay:
    """:func:`render_overlay`, also returning where the labels went and which did not fit."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = image.copy()  # [H, W, 3]
    colors = [segment_color(s.category_id, s.segment_id, isthing=s.isthing) for s in segments]
    for segment, color in zip(segments, colors):
        if segment.mask.shape != image.shape[:2]:
            raise ValueError(
                f"segment {segment.segment_id}: mask is {list(segment.mask.shape)} but image is "
                f"{list(image.shape[:2])} (h, w)"
            )
        out[segment.mask] = blend(image[segment.mask], color, alpha)  # [N, 3]
    if outlines:
        for segment, color in zip(segments, colors):
            outline = mask_outline(segment.mask)  # [H, W] bool
            if np.count_nonzero(outline) <= MAX_OUTLINE_SHARE * np.count_nonzero(segment.mask):
                out[outline] = tuple(int(c * 0.6) for c in color)
    if not labels or not segments:
        return Overlay(out, [], [])
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    font = _font(*image.shape[:2])
    texts = [s.label for s in segments]
    sizes = []
    for text in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 2 * _LABEL_PADDING, bottom - top + 2 * _LABEL_PADDING))
    boxes = layout_labels(segments, sizes)
    drawn, unplaced = [], []
    for segment, color, text, box in zip(segments, colors, texts, boxes):
        if box is None:
            unplaced.append(text)
            continue
        _draw_label(draw, text, box, color, font)
        drawn.append(Label(segment.segment_id, text, box))
    return Overlay(np.asarray(canvas).copy(), drawn, unplaced)


def _draw_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    box: tuple[int, int, int, int],
    color: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    x0, y0, x1, y1 = box
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    fill = "black" if luminance > 140 else "white"
    draw.text((x0 + _LABEL_PADDING - left, y0 + _LABEL_PADDING - top), text, fill=fill, font=font)


def layout_labels(
    segments: Sequence[OverlaySegment], sizes: Sequence[tuple[int, int]]
) -> list[tuple[int, int, int, int] | None]:
    """A box ``(x0, y0, x1, y1)`` for each segment's label of size ``(width, height)``, or None.

    First pass: a box entirely inside its segment, as deep inside as it goes (the most segment pixels in a
    box twice the label's size around it; ties: nearest the segment's centroid). Segments are disjoint, so
    such labels cover no other segment and no other label. Second pass, for the rest (by score): a box
    whose centre pixel and at least :data:`_MIN_OVER` of whose pixels lie on the segment. No box comes
    within :data:`_LABEL_MARGIN` pixels of another. Large images are searched on a grid of ``stride``-pixel
    cells, a cell counting as segment only when all its pixels are, and a box is a whole block of cells (a
    little larger than its text), so these guarantees hold at full resolution.
    """
    if not segments:
        return []
    height, width = segments[0].mask.shape
    stride = max(1, math.ceil(max(height, width) / _SEARCH_SIDE))
    occupied = np.zeros((-(-height // stride), -(-width // stride)), dtype=bool)  # [h', w'] cells
    boxes: list[tuple[int, int, int, int] | None] = [None] * len(segments)
    order = sorted(range(len(segments)), key=lambda i: -segments[i].score)
    for min_over in (1.0, _MIN_OVER):
        for i in order:
            if boxes[i] is not None:
                continue
            cells = (-(-sizes[i][1] // stride), -(-sizes[i][0] // stride))  # label (h, w) in whole cells
            found = _find_box(_pool(segments[i].mask, stride, every=True), occupied, cells, min_over=min_over)
            if found is None:
                continue
            cy, cx = found
            margin = -(-_LABEL_MARGIN // stride)
            occupied[max(cy - margin, 0) : cy + cells[0] + margin, max(cx - margin, 0) : cx + cells[1] + margin] = True
            x0, y0 = cx * stride, cy * stride  # the box is the whole block of cells
            boxes[i] = (x0, y0, min(x0 + cells[1] * stride, width), min(y0 + cells[0] * stride, height))
    return boxes


def _pool(mask: np.ndarray, stride: int, *, every: bool) -> np.ndarray:
    """``[H, W]`` bool -> ``[ceil(H/s), ceil(W/s)]``: a cell is True when every (or any) pixel of it is."""
    if stride == 1:
        return mask
    h, w = mask.shape
    padded = np.pad(mask, ((0, -h % stride), (0, -w % stride)))  # cells past the border: False
    cells = padded.reshape(padded.shape[0] // stride, stride, padded.shape[1] // stride, stride)
    return cells.all(axis=(1, 3)) if every else cells.any(axis=(1, 3))


def _box_sums(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[H, W]`` -> ``[H-height+1, W-width+1]``: the sum of every ``height`` x ``width`` box (by top-left corner)."""
    integral = np.pad(values.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # [H+1, W+1]
    return (
        integral[height:, width:]
        - integral[:-height, width:]
        - integral[height:, :-width]
        + integral[:-height, :-width]
    )


def _find_box(
    mask: np.ndarray, occupied: np.ndarray, size: tuple[int, int], *, min_over: float
) -> tuple[int, int] | None:
    """Top-left ``(y, x)`` of the best free ``size`` = (h, w) box over ``mask`` (see :func:`layout_labels`)."""
    th, tw = size
    ys, xs = np.nonzero(mask)
    if ys.size == 0 or th > mask.shape[0] or tw > mask.shape[1]:
        return None
    grow = 0 if min_over >= 1.0 else max(th, tw)  # the box may stick out of the segment's bounding box
    y0, y1 = max(int(ys.min()) - grow, 0), min(int(ys.max()) + 1 + grow, mask.shape[0])
    x0, x1 = max(int(xs.min()) - grow, 0), min(int(xs.max()) + 1 + grow, mask.shape[1])
    if y1 - y0 < th or x1 - x0 < tw:
        return None
    window = mask[y0:y1, x0:x1]  # [h, w]
    over = _box_sums(window, th, tw)  # [h-th+1, w-tw+1] segment pixels under each box
    ok = (over >= math.ceil(min_over * th * tw)) & (_box_sums(occupied[y0:y1, x0:x1], th, tw) == 0)
    ok &= window[th // 2 : th // 2 + ok.shape[0], tw // 2 : tw // 2 + ok.shape[1]]  # centre on the segment
    if not ok.any():
        return None
    depth = _box_sums(np.pad(window, ((th // 2, th // 2), (tw // 2, tw // 2))), th + th // 2 * 2, tw + tw // 2 * 2)
    score = np.where(ok, depth, -1)  # [h-th+1, w-tw+1]
    by, bx = np.nonzero(score == score.max())
    centroid_y, centroid_x = ys.mean() - y0 - th / 2, xs.mean() - x0 - tw / 2
    k = int(np.argmin((by - centroid_y) ** 2 + (bx - centroid_x) ** 2))
    return y0 + int(by[k]), x0 + int(bx[k])


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], *, tile: int = 256) -> np.ndarray:
    """Images scaled to ``tile`` pixels high (never enlarged, at most 4 tiles wide) side by side, with a caption
    strip under each: ``[H, W, 3]`` uint8.

    Up to 3 images sit in one row, more in ⌈√N⌉ columns. The sheet is sized to its images: a row is as high
    as its tallest picture (plus the caption strip), the sheet as wide as its widest row.
    """
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    columns = len(images) if len(images) <= 3 else math.ceil(math.sqrt(len(images)))
    font = ImageFont.load_default(size=12)
    strip = 18
    thumbs = []
    for array in images:
        thumb = Image.fromarray(array)
        thumb.thumbnail((4 * tile, tile))
        thumbs.append(thumb)
    rows = [thumbs[i : i + columns] for i in range(0, len(thumbs), columns)]
    heights = [max(t.height for t in row) for row in rows]
    width = max(sum(t.width for t in row) for row in rows)
    sheet = Image.new("RGB", (width, sum(heights) + strip * len(rows)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    y0 = 0
    for r, row in enumerate(rows):
        x0 = 0
        for c, thumb in enumerate(row):
            sheet.paste(thumb, (x0, y0 + heights[r] - thumb.height))  # bottom-aligned: no gap above the caption
            caption = captions[r * columns + c]
            draw.text(
                (x0 + 4, y0 + heights[r] + 2), caption[-max(thumb.width // 7, 8) :], fill=(230, 230, 230), font=font
            )
            x0 += thumb.width
        y0 += heights[r] + strip
    return np.asarray(sheet).copy()


def mark_demo(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (``[H, W, 3]`` uint8) under a red strip that reads :data:`DEMO_BANNER`: ``[H + h, W, 3]``
    (the strip is added above the picture, hiding none of it)."""
    font = ImageFont.load_default(size=max(12, min(pixels.shape[1] // 30, 28)))
    left, top, _, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), DEMO_BANNER, font=font)
    strip = bottom - top + 2 * _LABEL_PADDING + 2
    canvas = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + strip), (170, 0, 0))
    canvas.paste(Image.fromarray(pixels), (0, strip))
    ImageDraw.Draw(canvas).text(
        (_LABEL_PADDING - left + 2, _LABEL_PADDING - top + 1), DEMO_BANNER, fill="white", font=font
    )
    return np.asarray(canvas).copy()
