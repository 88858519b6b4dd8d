"""Listing and reading inputs: every input gets a row, a URI means one file however it is spelled, existing
paths are taken literally, symbolic links are followed, the output is never listed, and a bad Parquet input is
one clear error up front (or an error row) instead of a failed job."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.inputs.ids import file_id, member_id
from pipeline.inputs.readers import read_refs
from pipeline.inputs.sources import InputError, manifest_base, manifest_rows, resolve_inputs
from tests.pipeline.images import photo_bytes, tar_bytes


def _read(uris: list[str], kind: str = "file", **options: object) -> dict[str, np.ndarray]:
    batch = {"uri": np.array(uris, dtype=object), "kind": np.array([kind] * len(uris), dtype=object)}
    return read_refs(batch, bytes_column=options.get("bytes_column", "image"), id_column=options.get("id_column"))


def test_a_tar_cut_short_gives_its_whole_members_and_an_error_row_for_the_rest(tmp_path: Path) -> None:
    images = [(f"s{i}.jpg", photo_bytes(20, 20, seed=i)) for i in range(3)]
    whole = tar_bytes(images)
    header_of_s2 = 2 * (512 + 1024)  # each member: a 512-byte header and its data padded to 512
    assert whole[header_of_s2 : header_of_s2 + 6] == b"s2.jpg"
    cases = {"at_a_header": whole[:header_of_s2], "inside_a_header": whole[: header_of_s2 + 100]}
    for name, data in cases.items():
        shard = tmp_path / f"{name}.tar"
        shard.write_bytes(data)
        rows = _read([str(shard)], kind="tar")
        assert list(rows["member"]) == ["s0.jpg", "s1.jpg", ""], name
        assert list(rows["image_id"]) == [f"{shard}#s0.jpg", f"{shard}#s1.jpg", f"{shard}#"]
        assert rows["error"][2].startswith("truncated tar") and "after member s1.jpg" in rows["error"][2]
        assert list(rows["error"][:2]) == ["", ""] and rows["data"][1] == images[1][1]
    shard = tmp_path / "whole.tar"
    shard.write_bytes(whole)
    assert list(_read([str(shard)], kind="tar")["error"]) == ["", "", ""]  # a whole tar: no error row


def test_a_manifest_names_one_file_however_it_is_spelled(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    image = folder / "x.jpg"
    spellings = [str(image), f"file://{image}", f"{folder}//x.jpg", "./x.jpg", "../data/x.jpg", "x.jpg"]
    rows = manifest_rows({"text": np.array([*spellings, "", "# a comment"], dtype=object)}, base=str(folder))
    assert set(rows["uri"]) == {str(image)} and len(rows["uri"]) == len(spellings)
    s3 = manifest_rows({"text": np.array(["a/../b.jpg", "s3://bkt//c/./d.jpg"], dtype=object)}, base="s3://bkt/m")
    assert list(s3["uri"]) == ["s3://bkt/m/b.jpg", "s3://bkt/c/d.jpg"]
    assert manifest_base(str(tmp_path / "list.txt")) == str(tmp_path)
    assert manifest_base("s3://bkt/lists/list.txt") == "s3://bkt/lists"


def test_existing_paths_are_literal_and_symbolic_links_are_followed(tmp_path: Path) -> None:
    literal = tmp_path / "data[1]"  # a glob character class if taken as a pattern
    literal.mkdir()
    (literal / "a.jpg").write_bytes(photo_bytes(10, 10))
    assert [r["uri"] for r in resolve_inputs(InputConfig((str(literal),))).refs] == [str(literal / "a.jpg")]

    real = tmp_path / "real"
    real.mkdir()
    (real / "b.jpg").write_bytes(photo_bytes(10, 10))
    top = tmp_path / "top"
    top.mkdir()
    (top / "c.jpg").write_bytes(photo_bytes(10, 10))
    os.symlink(real, top / "linked")  # a symlinked subfolder
    os.symlink(top, real / "loop")  # and a loop back to the top
    os.symlink(tmp_path / "gone.jpg", top / "broken.jpg")
    refs = resolve_inputs(InputConfig((str(top),))).refs
    uris = sorted(r["uri"] for r in refs)
    assert uris == sorted([str(top / "c.jpg"), str(top / "linked" / "b.jpg"), str(top / "broken.jpg")])
    rows = _read([str(top / "broken.jpg")])
    assert rows["error"][0].startswith("not found:") and not rows["retryable"][0]  # a row, not silence


def test_the_output_is_never_listed_as_an_input(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo_bytes(10, 10))
    (tmp_path / "out" / "images").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "images" / "part-1.parquet")
    (tmp_path / "out-of-band.jpg").write_bytes(photo_bytes(10, 10))  # same prefix, not inside the output
    refs = resolve_inputs(InputConfig((str(tmp_path),)), output=str(tmp_path / "out")).refs
    assert sorted(r["uri"] for r in refs) == [str(tmp_path / "a.jpg"), str(tmp_path / "out-of-band.jpg")]
    with pytest.raises(InputError, match="left out"):
        resolve_inputs(InputConfig((str(tmp_path / "out"),)), output=str(tmp_path / "out"))


def test_ids_of_files_and_shard_members_never_meet() -> None:
    assert file_id("/d/big.tar#s1.jpg") == "/d/big.tar%23s1.jpg" != member_id("/d/big.tar", "s1.jpg")
    assert file_id("/d/100%.jpg") == "/d/100%25.jpg" != file_id("/d/100%25.jpg")  # escaping is one to one
    assert file_id("s3://b/plain.jpg") == "s3://b/plain.jpg"  # the common case is the URI itself


def test_parquet_inputs_with_the_wrong_columns(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"image": [photo_bytes(10, 10)], "key": ["k0"]}), good)
    with pytest.raises(
        InputError, match=r"no column 'jpeg' with image bytes \(columns: image, key; see --bytes-column"
    ):
        resolve_inputs(InputConfig((str(good),), bytes_column="jpeg"))
    with pytest.raises(InputError, match="no id column 'id'"):
        resolve_inputs(InputConfig((str(good),), id_column="id"))
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"image": ["not bytes"]}), strings)
    with pytest.raises(InputError, match="holds string, not image bytes"):
        resolve_inputs(InputConfig((str(strings),)))
    # A bad shard among good inputs (beyond those checked up front) is an error row; the rest are read.
    rows = _read([str(strings), str(good)], kind="parquet")
    assert list(rows["image_id"]) == [f"{strings}#", f"{good}#row=0"]
    assert "holds string" in rows["error"][0] and rows["error"][1] == ""
