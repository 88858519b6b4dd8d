"""`Output`: one normalisation of an output's root, one spelling of every layout entry."""

from __future__ import annotations

from pathlib import Path

from pipeline.output_paths import Output


def test_a_root_is_normalised_once_whatever_its_spelling(tmp_path: Path) -> None:
    spellings = [str(tmp_path / "out"), str(tmp_path / "out") + "/", f"file://{tmp_path}/out"]
    assert {Output.of(s).root for s in spellings} == {str(tmp_path / "out")}
    out = Output.of(str(tmp_path / "out") + "/")
    assert out.part("images", "part-1.parquet") == f"{tmp_path}/out/images/part-1.parquet"
    assert (out.lease, out.success) == (f"{tmp_path}/out/_lease.json", f"{tmp_path}/out/_SUCCESS")
    assert out.run_record("r1") == f"{tmp_path}/out/_runs/r1.json" and out.runs == f"{tmp_path}/out/_runs"
    assert out.quarantine("r1", "segments") == f"{tmp_path}/out/_quarantine/r1/segments"


def test_an_object_store_root_has_no_protocol_and_no_trailing_slash(s3_env: dict[str, str]) -> None:
    out = Output.of("s3://bucket/runs/r50/")
    assert out.root == "bucket/runs/r50" and out.uri == "s3://bucket/runs/r50/"
    assert out.table("segments") == "bucket/runs/r50/segments"
    assert "s3" in out.fs.protocol
