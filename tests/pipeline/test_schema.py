"""The per-image views of an output are derived from the table records: same names, same types."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.schema import FLAT_SCHEMA, IMAGES_SCHEMA, PACKED_SCHEMA, RLE_TYPE, SEGMENTS_SCHEMA

IMAGE_COLUMNS = ("image_id", "source", "height", "width")
SEGMENT_COLUMNS = ("segment_id", "category_id", "score")


def test_the_views_are_the_columns_readers_have_always_had() -> None:
    """Hand-written: a change to a source column shows up here as a change to the views (all nullable)."""
    expected_flat = pa.schema(
        [
            ("image_id", pa.string()),
            ("source", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("segment_id", pa.int32()),
            ("category_id", pa.int32()),
            ("score", pa.float32()),
            ("counts", pa.string()),
        ]
    )
    expected_packed = pa.schema(
        [
            ("image_id", pa.string()),
            ("source", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("segment_id", pa.list_(pa.int32())),
            ("category_id", pa.list_(pa.int32())),
            ("score", pa.list_(pa.float32())),
            ("counts", pa.list_(pa.string())),
        ]
    )
    assert FLAT_SCHEMA.equals(expected_flat, check_metadata=True), FLAT_SCHEMA
    assert PACKED_SCHEMA.equals(expected_packed, check_metadata=True), PACKED_SCHEMA
    assert all(field.nullable for field in [*FLAT_SCHEMA, *PACKED_SCHEMA])


@pytest.mark.parametrize("name", IMAGE_COLUMNS)
def test_an_image_column_has_its_images_table_type(name: str) -> None:
    source = IMAGES_SCHEMA.field(name).type
    assert FLAT_SCHEMA.field(name).type == source
    assert PACKED_SCHEMA.field(name).type == source


@pytest.mark.parametrize("name", [*SEGMENT_COLUMNS, "counts"])
def test_a_segment_column_has_its_segments_table_type_in_a_list_when_packed(name: str) -> None:
    source = RLE_TYPE.field("counts").type if name == "counts" else SEGMENTS_SCHEMA.field(name).type
    assert FLAT_SCHEMA.field(name).type == source
    assert PACKED_SCHEMA.field(name).type == pa.list_(source)


def test_a_segment_rows_size_fits_the_image_columns() -> None:
    """A segment's flat ``height`` / ``width`` are read from its ``rle.size``: the same type as the image's."""
    size_type = SEGMENTS_SCHEMA.field("rle").type.field("size").type.value_type
    assert size_type == FLAT_SCHEMA.field("height").type == FLAT_SCHEMA.field("width").type


def test_the_view_columns_come_in_their_order() -> None:
    assert FLAT_SCHEMA.names == PACKED_SCHEMA.names == [*IMAGE_COLUMNS, *SEGMENT_COLUMNS, "counts"]
