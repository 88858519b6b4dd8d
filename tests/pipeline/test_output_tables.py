"""Opening an output: file selection, its tables, one image's rows, S3 (its run records: test_run_records.py)."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.run_records import latest_run_record
from pipeline.reading.output_tables import (
    NO_SNAPSHOT,
    OutputNotFoundError,
    check_output,
    open_table,
    read_image_rows,
    table_files,
)
from tests.synthetic_output import SynthImage, make_images, write_output


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthImage]]:
    root = tmp_path_factory.mktemp("outputs")
    images = make_images(root / "inputs")
    write_output(root / "out", images, run_config={"input": {"bytes_column": "jpeg"}})
    return root / "out", images


def test_table_files_skip_underscore_and_dot_files(synthetic: tuple[Path, list[SynthImage]]) -> None:
    output, _ = synthetic
    files, _ = table_files(str(output), "segments")
    assert [Path(f).relative_to(output).as_posix() for f in files] == [
        "segments/shard=0/part-0.parquet",
        "segments/shard=1/part-0.parquet",
    ]
    with pytest.raises(ValueError, match="table must be one of"):
        table_files(str(output), "masks")  # type: ignore[arg-type]


def test_open_table_reads_every_row_with_the_declared_columns(synthetic: tuple[Path, list[SynthImage]]) -> None:
    output, images = synthetic
    segments = open_table(str(output), "segments").to_table()
    assert "shard" not in segments.column_names  # folder names are not hive columns
    assert segments.num_rows == sum(len(i.segments) for i in images)
    assert Counter(segments["category"].to_pylist()) == Counter(s.category for i in images for s in i.segments)
    statuses = dict(
        zip(*open_table(str(output), "images").to_table(columns=["image_id", "status"]).to_pydict().values())
    )
    assert statuses == {i.image_id: i.status for i in images}


def test_open_table_of_a_missing_table_is_empty(tmp_path: Path) -> None:
    table = open_table(str(tmp_path / "nothing"), "images").to_table()
    assert table.num_rows == 0
    assert "status" in table.column_names


def test_the_latest_run_record(synthetic: tuple[Path, list[SynthImage]], tmp_path: Path) -> None:
    output, _ = synthetic
    assert latest_run_record(Output.of(str(output)))["config"] == {"input": {"bytes_column": "jpeg"}}
    assert latest_run_record(Output.of(str(tmp_path))) == {}


def test_check_output_gives_the_output_resolved_or_names_what_is_missing(
    synthetic: tuple[Path, list[SynthImage]], tmp_path: Path
) -> None:
    output, _ = synthetic
    out = Output.of(str(output) + "/")
    pinned = check_output(out)  # resolved once, and pinned: an output without snapshots is globbed
    assert (pinned.fs, pinned.root, pinned.at) == (out.fs, out.root, NO_SNAPSHOT) and check_output(pinned) is pinned
    assert check_output(str(output)) == Output(str(output), out.fs, out.root, NO_SNAPSHOT)
    with pytest.raises(OutputNotFoundError, match="no such folder or prefix"):
        check_output(str(tmp_path / "nothing"))
    with pytest.raises(OutputNotFoundError, match=r"it has no images/, segments/, _runs/ or _lease\.json"):
        check_output(str(tmp_path))


def test_read_image_rows(synthetic: tuple[Path, list[SynthImage]]) -> None:
    output, images = synthetic
    image_row, segments = read_image_rows(str(output), images[0].image_id)
    assert image_row is not None and (image_row["width"], image_row["height"]) == (40, 30)
    assert [s["segment_id"] for s in segments] == [0, 1, 2]
    assert read_image_rows(str(output), "nope.png") == (None, [])


def test_open_table_over_s3(synthetic: tuple[Path, list[SynthImage]], s3_env: dict[str, str]) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"outputs-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    output, _ = synthetic
    for path in output.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/run/{path.relative_to(output).as_posix()}")
    uri = f"s3://{bucket}/run"
    segments = open_table(uri, "segments").to_table()
    local = open_table(str(output), "segments").to_table()
    assert segments.sort_by([("image_id", "ascending"), ("segment_id", "ascending")]).equals(
        local.sort_by([("image_id", "ascending"), ("segment_id", "ascending")])
    )
    assert latest_run_record(Output.of(uri))["config"] == {"input": {"bytes_column": "jpeg"}}
    assert len(table_files(uri, "images")[0]) == 2


def test_synthetic_images_are_on_disk(synthetic: tuple[Path, list[SynthImage]]) -> None:
    _, images = synthetic
    pixels = np.asarray(Image.open(images[0].image_id))
    assert images[0].pixels is not None and np.array_equal(pixels, images[0].pixels)
