"""`panoptic-flow show`: overlay pixels equal the decoded masks; inputs from files, tar members, Parquet rows."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.overlay import (
    DEMO_BANNER,
    OverlaySegment,
    blend,
    contact_sheet,
    draw_overlay,
    mask_outline,
    render_overlay,
    segment_color,
)
from jobs.show import load_image, main, render_image
from model.categories import category_by_id
from model.config import InferenceConfig
from pipeline.config import InputConfig
from pipeline.inputs.decode import decode_image
from pipeline.inputs.readers import read_refs
from pipeline.inputs.sources import resolve_inputs
from tests.pipeline.images import tar_bytes
from tests.pipeline.odd_inputs import damaged_exif_jpeg, exif_jpeg
from tests.synthetic_output import SynthImage, SynthSegment, make_images, rect, write_output


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthImage]]:
    root = tmp_path_factory.mktemp("show")
    images = make_images(root / "inputs")
    write_output(root / "out", images)
    return root / "out", images


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("index", [0, 2])  # dog + person + sky; two touching cats + a person
def test_filled_pixels_are_the_blend_of_each_mask(
    synthetic: tuple[Path, list[SynthImage]], tmp_path: Path, index: int
) -> None:
    output, images = synthetic
    image = images[index]
    out = tmp_path / "overlay.png"
    args = [str(output), image.image_id, "-o", str(out), "--alpha", "0.4", "--no-labels", "--no-outlines"]
    assert main(args) == 0
    drawn = _read_png(out).astype(np.int64)
    original = image.pixels.astype(np.int64)
    assert drawn.shape == original.shape
    covered = np.zeros(original.shape[:2], dtype=bool)
    for k, segment in enumerate(image.segments):
        color = np.array(segment_color(segment.category_id, k, isthing=segment.isthing))
        expected = np.rint(0.6 * original[segment.mask] + 0.4 * color)
        assert np.abs(drawn[segment.mask] - expected).max() <= 1
        covered |= segment.mask
    assert np.array_equal(drawn[~covered], original[~covered])  # outside every mask: untouched


def test_colours_follow_the_categories(synthetic: tuple[Path, list[SynthImage]]) -> None:
    _, images = synthetic
    sky = images[0].segments[2]
    assert segment_color(sky.category_id, 2, isthing=False) == category_by_id(sky.category_id).color
    # two cat instances: same category, different (but stable) colours near the cat colour
    first, second = segment_color(17, 0, isthing=True), segment_color(17, 1, isthing=True)
    assert first != second
    assert first == segment_color(17, 0, isthing=True)
    assert np.abs(np.array(first) - np.array(category_by_id(17).color)).max() <= 48


def test_labels_and_outlines_produce_a_png_of_the_image_size(
    synthetic: tuple[Path, list[SynthImage]], tmp_path: Path
) -> None:
    output, images = synthetic
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    assert main([str(output), images[1].image_id, "-o", str(plain), "--no-labels", "--no-outlines"]) == 0
    assert main([str(output), images[1].image_id, "-o", str(labelled)]) == 0
    with_labels = _read_png(labelled)
    assert with_labels.shape == (images[1].height, images[1].width, 3)
    assert not np.array_equal(with_labels, _read_png(plain))  # labels/outlines drew something


def test_render_overlay_outline_pixels() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    mask = np.zeros((10, 10), bool)
    mask[1:9, 1:9] = True
    outline = mask_outline(mask)
    assert outline.sum() == 28 and not outline[2:8, 2:8].any()
    segment = OverlaySegment(0, 187, "sky-other-merged", False, 0.9, (1, 1, 8, 8), mask)
    drawn = render_overlay(image, [segment], alpha=1.0, outlines=True, labels=False)
    assert tuple(drawn[2, 2]) == category_by_id(187).color  # interior: the colour itself at alpha 1
    assert tuple(drawn[1, 1]) == tuple(int(c * 0.6) for c in category_by_id(187).color)
    assert not drawn[0].any()
    with pytest.raises(ValueError, match="mask is"):
        render_overlay(np.zeros((5, 6, 3), np.uint8), [segment])


def test_segments_that_would_be_mostly_outline_are_only_filled() -> None:
    """A 4x4 segment (12 of its 16 pixels on the outline) and scattered pixels (the demo weights' fragments)
    keep the photo visible: filled, not outlined."""
    image = np.full((20, 20, 3), 100, np.uint8)
    small = np.zeros((20, 20), bool)
    small[2:6, 2:6] = True
    scattered = np.zeros((20, 20), bool)
    scattered[10::2, 10::2] = True
    segments = [
        OverlaySegment(0, 187, "sky-other-merged", False, 0.9, (2, 2, 4, 4), small),
        OverlaySegment(1, 193, "grass-merged", False, 0.9, (10, 10, 9, 9), scattered),
    ]
    outlined = render_overlay(image, segments, alpha=0.4, outlines=True, labels=False)
    assert np.array_equal(outlined, render_overlay(image, segments, alpha=0.4, outlines=False, labels=False))
    assert tuple(outlined[2, 2]) == tuple(blend(image[2, 2], category_by_id(187).color, 0.4))


def test_images_from_tar_members_and_parquet_rows(synthetic: tuple[Path, list[SynthImage]], tmp_path: Path) -> None:
    _, images = synthetic
    cats = images[2]
    encoded = Path(cats.image_id).read_bytes()
    tar_path = tmp_path / "shard-0001.tar"
    tar_path.write_bytes(tar_bytes([("other.png", Path(images[0].image_id).read_bytes()), ("sub/cats.png", encoded)]))
    parquet_path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"jpeg": [b"junk", encoded]}), parquet_path)

    from_tar = dataclasses.replace(cats, image_id=f"{tar_path}#sub/cats.png", source=str(tar_path))
    from_parquet = dataclasses.replace(cats, image_id=f"{parquet_path}#row=1", source=str(parquet_path))
    output = tmp_path / "out"
    write_output(output, [from_tar, from_parquet], run_config={"input": {"bytes_column": "jpeg"}})

    style = {"alpha": 0.5, "outlines": False, "labels": False}
    a = render_image(str(output), from_tar.image_id, **style).pixels
    b = render_image(str(output), from_parquet.image_id, **style).pixels
    assert a.shape == (cats.height, cats.width, 3)
    assert np.array_equal(a, b)
    outside = ~np.any([s.mask for s in cats.segments], axis=0)
    assert np.array_equal(a[outside], cats.pixels[outside])  # the right member/row was read


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).shape == (20, 10, 3)


def test_grid_contact_sheet(synthetic: tuple[Path, list[SynthImage]], tmp_path: Path) -> None:
    output, _ = synthetic
    out = tmp_path / "grid.png"
    assert main([str(output), "--grid", "4", "--where", "categories['dog'] > 0", "-o", str(out), "--tile", "64"]) == 0
    # two dog images (30x40 and 40x50, smaller than a tile: not enlarged) side by side, the sheet sized to them
    assert _read_png(out).shape == (max(30, 40) + 18, 40 + 50, 3)
    assert main([str(output), "--grid", "3", "--where", "num_segments > 100", "-o", str(out)]) == 2


def test_errors(synthetic: tuple[Path, list[SynthImage]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output, images = synthetic
    assert main([str(output), "nope.png", "-o", str(tmp_path / "x.png")]) == 2
    assert "is not in" in capsys.readouterr().err
    assert main([str(output), images[-1].image_id, "-o", str(tmp_path / "x.png")]) == 2
    assert "failed in the run" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        main([str(output)])  # neither IMAGE_ID nor --grid


def test_a_mistyped_output_is_one_line_and_exit_2(
    synthetic: tuple[Path, list[SynthImage]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output, images = synthetic
    for argv in ([images[0].image_id], ["--grid", "2"]):
        assert main([f"{output}x", *argv, "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no output at" in err and "no such folder" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("build", "swapped"), [(damaged_exif_jpeg, True), (lambda: exif_jpeg(6), True), (lambda: exif_jpeg(3), False)]
)
def test_images_are_decoded_and_oriented_as_the_pipeline_does(build: Callable[[], bytes], swapped: bool) -> None:
    """The EXIF block of `damaged_exif_jpeg` cannot be rewritten (ImageOps.exif_transpose raised struct.error);
    the pipeline reads its orientation tag alone and segments it: `show` draws it in the same frame, with the
    same pixels (a resize rule that keeps the size makes the pipeline's model input the full image)."""
    data = build()
    with Image.open(io.BytesIO(data)) as stored:
        stored_w, stored_h = stored.size
    keep = InferenceConfig(min_size=min(stored_w, stored_h), max_size=max(stored_w, stored_h))
    pipeline_pixels, width, height = decode_image(data, max_pixels=10**8, inference=keep)
    assert (width, height) == ((stored_h, stored_w) if swapped else (stored_w, stored_h))
    assert np.array_equal(load_image(data), pipeline_pixels)


def test_show_draws_an_image_with_a_damaged_exif_block(tmp_path: Path) -> None:
    data = damaged_exif_jpeg()
    _, width, height = decode_image(data, max_pixels=10**8, inference=InferenceConfig())
    path = tmp_path / "damaged.jpg"
    path.write_bytes(data)
    sky = SynthSegment(187, "sky-other-merged", 0.9, rect(height, width, 0, 0, height // 2, width))
    image = SynthImage(str(path), str(path), height, width, [sky])
    write_output(tmp_path / "out", [image])
    out = tmp_path / "damaged.png"
    assert main([str(tmp_path / "out"), str(path), "-o", str(out)]) == 0
    assert _read_png(out).shape == (height, width, 3)


def _crowded_scene(height: int = 180, width: int = 320) -> list[OverlaySegment]:
    """Segments as a trained model gives them on a busy photo: big stuff, things whose boxes share their
    top-left corner (nested L shapes: the old layout stacked all their labels on one point), a thing
    narrower than its label, thin strips and specks too small for any label."""
    shapes = [rect(height, width, 0, 0, 50, width), rect(height, width, 140, 0, height, width)]  # sky, floor
    shapes += [rect(height, width, 50, 0, 50 + 18 * (k + 1), 60 + 20 * (k + 1)) for k in range(5)]  # L shapes
    shapes += [rect(height, width, 50, 200 + 15 * k, 140, 206 + 15 * k) for k in range(4)]  # thin strips
    shapes.append(rect(height, width, 60, 270, 90, 310))  # 40 px wide: a label sticks out a little
    shapes += [rect(height, width, 138, 170 + 2 * k, 140, 171 + 2 * k) for k in range(10)]  # specks
    taken = np.zeros((height, width), bool)
    segments = []
    for k, shape in enumerate(shapes):
        mask = shape & ~taken
        taken |= mask
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        category_id = (187, 200)[k] if k < 2 else (1, 17, 18, 44)[k % 4]
        segments.append(OverlaySegment(k, category_id, f"class-{k}", k >= 2, 0.99 - 0.01 * k, bbox, mask))
    return segments


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("scale", [1, 7])  # 7: 1260x2240, searched on a grid of 3-px cells
def test_labels_never_overlap_and_lie_on_their_segments(scale: int) -> None:
    block = np.ones((scale, scale), bool)
    segments = [
        dataclasses.replace(s, mask=np.kron(s.mask, block), bbox=tuple(v * scale for v in s.bbox))
        for s in _crowded_scene()
    ]
    height, width = 180 * scale, 320 * scale
    image = np.full((height, width, 3), 128, np.uint8)
    overlay = draw_overlay(image, segments, alpha=0.5, outlines=False, labels=True)
    assert len(overlay.labels) + len(overlay.unplaced) == len(segments)
    masks = {s.segment_id: s.mask for s in segments}
    on_segment = {
        lab.segment_id: masks[lab.segment_id][lab.box[1] : lab.box[3], lab.box[0] : lab.box[2]]
        for lab in overlay.labels
    }
    inside = {k for k, pixels in on_segment.items() if pixels.all()}
    assert inside >= {0, 1, 2, 3, 4, 5, 6}  # sky, floor and the five L shapes, each inside its own segment
    if scale == 1:  # the font does not grow as fast as the image: at scale 7 this label fits inside
        assert 11 in set(on_segment) - inside  # the narrow thing: its label is centred over it, sticking out
    assert len(overlay.unplaced) == 14  # strips and specks: no room
    for i, label in enumerate(overlay.labels):
        x0, y0, x1, y1 = label.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        pixels = on_segment[label.segment_id]
        assert pixels.mean() >= 0.6 and pixels[(y1 - y0) // 2, (x1 - x0) // 2], label
        for other in overlay.labels[i + 1 :]:
            assert not _overlap(label.box, other.box), (label, other)
    # the pixels: labels change the picture only inside their boxes, and each box was drawn
    plain = render_overlay(image, segments, alpha=0.5, outlines=False, labels=False)
    changed = np.any(overlay.pixels != plain, axis=-1)  # [H, W]
    in_a_box = np.zeros_like(changed)
    for label in overlay.labels:
        x0, y0, x1, y1 = label.box
        assert changed[y0:y1, x0:x1].mean() > 0.5  # a filled box with its text
        in_a_box[y0:y1, x0:x1] = True
    assert not (changed & ~in_a_box).any()


def test_labels_that_do_not_fit_are_listed(synthetic: tuple[Path, list[SynthImage]], tmp_path: Path, capsys) -> None:
    output, images = synthetic
    # cats.png is 24x32: no label of a 10-px font fits on any of its segments
    assert main([str(output), images[2].image_id, "-o", str(tmp_path / "cats.png")]) == 0
    printed = capsys.readouterr().out
    assert "0 labels drawn; 3 without room on their segment: cat 0.95, cat 0.92, person 0.60" in printed


def test_an_output_of_demo_weights_is_marked_and_warned_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = make_images(tmp_path / "inputs")
    write_output(tmp_path / "out", images, weights="synthetic")
    out = tmp_path / "x.png"
    assert main([str(tmp_path / "out"), images[0].image_id, "-o", str(out), "--no-labels"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"panoptic-flow show: warning: {tmp_path / 'out'} was made with demo weights (--weights synthetic): "
        "its segments are meaningless"
    ]
    marked = _read_png(out)
    assert marked.shape[0] > images[0].height and marked.shape[1] == images[0].width  # a strip above the picture
    assert tuple(marked[0, -1]) == (170, 0, 0)
    unmarked = tmp_path / "plain.png"
    assert main([str(tmp_path / "out"), images[0].image_id, "-o", str(unmarked), "--no-labels"]) == 0
    strip = marked.shape[0] - images[0].height
    assert np.array_equal(marked[strip:], render_image(str(tmp_path / "out"), images[0].image_id,
                                                       alpha=0.4, outlines=True, labels=False).pixels)  # fmt: skip
    assert DEMO_BANNER == "demo weights: segments are meaningless"


def test_a_contact_sheet_is_sized_to_its_images() -> None:
    wide, square = np.full((200, 300, 3), 255, np.uint8), np.full((300, 300, 3), 255, np.uint8)
    sheet = contact_sheet([square, square, wide], ["a", "b", "c"], tile=100)
    # three in one row, each 100 px high: 100 + 100 + 150 wide, no empty cell
    assert sheet.shape == (100 + 18, 350, 3)
    assert (sheet[:100] == 255).all()  # the pictures fill the row: no gap above a caption, no empty cell


def test_ids_are_taken_exactly_as_stored(tmp_path: Path) -> None:
    """A tar member named ``../../x.png`` and a file whose name holds ``#`` and ``%`` (stored escaped, read from
    its source)."""
    synth = make_images(tmp_path / "inputs")
    cats = synth[2]
    encoded = Path(cats.image_id).read_bytes()
    tar_path = tmp_path / "shard.tar"
    tar_path.write_bytes(tar_bytes([("../../x.png", encoded)]))
    odd = tmp_path / "inputs" / "a#b%c.png"
    odd.write_bytes(encoded)
    from_tar = dataclasses.replace(cats, image_id=f"{tar_path}#../../x.png", source=str(tar_path))
    from_odd = dataclasses.replace(cats, image_id=str(odd).replace("%", "%25").replace("#", "%23"), source=str(odd))
    write_output(tmp_path / "out", [from_tar, from_odd])
    style = {"alpha": 0.5, "outlines": False, "labels": False}
    a = render_image(str(tmp_path / "out"), from_tar.image_id, **style).pixels
    b = render_image(str(tmp_path / "out"), from_odd.image_id, **style).pixels
    assert np.array_equal(a, b) and a.shape == (cats.height, cats.width, 3)
    assert main([str(tmp_path / "out"), str(odd), "-o", str(tmp_path / "odd.png")]) == 0  # the path as given


def test_odd_names_are_read_as_the_pipeline_read_them(tmp_path: Path) -> None:
    """A plain file ``a#b%20c.png`` and the member ``x#y%41.png`` of the shard ``s#1%.tar`` are listed and read as
    the pipeline lists and reads them (`resolve_inputs`, `read_refs`: their ids escape ``%`` and ``#``), their
    results written, and ``show`` draws each by its stored id, read back from the row's ``source`` and ``member``.
    Other pictures lie where a reader that took the id for a path would look (the escaped id, the shard part of
    it, the name percent-decoded): drawing one of those gives other pixels."""
    cats = make_images(tmp_path / "made")[2]
    encoded = Path(cats.source).read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    plain, shard = folder / "a#b%20c.png", folder / "s#1%.tar"
    plain.write_bytes(encoded)
    shard.write_bytes(tar_bytes([("x#y%41.png", encoded)]))
    refs = resolve_inputs(InputConfig((str(plain), str(shard)))).refs
    rows = read_refs({"uri": [r["uri"] for r in refs], "kind": [r["kind"] for r in refs]}, bytes_column="image",
                     id_column=None)  # fmt: skip
    assert list(rows["error"]) == ["", ""]
    stored = dict(zip(rows["source"], zip(rows["image_id"], rows["member"])))
    assert stored == {
        str(plain): (str(folder / "a%23b%2520c.png"), None),
        str(shard): (f"{folder / 's%231%25.tar'}#x#y%41.png", "x#y%41.png"),
    }
    decoy = np.zeros_like(cats.pixels)  # the size of the real picture: only its pixels tell them apart
    decoy_png = io.BytesIO()
    Image.fromarray(decoy).save(decoy_png, format="PNG")
    for name in ("a%23b%2520c.png", "a#b c.png", "s%231%25.tar#x#y%41.png"):
        (folder / name).write_bytes(decoy_png.getvalue())
    (folder / "s%231%25.tar").write_bytes(tar_bytes([("x#y%41.png", decoy_png.getvalue())]))

    found = [
        dataclasses.replace(cats, image_id=image_id, source=source, member=member)
        for source, (image_id, member) in stored.items()
    ]
    write_output(tmp_path / "out", found)
    outside = ~np.any([s.mask for s in cats.segments], axis=0)
    for image in found:
        out = tmp_path / "drawn.png"
        argv = [str(tmp_path / "out"), image.image_id, "-o", str(out), "--no-labels", "--no-outlines"]
        assert main(argv) == 0, image.image_id
        assert np.array_equal(_read_png(out)[outside], cats.pixels[outside]), image.image_id


def test_a_shard_read_with_a_forced_input_format_is_drawn_whatever_its_extension(tmp_path: Path) -> None:
    """A run with ``--input-format tar`` reads ``shards.bin`` as a tar: ``show`` reads its member back the same
    way, from the kind the run recorded (its extension names no kind)."""
    cats = make_images(tmp_path / "made")[2]
    shard = tmp_path / "in" / "shards.bin"
    shard.parent.mkdir()
    shard.write_bytes(tar_bytes([("cat.png", Path(cats.source).read_bytes())]))
    found = [dataclasses.replace(cats, image_id=f"{shard}#cat.png", source=str(shard), member="cat.png")]
    write_output(tmp_path / "out", found, run_config={"input": {"uris": [str(shard)], "format": "tar"}})
    out = tmp_path / "drawn.png"
    assert main([str(tmp_path / "out"), found[0].image_id, "-o", str(out), "--no-labels", "--no-outlines"]) == 0
    outside = ~np.any([s.mask for s in cats.segments], axis=0)
    assert np.array_equal(_read_png(out)[outside], cats.pixels[outside])
