"""An output read one row per image: on Ray (grouped by a shuffle) and in process, the same packed rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.reading.packed_images import packed_rows, read_packed_images, read_segments_by_image
from pipeline.schema import PACKED_SCHEMA
from pipeline.segmenting.rle import decode_mask
from tests.synthetic_output import SynthImage, make_images, write_output


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthImage]]:
    root = tmp_path_factory.mktemp("packed")
    images = make_images(root / "inputs")
    write_output(root / "out", images)
    return root / "out", images


def test_read_segments_by_image_groups_every_ok_image(
    synthetic: tuple[Path, list[SynthImage]], ray_session: None
) -> None:
    output, images = synthetic
    rows = {}
    for batch in read_segments_by_image(str(output)).iter_batches(batch_format="pyarrow"):
        for image in packed_rows(batch):
            rows[image["image_id"]] = image
    assert set(rows) == {i.image_id for i in images if i.status == "ok"}  # the failed image is left out
    for image in images:
        if image.status != "ok":
            continue
        packed = rows[image.image_id]
        assert (packed["height"], packed["width"]) == (image.height, image.width)
        assert [s["segment_id"] for s in packed["segments"]] == list(range(len(image.segments)))
        for got, want in zip(packed["segments"], image.segments):
            assert got["category_id"] == want.category_id
            assert np.array_equal(decode_mask(got["rle"]), want.mask)

    only = read_segments_by_image(str(output), image_ids=[images[2].image_id]).take_all()
    assert [r["image_id"] for r in only] == [images[2].image_id]


def _ray_rows(output: Path, *, image_ids: list[str] | None = None) -> pa.Table:
    """The rows of `read_segments_by_image` as one table, sorted by image_id like `read_packed_images`'s."""
    batches = read_segments_by_image(str(output), image_ids=image_ids).iter_batches(batch_format="pyarrow")
    return pa.concat_tables([PACKED_SCHEMA.empty_table(), *batches]).cast(PACKED_SCHEMA).sort_by("image_id")


def test_the_in_process_reader_gives_the_rows_of_the_ray_one(
    synthetic: tuple[Path, list[SynthImage]], ray_session: None
) -> None:
    output, images = synthetic
    local = read_packed_images(str(output))
    assert local.schema.equals(PACKED_SCHEMA)
    assert local["image_id"].to_pylist() == sorted(i.image_id for i in images if i.status == "ok")
    assert local.to_pylist() == _ray_rows(output).to_pylist()

    some = [images[2].image_id, images[0].image_id]
    assert read_packed_images(str(output), image_ids=some).to_pylist() == _ray_rows(output, image_ids=some).to_pylist()
