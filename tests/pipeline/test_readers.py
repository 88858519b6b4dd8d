"""`pipeline.inputs.readers`: one image read back by the member its row stored is the image its whole ref gave (the
pipeline reads refs whole, ``show`` reads images back one by one: one reader per kind serves both)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs.readers import READERS, read_image, read_ref
from tests.pipeline.images import photo_bytes, tar_bytes


def test_every_image_read_back_by_its_member_is_the_one_its_ref_gave(tmp_path: Path) -> None:
    a, b, c = (photo_bytes(16, 24, fmt="PNG", seed=i) for i in range(3))
    plain = tmp_path / "a#b%20c.png"
    plain.write_bytes(a)
    shard = tmp_path / "s#1%.tar"  # a member whose name holds # and %, one that is no image, one named like a path
    shard.write_bytes(tar_bytes([("x#y%41.png", a), ("x#y%41.txt", b"meta"), ("../../z.png", b), ("w.png", c)]))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [a, b, c]}), table, row_group_size=2)  # row 2 in the second row group
    structs = tmp_path / "hf.parquet"  # Hugging Face datasets' {"bytes", "path"} image struct
    pq.write_table(pa.table({"image": [{"bytes": c, "path": "c.png"}, {"bytes": a, "path": "a.png"}]}), structs)

    for uri, kind, expected in [
        (plain, "file", [a]),
        (shard, "tar", [a, b, c]),
        (table, "parquet", [a, b, c]),
        (structs, "parquet", [c, a]),
    ]:
        rows = read_ref(str(uri), kind, [], bytes_column="image", id_column=None)
        assert [(r.error, r.data) for r in rows] == [("", data) for data in expected], uri
        assert [read_image(r.source, kind, r.member) for r in rows] == expected, uri
    assert set(READERS) == {"file", "tar", "parquet"}


def test_a_parquet_image_is_read_back_by_its_id_column(tmp_path: Path) -> None:
    a, b = (photo_bytes(16, 24, fmt="PNG", seed=i) for i in range(2))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"jpeg": [a, b], "key": ["k#1", "k%2"]}), table)
    rows = read_ref(str(table), "parquet", [], bytes_column="jpeg", id_column="key")
    assert [(r.image_id, r.member) for r in rows] == [("k#1", "row=0"), ("k%2", "row=1")]
    by_id = [read_image(str(table), "parquet", r.image_id, bytes_column="jpeg", id_column="key") for r in rows]
    assert by_id == [a, b] == [r.data for r in rows]


def test_reading_back_what_is_not_there(tmp_path: Path) -> None:
    a = photo_bytes(16, 24, fmt="PNG")
    shard, table, plain = tmp_path / "s.tar", tmp_path / "t.parquet", tmp_path / "a.png"
    shard.write_bytes(tar_bytes([("a.png", a)]))
    pq.write_table(pa.table({"image": [a], "key": ["k"]}), table)
    plain.write_bytes(a)
    with pytest.raises(FileNotFoundError, match=r"'b\.png' not found"):
        read_image(str(shard), "tar", "b.png")
    with pytest.raises(FileNotFoundError, match="no row with key == 'j'"):
        read_image(str(table), "parquet", "j", id_column="key")
    with pytest.raises(IndexError, match="no row 1"):
        read_image(str(table), "parquet", "row=1")
    with pytest.raises(ValueError, match="no id_column"):
        read_image(str(table), "parquet", "k")
    with pytest.raises(ValueError, match="has no member"):
        read_image(str(plain), "file", "row=0")
    with pytest.raises(ValueError, match="unknown input kind 'zip'"):
        read_ref(str(plain), "zip", [], bytes_column="image", id_column=None)


def test_a_tar_member_whose_name_is_not_utf8_is_read_under_an_escaped_name(tmp_path: Path) -> None:
    """A Latin-1 member name (an old tool's tar): its row gets a valid id (``caf\\xe9.png``), Arrow takes it, and
    the member is read back by it; before, the id held a surrogate and failed the whole shard."""
    import io
    import tarfile

    image = photo_bytes(40, 48, seed=3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("café.png")
        info.size = len(image)
        tar.addfile(info, io.BytesIO(image))
    assert "caf\xe9.png".encode("latin-1") in buffer.getvalue()  # the name's byte really is not UTF-8
    path = tmp_path / "old.tar"
    path.write_bytes(buffer.getvalue())
    (row,) = read_ref(str(path), "tar", [], bytes_column="image", id_column=None)
    assert row.error == "" and row.member == "caf\\xe9.png" and row.data == image
    assert pa.array([row.image_id, row.member]).to_pylist() == [row.image_id, row.member]
    assert read_image(str(path), "tar", row.member) == image
