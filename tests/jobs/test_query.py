"""`panoptic-flow query`: DuckDB views over real Parquet, checked against pyarrow over the same files."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from jobs.query import DOG_OVER_5_PERCENT, connect, format_rows, main, run_query
from model.categories import category_name
from tests.synthetic_output import SynthImage, make_images, write_output


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthImage]]:
    root = tmp_path_factory.mktemp("query")
    images = make_images(root / "inputs")
    write_output(root / "out", images)
    return root / "out", images


def _pyarrow_segments(output: Path) -> ds.Dataset:
    """The segment files read directly by pyarrow, independently of pipeline.reading.output_tables."""
    files = sorted(str(p) for p in (output / "segments").glob("shard=*/*.parquet"))
    return ds.dataset(files, format="parquet")


def test_category_counts_equal_a_pyarrow_group_by(synthetic: tuple[Path, list[SynthImage]]) -> None:
    output, _ = synthetic
    expected = (
        _pyarrow_segments(output)
        .to_table()
        .group_by("category_id")
        .aggregate([("segment_id", "count"), ("area", "sum"), ("image_id", "count_distinct")])
    )
    expected_rows = {
        r["category_id"]: (r["segment_id_count"], r["area_sum"], r["image_id_count_distinct"])
        for r in expected.to_pylist()
    }
    con = connect(str(output))
    _, rows = run_query(con, "SELECT category_id, segments, total_area, images FROM category_counts")
    assert {r[0]: r[1:] for r in rows} == expected_rows
    assert len(expected_rows) == 5  # person, dog, cat, sky, grass


def test_segment_counts_per_category_name(synthetic: tuple[Path, list[SynthImage]]) -> None:
    output, images = synthetic
    con = connect(str(output))
    _, rows = run_query(con, "SELECT category, count(*) FROM segments GROUP BY category")
    assert dict(rows) == Counter(s.category for i in images for s in i.segments)
    assert dict(rows)["cat"] == 2


def test_image_categories_view(synthetic: tuple[Path, list[SynthImage]]) -> None:
    output, images = synthetic
    con = connect(str(output))
    columns, rows = run_query(con, "SELECT * FROM image_categories ORDER BY image_id")
    by_id = {r[columns.index("image_id")]: dict(zip(columns, r)) for r in rows}
    ok = [i for i in images if i.status == "ok"]
    assert set(by_id) == {i.image_id for i in ok}  # the failed image is not listed
    for image in ok:
        row = by_id[image.image_id]
        assert row["categories"] == dict(Counter(s.category for s in image.segments))
        assert row["category_list"] == sorted({s.category for s in image.segments})
        assert row["num_segments"] == len(image.segments)
        assert (row["width"], row["height"]) == (image.width, image.height)
    _, cats = run_query(con, "SELECT image_id FROM image_categories WHERE categories['cat'] = 2")
    assert [c[0] for c in cats] == [images[2].image_id]


def test_dog_larger_than_five_percent_of_the_frame(synthetic: tuple[Path, list[SynthImage]]) -> None:
    output, images = synthetic
    # pyarrow oracle: dog segments whose area exceeds 5 % of width*height
    sizes = {i.image_id: i.width * i.height for i in images if i.status == "ok"}
    dogs = _pyarrow_segments(output).to_table(filter=pc.field("category") == "dog").to_pylist()
    expected = sorted({d["image_id"] for d in dogs if d["area"] > 0.05 * sizes[d["image_id"]]})
    assert expected == [images[0].image_id]  # the 25 % dog, not the 1.25 % one
    _, rows = run_query(connect(str(output)), DOG_OVER_5_PERCENT)
    assert [r[0] for r in rows] == expected


def test_cli_formats(synthetic: tuple[Path, list[SynthImage]], capsys: pytest.CaptureFixture[str]) -> None:
    output, _ = synthetic
    sql = "SELECT category, segments FROM category_counts ORDER BY category"
    assert main([str(output), sql, "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["category", "segments"]
    assert dict(rows[1:]) == {"cat": "2", "dog": "2", "grass-merged": "1", "person": "2", "sky-other-merged": "1"}

    assert main([str(output), sql, "--format", "json", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"category": "cat", "segments": 2},
        {"category": "dog", "segments": 2},
    ]

    assert main([str(output), "SELECT categories FROM image_categories WHERE num_segments = 0"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].strip() == "categories" and table[2].strip() == "{}" and table[-1] == "(1 row)"

    assert main([str(output), "SELECT * FROM no_such_view"]) == 2  # an SQL error is the user's mistake
    assert "no_such_view" in capsys.readouterr().err


def test_format_rows_table_alignment() -> None:
    text = format_rows(["a", "long_name"], [(1, None), (22.5, [1, 2])], "table")
    assert text.splitlines() == [
        "a    | long_name",
        "-----+----------",
        "1    | NULL     ",
        "22.5 | [1, 2]   ",
        "(2 rows)",
    ]


@pytest.fixture
def s3_output(synthetic: tuple[Path, list[SynthImage]], s3_env: dict[str, str]) -> Iterator[str]:
    """The synthetic output uploaded to the session's moto S3 server on 127.0.0.1; yields its s3:// URI."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"query-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    output, _ = synthetic
    for path in output.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/run/{path.relative_to(output).as_posix()}")
    yield f"s3://{bucket}/run"


def test_queries_over_s3_equal_local_ones(synthetic: tuple[Path, list[SynthImage]], s3_output: str) -> None:
    output, _ = synthetic
    for sql in (DOG_OVER_5_PERCENT, "SELECT * FROM category_counts ORDER BY category_id"):
        assert run_query(connect(s3_output), sql) == run_query(connect(str(output)), sql)
    _, rows = run_query(connect(s3_output), "SELECT count(*) FROM image_categories")
    assert rows == [(4,)]


def test_a_mistyped_output_is_an_error_not_zero_rows(
    synthetic: tuple[Path, list[SynthImage]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output, _ = synthetic
    assert main([f"{output}x", "SELECT count(*) FROM images"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no output at '{output}x': no such folder" in err
    # an existing folder that is no output (here: the inputs)
    assert main([str(output.parent / "inputs"), "SELECT count(*) FROM images"]) == 2
    assert "has no images/, segments/, _runs/ or _lease.json" in capsys.readouterr().err
    # a run in flight (only its lease so far) is an output with no rows yet
    (tmp_path / "_lease.json").write_text("{}")
    assert main([str(tmp_path), "SELECT count(*) AS n FROM images", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n0\n"


def test_category_counts_keep_ids_outside_the_table_apart(tmp_path: Path) -> None:
    """The segment rows name categories with `category_name`, as the pipeline writes them; ids 68 and 201
    (class slots outside the 133 COCO panoptic categories) get a row each, with a name of their own."""
    images = make_images(tmp_path / "inputs")
    for image, category_id in zip(images, (68, 201, 68)):
        image.segments[0].category_id = category_id
        image.segments[0].category = category_name(category_id)
    write_output(tmp_path / "out", images)
    _, rows = run_query(
        connect(str(tmp_path / "out")),
        "SELECT category_id, category, segments FROM category_counts WHERE category_id IN (68, 201) ORDER BY 1",
    )
    assert rows == [(68, "class_68", 2), (201, "class_201", 1)]
    _, names = run_query(
        connect(str(tmp_path / "out")), "SELECT count(DISTINCT category), count(*) FROM category_counts"
    )
    assert names[0][0] == names[0][1]  # one name per category id
