"""The image-id grammar (`pipeline.inputs.ids`): built and parsed in one place, each id parsed back to its input."""

from __future__ import annotations

import pytest

from pipeline.inputs.ids import SHARD_ITSELF, file_id, last_part, member_id, member_of_old_row, parse_image_id


@pytest.mark.parametrize(
    "uri",
    ["/data/a.jpg", "/data/100%.jpg", "/data/a#b.jpg", "/data/%23#%25.png", "s3://b/k%2F#x.jpg", "/d/../x.jpg"],
)
def test_a_file_id_has_no_separator_and_parses_back_to_its_uri(uri: str) -> None:
    image_id = file_id(uri)
    assert "#" not in image_id
    assert parse_image_id(image_id) == (uri, None)


@pytest.mark.parametrize("shard", ["/d/s.tar", "/d/odd#%.tar", "s3://b/p.parquet"])
@pytest.mark.parametrize("member", ["a.jpg", "dir/b#1.jpg", "../../x.jpg", "row=7", SHARD_ITSELF])
def test_a_member_id_parses_back_to_its_shard_and_member(shard: str, member: str) -> None:
    image_id = member_id(shard, member)
    assert image_id.count("#") >= 1
    assert parse_image_id(image_id) == (shard, member)


def test_the_file_and_the_member_named_alike_get_two_ids() -> None:
    assert file_id("/d/big.tar#s1.jpg") != member_id("/d/big.tar", "s1.jpg")


def test_old_rows_give_their_member_from_the_unescaped_id() -> None:
    assert member_of_old_row("/d/a.jpg", "/d/a.jpg") is None
    assert member_of_old_row("/d/s.tar#x/y.jpg", "/d/s.tar") == "x/y.jpg"


def test_the_last_part_names_the_member_or_the_whole_id() -> None:
    assert last_part(member_id("s3://b/shard.tar", "dir/000123.jpg")) == "dir/000123.jpg"
    assert last_part(member_id("s3://b/a#b.tar", "x#y.jpg")) == "y.jpg"  # the last '#', as COCO names were made
    assert last_part(file_id("/data/a#b.jpg")) == "/data/a%23b.jpg"  # a file's id has no '#'
    assert last_part("custom-id-7") == "custom-id-7"  # an --id-column value: nothing parsed
