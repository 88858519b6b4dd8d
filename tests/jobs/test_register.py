"""`panoptic-flow register`: a snapshot of a real output (parts committed by the commit protocol, snapshots written by
its committer; no Ray) registered as Delta and as Iceberg tables, read back by each library row by row against the
snapshot; a re-run's snapshot moves the tables; a user's mistakes are one line and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from jobs.register import main
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease
from pipeline.reading.output_tables import open_table, pin
from pipeline.schema import RESULT_SCHEMA
from tests.pipeline.test_write_stage import _result

deltalake = pytest.importorskip("deltalake")
pytest.importorskip("pyiceberg")


def _run(output: Path, run_id: str, parts: list[list[str]]) -> None:
    """One run committing ``parts`` (image ids each), with its start and end snapshots, as a job's driver does."""
    with Lease.acquire(str(output), run_id) as lease:
        committer = OutputCommitter(str(output), run_id, lease=lease)
        committer.prepare()
        committer.snapshot("start")
        for ids in parts:
            rows = [_result(i, segments=len(i) % 3) for i in ids]
            row = committer.write_part(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
            assert row is not None
            committer.committed(row)
        committer.on_write_complete({})


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["image_id"], r.get("segment_id", 0)))


def _snapshot_rows(output: Path, table: str, **kwargs: Any) -> list[dict[str, Any]]:
    return _sorted(open_table(pin(str(output), **kwargs), table).to_table().to_pylist())  # type: ignore[arg-type]


def test_register_delta_and_iceberg_read_back_as_the_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLARS_ICEBERG_PLANNER", "pyiceberg")
    output = tmp_path / "out"
    _run(output, "r1", [["a.jpg", "bb.jpg"], ["ccc.jpg"]])
    assert main([str(output), "--format", "delta"]) == 0
    assert main([str(output), "--format", "iceberg"]) == 0
    printed = capsys.readouterr().out
    assert "registered snapshot 2 (run r1, 2 parts): segments: Delta version 0, images: Delta version 0" in printed
    assert "panoptic_flow.segments, panoptic_flow.images" in printed

    from pipeline.reading.lakehouse import iceberg_catalog

    def delta_rows(table: str, version: int | None = None) -> list[dict[str, Any]]:
        return _sorted(deltalake.DeltaTable(str(output / table), version=version).to_pyarrow_table().to_pylist())

    def iceberg_rows(table: str) -> list[dict[str, Any]]:
        from pipeline.exactly_once.output_paths import Output

        loaded = iceberg_catalog(Output.of(str(output))).load_table(f"panoptic_flow.{table}")
        return _sorted(loaded.scan().to_arrow().to_pylist())

    first = {t: _snapshot_rows(output, t) for t in ("segments", "images")}
    assert len(first["images"]) == 3 and len(first["segments"]) == 3  # a.jpg 2 segments, ccc.jpg 1 (len % 3)
    for table in ("segments", "images"):
        assert delta_rows(table) == first[table]
        assert iceberg_rows(table) == first[table]

    _run(output, "r2", [["dddd.jpg"]])  # a second run: its snapshot moves the tables on
    assert main([str(output), "--format", "delta"]) == 0
    assert main([str(output), "--format", "iceberg"]) == 0
    for table in ("segments", "images"):
        latest = _snapshot_rows(output, table)
        assert delta_rows(table) == latest != first[table]
        assert iceberg_rows(table) == latest
        assert delta_rows(table, version=0) == first[table]  # Delta time travel: run 1's snapshot

    assert main([str(output), "--format", "delta", "--as-of-run", "r1"]) == 2  # older than the one registered
    assert "an older snapshot (2) is not registered over it" in capsys.readouterr().err


def test_register_mistakes_are_one_line_and_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    _run(output, "r1", [["a.jpg"]])
    assert main([str(output), "--format", "delta", "--snapshot", "9"]) == 2
    assert main([str(output), "--format", "iceberg", "--as-of-run", "nope"]) == 2
    assert main([str(tmp_path / "nothing"), "--format", "delta"]) == 2
    legacy = tmp_path / "legacy"
    (legacy / "images").mkdir(parents=True)
    assert main([str(legacy), "--format", "delta"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(line.startswith("panoptic-flow register: error: ") for line in errors)
    assert "has no snapshot 9 (kept: 1..2)" in errors[0]
    assert "written by run 'nope'" in errors[1]
    assert "no output at" in errors[2]
    assert "has no snapshots yet" in errors[3] and "the first snapshot" in errors[3]
