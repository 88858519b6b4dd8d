"""Resume and de-duplication at the ref level: committed files, members of a partly committed tar shard and
repeated manifest lines are each done once, and the driver never reads the committed image ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.inputs.readers import read_refs
from tests.pipeline.committed_parts import FAKE_WIDTH, commit_by_hand
from tests.pipeline.images import photo_bytes, tar_bytes


def _config(inputs: tuple[str, ...], output: Path) -> JobConfig:
    return JobConfig(
        input=InputConfig(inputs),
        output=str(output),
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(batch_size=4, device="cpu", rows_per_file=3, max_actors=1),
    )


def test_resume_mixes_files_a_partly_committed_shard_and_a_repeating_manifest(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.run import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    files = [folder / f"f{i}.jpg" for i in range(4)]
    for i, path in enumerate(files):
        path.write_bytes(photo_bytes(48, 64, seed=50 + i))
    shard = tmp_path / "shards" / "shard-000.tar"
    shard.parent.mkdir()
    shard.write_bytes(
        tar_bytes([(f"s{i}.jpg", photo_bytes(64, 48, seed=60 + i)) for i in range(3)] + [("s1.cls", b"3")])
    )
    listed = tmp_path / "listed.jpg"
    listed.write_bytes(photo_bytes(50, 50, seed=70))
    manifest = tmp_path / "manifest.txt"  # repeats a line, and a file that the folder lists too
    manifest.write_text(f"{listed}\n{files[1]}\n{listed}\n\n{listed}\n")
    inputs = (str(folder), str(shard), str(manifest))
    output = tmp_path / "out"
    committed = [(str(files[0]), str(files[0])), (f"{shard}#s1.jpg", str(shard)), (str(listed), str(listed))]
    commit_by_hand(output, committed)

    summary = run_job(_config(inputs, output), show_progress=False)

    expected = {*map(str, files), *(f"{shard}#s{i}.jpg" for i in range(3)), str(listed)}
    images = pads.dataset(str(output / "images"), format="parquet").to_table().to_pylist()
    counts = Counter(r["image_id"] for r in images)
    assert set(counts) == expected and max(counts.values()) == 1, counts
    redone = {r["image_id"] for r in images if r["width"] == FAKE_WIDTH}
    assert redone == {i for i, _ in committed}  # the committed rows were skipped, not done again
    assert (summary.images_ok, summary.images_error, summary.skipped_committed) == (5, 0, 3)

    # Re-run with everything committed, with the driver's Parquet readers disabled: the resume filter runs
    # on Ray workers, the driver lists part names and never reads the ids inside them.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the driver read a Parquet table: {args[:1]}")

    for name in ("read_table", "read_pandas"):
        monkeypatch.setattr(pq, name, refuse)
    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, refuse)
    monkeypatch.setattr(pads, "dataset", refuse)
    # and with the aggregations over 3 partitions (a small plan gets 1: `shuffle_partitions`)
    monkeypatch.setattr("pipeline.exactly_once.resume_executors.shuffle_partitions", lambda inputs, committed: 3)
    again = run_job(_config(inputs, output), show_progress=False)
    monkeypatch.undo()
    assert (again.images_ok, again.images_error, again.skipped_committed) == (0, 0, len(expected))
    ids = pads.dataset(str(output / "images"), format="parquet").to_table(columns=["image_id"])
    assert sorted(ids.column("image_id").to_pylist()) == sorted(expected)


def test_read_refs_leaves_out_skipped_members_and_repeated_ids_of_a_shard(tmp_path: Path) -> None:
    """Committed members (``skip``) are not emitted; an id repeated inside one Parquet shard is emitted once, its
    repeat is an error row under the row's own id."""
    shard = tmp_path / "ids.parquet"
    data = [photo_bytes(20, 20, seed=i) for i in range(4)]
    pq.write_table(pa.table({"key": ["p1", "p2", "p2", "p3"], "image": data}), shard)
    tar = tmp_path / "t.tar"
    tar.write_bytes(tar_bytes([("a.jpg", data[0]), ("b.jpg", data[1])]))
    rows = read_refs(
        {"uri": [str(shard), str(tar)], "kind": ["parquet", "tar"], "skip": [["row=3"], ["a.jpg"]]},
        bytes_column="image",
        id_column="key",
    )
    assert list(rows["image_id"]) == ["p1", "p2", f"{shard}#row=2", f"{tar}#b.jpg"]
    assert list(rows["member"]) == ["row=0", "row=1", "row=2", "b.jpg"]
    assert rows["data"][1] == data[1]  # the first of the repeated rows
    assert rows["error"][2] == "repeated image id 'p2' in this shard (its first row is kept)"
    assert list(rows["error"][[0, 1, 3]]) == ["", "", ""]


