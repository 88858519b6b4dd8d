"""`Output`: one normalisation of an output's root (`locate`), one spelling of every layout entry, what lies
under it."""

from __future__ import annotations

from pathlib import Path

from pipeline.exactly_once.output_paths import Output, locate


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


def test_resolve_keeps_an_output_resolved_once_and_locate_is_the_one_normalisation(tmp_path: Path) -> None:
    out = Output.of(f"file://{tmp_path}/out/")
    assert Output.resolve(out) is out
    assert Output.resolve(str(tmp_path / "out")).root == out.root
    assert locate(f"file://{tmp_path}/coco/") == (out.fs, f"{tmp_path}/coco")


def test_holds_what_a_listing_finds_under_the_output(tmp_path: Path, s3_env: dict[str, str]) -> None:
    tmp_path = tmp_path.resolve()
    (tmp_path / "real" / "out").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    out = Output.of(str(tmp_path / "link" / "out"))  # a root through a symbolic link: listings give the real path
    fs = out.fs
    assert out.holds(fs, f"{tmp_path}/real/out") and out.holds(fs, f"{tmp_path}/real/out/images/p.parquet")
    assert not out.holds(fs, f"{tmp_path}/real/out-of-band.jpg") and not out.holds(fs, f"{tmp_path}/real")
    s3 = Output.of("s3://bucket/runs/r50")
    assert s3.holds(s3.fs, "bucket/runs/r50/images/p.parquet") and not s3.holds(s3.fs, "bucket/runs/r500/x.jpg")
    assert not s3.holds(fs, "bucket/runs/r50/images/p.parquet")  # another kind of filesystem
