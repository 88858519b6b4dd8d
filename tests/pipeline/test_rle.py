"""One-pass COCO RLE: byte-identical to pycocotools per segment, with its area and bbox, and decodable; an
image's id map rebuilt from its segment rows."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from pipeline.segmenting.rle import VOID_ID, EncodedSegment, decode_mask, decode_rle, encode_segments, panoptic_map
from tests.synthetic_output import encode_rle, rect

SHAPES = [(1, 1), (1, 2), (2, 1), (1, 37), (37, 1), (3, 3), (5, 8), (8, 5), (17, 23), (64, 48), (8, 10000)]


def _assert_matches_pycocotools(id_map: np.ndarray, segment_ids: list[int]) -> list[EncodedSegment]:
    encoded = encode_segments(id_map, segment_ids)
    assert len(encoded) == len(segment_ids)
    height, width = id_map.shape
    for s, e in zip(segment_ids, encoded):
        mask = id_map == s  # [H, W] bool
        reference = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        context = f"segment {s} of a {height}x{width} map"
        assert e.size == (height, width), context
        assert e.counts == reference["counts"].decode("ascii"), context
        assert e.area == int(coco_mask.area(reference)) == int(mask.sum()), context
        assert list(e.bbox) == coco_mask.toBbox(reference).tolist(), context
        assert all(isinstance(v, int) for v in (e.area, *e.bbox)), context
        decoded = decode_rle(e.size, e.counts)
        assert decoded.dtype == np.bool_ and decoded.shape == (height, width), context
        assert np.array_equal(decoded, mask), context
    return encoded


def _blobs(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """[H, W] int32 Voronoi cells of random points, labelled with scattered ids (some negative, some 0)."""
    points = rng.uniform((0, 0), (height, width), size=(cells, 2))  # [P, 2]
    ys, xs = np.mgrid[0:height, 0:width]
    distance = (ys[..., None] - points[:, 0]) ** 2 + (xs[..., None] - points[:, 1]) ** 2  # [H, W, P]
    labels = rng.choice(np.arange(-5, 1000), size=cells, replace=False).astype(np.int32)  # [P]
    return labels[distance.argmin(-1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_random_blobs_match_pycocotools(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        id_map = _blobs(rng, *shape, cells=int(rng.integers(1, 9)))
        present = np.unique(id_map).tolist()
        wanted = [s for s in present if s > 0] + [1001]  # 1001: never present
        rng.shuffle(wanted)
        _assert_matches_pycocotools(id_map, wanted)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_noise_matches_pycocotools(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1000 + sum(shape))
    for high in (2, 5):
        id_map = rng.integers(-2, high, size=shape).astype(np.int32)
        _assert_matches_pycocotools(id_map, [4, -1, 0, 1, 3, 2, 7])


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (6, 7), (8, 10000)])
def test_stripes_match_pycocotools(shape: tuple[int, int]) -> None:
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width]
    for id_map in (ys % 3, xs % 4, (ys + xs) % 5, (xs // 3) % 2, (ys * width + xs) % 7):
        _assert_matches_pycocotools(id_map.astype(np.int32), [0, 1, 2, 3, 4, 5, 6])


def test_full_and_empty_segments() -> None:
    id_map = np.full((4, 6), 9, dtype=np.int32)
    full, empty = _assert_matches_pycocotools(id_map, [9, 3])
    assert full.area == 24 and full.bbox == (0, 0, 6, 4)
    assert full.counts == "0h0"  # a 0-run of length 0, then 24 ones (24 takes two 5-bit groups)
    assert empty.area == 0 and empty.bbox == (0, 0, 0, 0)
    assert empty.counts == "h0"  # one run of 24 zeros


def test_single_pixel_at_each_corner_and_long_counts() -> None:
    for y, x in [(0, 0), (0, 9999), (7, 0), (7, 9999), (3, 5000)]:
        id_map = np.zeros((8, 10000), dtype=np.int32)
        id_map[y, x] = 5
        (segment,) = _assert_matches_pycocotools(id_map, [5])
        assert segment.bbox == (x, y, 1, 1)
    # Counts past 2^20 need five 5-bit groups.
    id_map = np.zeros((1, 2_000_003), dtype=np.int32)
    id_map[0, [1, 1_500_000]] = 1
    _assert_matches_pycocotools(id_map, [1, 0])


def test_runs_spanning_columns_give_full_height_boxes() -> None:
    id_map = np.zeros((5, 4), dtype=np.int32)
    id_map[3:, 1] = 2  # bottom of column 1 ...
    id_map[:2, 2] = 2  # ... continues at the top of column 2: one column-major run
    (segment,) = _assert_matches_pycocotools(id_map, [2])
    assert segment.bbox == (1, 0, 2, 5)
    assert segment.area == 4


def test_order_repeats_layout_and_dtypes() -> None:
    rng = np.random.default_rng(7)
    id_map = _blobs(rng, 30, 41, cells=6)
    ids = [s for s in np.unique(id_map).tolist() if s > 0]
    expected = _assert_matches_pycocotools(id_map, ids)
    assert encode_segments(id_map, ids[::-1]) == expected[::-1]
    assert encode_segments(id_map, [ids[0], ids[0]]) == [expected[0], expected[0]]
    assert encode_segments(np.asfortranarray(id_map), ids) == expected
    assert encode_segments(id_map.astype(np.int64), np.array(ids)) == expected
    assert encode_segments(id_map, []) == []
    wide = np.zeros((30, 82), dtype=np.int32)
    wide[:, ::2] = id_map
    assert encode_segments(wide[:, ::2], ids) == expected  # a strided view


def test_zero_sized_map_matches_pycocotools() -> None:
    for shape in [(0, 4), (3, 0)]:
        (segment,) = encode_segments(np.zeros(shape, dtype=np.int32), [1])
        reference = coco_mask.encode(np.zeros(shape, dtype=np.uint8, order="F"))
        assert segment.counts == reference["counts"].decode("ascii")
        assert segment.area == 0 and segment.bbox == (0, 0, 0, 0)


def test_rejects_bad_maps() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_segments(np.zeros((2, 3, 4), dtype=np.int32), [1])
    with pytest.raises(ValueError, match="integer"):
        encode_segments(np.zeros((2, 3), dtype=np.float32), [1])


# -- decoding: one mask, one image's id map ------------------------------------------------------------------


def test_decode_mask_round_trips_an_irregular_mask() -> None:
    mask = np.random.default_rng(0).random((13, 17)) > 0.6
    decoded = decode_mask(encode_rle(mask))
    assert decoded.dtype == bool
    assert decoded.shape == (13, 17)
    assert np.array_equal(decoded, mask)


def test_panoptic_map_rebuilds_ids_and_void() -> None:
    a, b = rect(6, 8, 0, 0, 3, 4), rect(6, 8, 3, 4, 6, 8)
    rows = [{"segment_id": 0, "rle": encode_rle(a)}, {"segment_id": 1, "rle": encode_rle(b)}]
    ids = panoptic_map(rows)
    assert ids.dtype == np.int32
    assert np.array_equal(ids == 0, a)
    assert np.array_equal(ids == 1, b)
    assert np.array_equal(ids == VOID_ID, ~(a | b))


def test_panoptic_map_sizes() -> None:
    assert np.array_equal(panoptic_map([], height=2, width=3), np.full((2, 3), -1))
    with pytest.raises(ValueError, match="needs height= and width="):
        panoptic_map([])
    with pytest.raises(ValueError, match="mask size"):
        panoptic_map([{"segment_id": 0, "rle": encode_rle(rect(4, 4, 0, 0, 1, 1))}], height=4, width=5)


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_rows_compared_in_blocks_give_the_same_counts(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison with the row above runs a block of rows at a time (no bool map of the whole image):
    block edges that cut between any two rows change nothing."""
    import pipeline.segmenting.rle

    monkeypatch.setattr(pipeline.segmenting.rle, "COMPARED_PIXELS", block)
    rng = np.random.default_rng(block)
    id_map = _blobs(rng, 37, 23, 12)
    _assert_matches_pycocotools(id_map, sorted({int(v) for v in np.unique(id_map)} | {5000}))