def test_an_unreadable_shard_whose_error_row_is_committed_gets_no_second_one(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 64)
    fresh = read_refs({"uri": [str(broken)], "kind": ["tar"]}, bytes_column="image", id_column=None)
    assert list(fresh["image_id"]) == [f"{broken}#"] and list(fresh["member"]) == [""]
    assert fresh["error"][0].startswith("unreadable: not a tar archive") and not fresh["retryable"][0]
    again = read_refs({"uri": [str(broken)], "kind": ["tar"], "skip": [[""]]}, bytes_column="image", id_column=None)
    assert list(again["image_id"]) == []


def test_shuffle_partitions_grow_with_the_rows_up_to_the_cluster_cpus(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.exactly_once.resume_executors import (
        MANIFEST_BYTES_PER_LINE,
        ROWS_PER_SHUFFLE_PARTITION,
        shuffle_partitions,
    )
    from pipeline.inputs.sources import ResolvedInputs

    one_ref = [{"uri": "a.jpg", "kind": "file", "size": 1, "version": "1"}]
    assert shuffle_partitions(ResolvedInputs(one_ref, []), 0) == 1
    assert shuffle_partitions(ResolvedInputs(one_ref, []), ROWS_PER_SHUFFLE_PARTITION) == 2  # 250,001 rows
    manifest = tmp_path / "m.txt"
    manifest.write_bytes(b"x" * (MANIFEST_BYTES_PER_LINE * ROWS_PER_SHUFFLE_PARTITION * 2))  # ~500 k lines
    assert shuffle_partitions(ResolvedInputs([], [str(manifest)]), 0) == 2
    assert shuffle_partitions(ResolvedInputs([], [str(manifest)]), 10**9) == 4  # the session's 4 CPUs
    assert shuffle_partitions(ResolvedInputs([], [str(tmp_path / "gone.txt")]), 0) == 4  # unknown size: large
    listing = tmp_path / "m.parquet"  # a Parquet manifest counts its rows (it compresses far below 32 B a row)
    pq.write_table(pa.table({"uri": [f"s3://b/{i:09d}.jpg" for i in range(ROWS_PER_SHUFFLE_PARTITION + 1)]}), listing)
    assert listing.stat().st_size < ROWS_PER_SHUFFLE_PARTITION * MANIFEST_BYTES_PER_LINE
    assert shuffle_partitions(ResolvedInputs([], [str(listing)]), 0) == 2


def test_demo_weights_are_recorded_as_synthetic_and_old_auto_records_still_match() -> None:
    """`settings.weights_sha256` names the demo weights truthfully ("synthetic", also when `--weights auto`
    fell back to them); an output whose record says "auto" (written so before) resumes with the demo weights,
    and not with a real checkpoint."""
    from pipeline.exactly_once.run_records import SettingsChanged, check_settings, model_settings

    auto = JobConfig(InputConfig(("in/",)), "out/")
    explicit = JobConfig(InputConfig(("in/",)), "out/", model=ModelSpec(weights="synthetic"))
    settings = model_settings(auto, "")
    assert settings["weights_sha256"] == "synthetic" == model_settings(explicit, "")["weights_sha256"]
    old = [{"run_id": "old", "settings": {**settings, "weights_sha256": "auto"}}]
    check_settings(old, settings, allow=False)  # no SettingsChanged
    with pytest.raises(SettingsChanged, match="weights_sha256='synthetic'"):
        check_settings(old, model_settings(auto, "ab" * 32), allow=False)
