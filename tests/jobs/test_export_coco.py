"""`panoptic-flow export-coco`: PNG id encoding, names, and an export -> re-import round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.export_coco import coco_image, coco_names, id_map_to_rgb, main, rgb_to_id_map, to_coco_ids
from pipeline.segmenting.rle import decode_mask
from tests.synthetic_output import encode_rle, make_images, write_output


def test_png_id_encoding_on_known_values() -> None:
    ids = np.array([[0, 1, 256], [65536 + 2, 255, 256**3 - 1]])
    rgb = id_map_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[0].tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]
    assert rgb[1].tolist() == [[2, 0, 1], [255, 0, 0], [255, 255, 255]]
    assert np.array_equal(rgb_to_id_map(rgb), ids)


def test_png_id_round_trip_and_range() -> None:
    ids = np.random.default_rng(0).integers(0, 256**3, size=(7, 9))
    assert np.array_equal(rgb_to_id_map(id_map_to_rgb(ids)), ids)
    with pytest.raises(ValueError, match="ids must lie in"):
        id_map_to_rgb(np.array([[256**3]]))
    with pytest.raises(ValueError, match="ids must lie in"):
        id_map_to_rgb(np.array([[-1]]))


def test_output_ids_shift_by_one() -> None:
    assert to_coco_ids(np.array([[-1, 0, 5]], np.int32)).tolist() == [[0, 1, 6]]


def test_coco_names_are_deterministic_sanitised_and_distinct() -> None:
    image_id, name, ext = coco_names("s3://b/shard-0001.tar#dir/000123.jpg")
    assert coco_names("s3://b/shard-0001.tar#dir/000123.jpg") == (image_id, name, ext)
    assert name.startswith("000123_") and len(name) == len("000123_") + 8 and ext == ".jpg"
    assert 0 <= image_id < 2**52
    other = coco_names("s3://b/shard-0002.tar#dir/000123.jpg")
    assert other[1] != name and other[0] != image_id  # same member name in another shard
    assert coco_names("/data/my photo (1).JPG")[1].startswith("my_photo_1_")
    assert coco_names("s3://b/t.parquet#row=12")[1].startswith("row_12_")


def test_export_then_reimport_gives_the_same_masks(
    tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    images = make_images(tmp_path / "inputs")
    write_output(tmp_path / "out", images)
    dest = tmp_path / "coco"
    assert main([str(tmp_path / "out"), str(dest)]) == 0
    assert "wrote 4 images, 8 segments" in capsys.readouterr().out

    document = json.loads((dest / "panoptic.json").read_text())
    assert len(document["categories"]) == 133
    assert {c["name"] for c in document["categories"]} >= {"dog", "sky-other-merged"}
    by_uri = {i["image_uri"]: i for i in document["images"]}
    annotations = {a["image_id"]: a for a in document["annotations"]}
    assert set(by_uri) == {i.image_id for i in images if i.status == "ok"}  # failed image not exported

    for image in images:
        if image.status != "ok":
            continue
        entry = by_uri[image.image_id]
        assert (entry["width"], entry["height"]) == (image.width, image.height)
        annotation = annotations[entry["id"]]
        assert annotation["file_name"] == Path(entry["file_name"]).stem + ".png"
        with Image.open(dest / "panoptic" / annotation["file_name"]) as png:
            ids = rgb_to_id_map(np.asarray(png.convert("RGB")))
        assert ids.shape == (image.height, image.width)
        infos = {s["id"]: s for s in annotation["segments_info"]}
        assert sorted(infos) == list(range(1, len(image.segments) + 1))  # segment k -> COCO id k + 1
        covered = np.zeros(ids.shape, dtype=bool)
        for k, segment in enumerate(image.segments):
            info = infos[k + 1]
            assert np.array_equal(ids == k + 1, segment.mask)
            assert info["category_id"] == segment.category_id and info["iscrowd"] == 0
            assert info["area"] == int(segment.mask.sum()) and info["bbox"] == segment.bbox
            covered |= segment.mask
        assert not ids[~covered].any()  # no segment -> 0 (VOID)
    assert [i["image_uri"] for i in document["images"]] == sorted(by_uri)  # sorted: deterministic order


def test_png_pixels_decode_like_the_rle(tmp_path: Path) -> None:
    # the PNG of the first synthetic image, rebuilt without Ray, against the RLE decoder
    image = make_images(tmp_path)[0]
    segments = [
        {"segment_id": k, "category_id": s.category_id, "score": s.score, "rle": encode_rle(s.mask)}
        for k, s in enumerate(image.segments)
    ]
    rgb, entry, annotation = coco_image(
        {"image_id": image.image_id, "height": image.height, "width": image.width, "segments": segments}
    )
    ids = rgb_to_id_map(rgb)
    for segment in segments:
        assert np.array_equal(ids == segment["segment_id"] + 1, decode_mask(segment["rle"]))
    assert entry["id"] == annotation["image_id"]


def test_a_mistyped_output_writes_nothing_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "no-such-run"), str(tmp_path / "coco")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no output at" in err
    assert not (tmp_path / "coco").exists()  # no empty panoptic.json that looks like a valid export


_LARGE_OUTPUT_PROBE = """
import sys
import pipeline.reading.packed_images
pipeline.reading.packed_images.LOCAL_MAX_BYTES = 0  # read as a large output is: on Ray
from jobs.export_coco import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_large_output_uses_ray_and_says_nothing_of_it_unless_verbose(tmp_path: Path, verbose: bool) -> None:
    """A new process, as a user runs it: the local Ray it starts prints nothing (no INFO lines, no dashboard, no
    token warning) unless --verbose."""
    import os
    import subprocess
    import sys

    write_output(tmp_path / "out", make_images(tmp_path / "inputs"))
    root = Path(__file__).resolve().parents[2]
    argv = [str(tmp_path / "out"), str(tmp_path / "coco"), *(["--verbose"] if verbose else [])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", _LARGE_OUTPUT_PROBE, *argv], capture_output=True, text=True, cwd=root, timeout=300,
        env={**env, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == f"wrote 4 images, 8 segments to {tmp_path / 'coco'}\n"
    if verbose:
        assert "ray" in done.stderr.lower()
    else:
        assert done.stderr == ""
