"""Run records are read one way (`read_run_records`): no folder, corrupt or foreign records, and the readers'
views of it (`latest_run_record`, `run_weights`) behave alike, locally and on S3."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest

from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.run_records import latest_run_record, read_run_records, run_weights


def _record(run_id: str, weights: str) -> dict[str, object]:
    return {"run_id": run_id, "config": {"input": {"bytes_column": run_id}}, "weights": {"uri": weights}}


def test_an_output_without_records_has_none(tmp_path: Path) -> None:
    for uri in (str(tmp_path / "nothing"), str(tmp_path)):  # no such folder; a folder without `_runs/`
        out = Output.of(uri)
        assert (read_run_records(out), latest_run_record(out), run_weights(out)) == ([], {}, {})


def test_records_oldest_first_and_the_views_of_them(tmp_path: Path) -> None:
    runs = tmp_path / "_runs"
    runs.mkdir()
    (runs / "20261207-2300-b.json").write_text(json.dumps(_record("20261207-2300-b", "synthetic")))
    (runs / "20261207-2200-a.json").write_text(json.dumps(_record("20261207-2200-a", "s3://b/w.pth")))
    (runs / "notes.txt").write_text("not a record")
    out = Output.of(str(tmp_path))
    assert [r["run_id"] for r in read_run_records(out)] == ["20261207-2200-a", "20261207-2300-b"]
    assert latest_run_record(out)["config"] == {"input": {"bytes_column": "20261207-2300-b"}}
    assert run_weights(out) == {"20261207-2200-a": "s3://b/w.pth", "20261207-2300-b": "synthetic"}


def test_unreadable_records_are_left_out_with_a_warning_by_every_view(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "_runs"
    runs.mkdir()
    (runs / "1-good.json").write_text(json.dumps(_record("1-good", "s3://b/w.pth")))
    (runs / "2-no-id.json").write_text(json.dumps({"weights": {"uri": "synthetic"}}))
    (runs / "3-torn.json").write_text('{"run_id": "3-torn", "weig')  # a torn write
    (runs / "4-list.json").write_text("[1, 2]")  # JSON, but no record
    (runs / "5-binary.json").write_bytes(b"\xff\xfe\x00garbage")
    out = Output.of(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.exactly_once.run_records"):
        records = read_run_records(out)
    assert [r["run_id"] for r in records] == ["1-good", "2-no-id"]  # a record without run_id: its file name's
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in warned for name in ("3-torn.json", "4-list.json", "5-binary.json"))
    assert "1-good.json" not in warned
    # the views see exactly these records: the latest readable one, the weights of each
    assert latest_run_record(out) == {"run_id": "2-no-id", "weights": {"uri": "synthetic"}}
    assert run_weights(out) == {"1-good": "s3://b/w.pth", "2-no-id": "synthetic"}


def test_records_on_s3_are_read_the_same_way(s3_env: dict[str, str]) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"records-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    out = Output.of(f"s3://{bucket}/run/")
    assert (read_run_records(out), latest_run_record(out), run_weights(out)) == ([], {}, {})
    fs.pipe_file(f"{bucket}/run/_runs/a.json", json.dumps(_record("a", "synthetic")).encode())
    fs.pipe_file(f"{bucket}/run/_runs/b.json", b"{torn")
    assert [r["run_id"] for r in read_run_records(out)] == ["a"]  # listed afresh: the record written since shows
    assert latest_run_record(out)["run_id"] == "a" and run_weights(out) == {"a": "synthetic"}
