"""Readers see whole snapshots during jobs and re-runs, and an older snapshot is the output as a run left it.

Three runs on one output: run 1 over five photos, run 2 after two of them changed and one was added (it retracts
their rows: copy on write), run 3 after one more changed. A reader thread queries the output in a loop during all
three; the driver also queries at every commit point (each part) and after each part a retraction rewrote, so
that queries provably run while parts are in flight and while committed parts are being replaced (no race with
the job's speed). Every query must see one snapshot: images and segments of it, ``num_segments`` equal to the
segment rows of each image, no repeated key. Then the snapshots of runs 1 and 2 must give exactly the rows of
copies of the output taken right after those runs.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig, SnapshotConfig
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.reading.duckdb_views import connect
from pipeline.reading.output_tables import open_table, pin, snapshot_files
from tests.pipeline.images import photo_bytes

pytestmark = pytest.mark.slow


def _config(folder: Path, output: Path) -> JobConfig:
    return JobConfig(
        input=InputConfig((str(folder),)),
        output=str(output),
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(batch_size=2, device="cpu", rows_per_file=2, max_actors=1),
        snapshots=SnapshotConfig(snapshot_every_s=0.0),  # a snapshot at every part
    )


def consistency_problems(output: Any) -> tuple[int | None, list[str]]:
    """(the snapshot read, what is wrong with the view of it): an empty list for a consistent view."""
    con = connect(output)
    try:
        read = con.execute("SELECT seq FROM snapshots WHERE read").fetchall()
        checks = {
            "repeated image ids": "SELECT count(*) - count(DISTINCT image_id) FROM images",
            "repeated segments": "SELECT count(*) - count(DISTINCT (image_id, segment_id)) FROM segments",
            "segments without their image": "SELECT count(*) FROM segments WHERE image_id NOT IN "
            "(SELECT image_id FROM images)",
            "num_segments unequal to the segment rows": "SELECT count(*) FROM images i LEFT JOIN (SELECT image_id, "
            "count(*) AS n FROM segments GROUP BY 1) s USING (image_id) WHERE coalesce(s.n, 0) != i.num_segments",
        }
        problems = [f"{name}: {n}" for name, sql in checks.items() if (n := con.execute(sql).fetchone()[0])]
    finally:
        con.close()
    return (read[0][0] if read else None), problems


def _glob_problems(output: Path) -> list[str]:
    """The same checks on the folders globbed, as readers did before snapshots."""
    images = pads.dataset(str(output / "images"), format="parquet").to_table(columns=["image_id"])
    ids = images.column("image_id").to_pylist()
    return [f"repeated image ids: {len(ids) - len(set(ids))}"] if len(ids) != len(set(ids)) else []


def _rows(output: Any, table: str) -> list[dict[str, Any]]:
    rows = open_table(output, table).to_table().to_pylist()  # type: ignore[arg-type]
    return sorted(rows, key=lambda r: (r["image_id"], r.get("segment_id", 0)))


def test_readers_see_whole_snapshots_and_older_snapshots_are_the_output_as_a_run_left_it(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.run import run_job

    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(5):
        (folder / f"p{i}.jpg").write_bytes(photo_bytes(48, 64, seed=i))

    seen: list[tuple[int | None, list[str]]] = []  # the driver's checks, at commit points and mid-retraction
    stop, looped = threading.Event(), []

    def reader_loop() -> None:
        while not stop.wait(0.05):
            if (output / "_snapshots").is_dir():
                looped.append(consistency_problems(str(output)))

    def check_at_each_part(row: dict[str, Any]) -> None:
        seen.append(consistency_problems(str(output)))

    real_retract = OutputCommitter._retract_part
    mid_retraction: list[list[str]] = []

    def retract_then_check(self: OutputCommitter, name: str, group: Any) -> Any:
        removed = real_retract(self, name, group)
        seen.append(consistency_problems(str(output)))  # the rest written, the old part still in the folder
        mid_retraction.append(_glob_problems(output))
        return removed

    monkeypatch.setattr(OutputCommitter, "_retract_part", retract_then_check)
    reader = threading.Thread(target=reader_loop, daemon=True)
    reader.start()
    try:
        first = run_job(_config(folder, output), show_progress=False, on_part=check_at_each_part)
        shutil.copytree(output, tmp_path / "after1")
        for i in (1, 2):  # changed: redone, their rows retracted
            (folder / f"p{i}.jpg").write_bytes(photo_bytes(56, 72, seed=10 + i))
        (folder / "p5.jpg").write_bytes(photo_bytes(48, 64, seed=5))
        second = run_job(_config(folder, output), show_progress=False, on_part=check_at_each_part)
        shutil.copytree(output, tmp_path / "after2")
        (folder / "p3.jpg").write_bytes(photo_bytes(60, 60, seed=13))
        third = run_job(_config(folder, output), show_progress=False, on_part=check_at_each_part)
    finally:
        stop.set()
        reader.join()

    assert (first.images_ok, second.images_ok, third.images_ok) == (5, 3, 1)
    assert second.redone == {"changed": 2} and third.redone == {"changed": 1}
    assert len(seen) >= 3 + 3 + 1 and all(problems == [] for _, problems in seen), seen
    assert looped and all(problems == [] for _, problems in looped), looped
    # the retraction's rest was written next to the part it replaces: globbing saw p0 twice, the snapshot once
    assert mid_retraction and mid_retraction[0] == ["repeated image ids: 1"]

    # time travel: each run's snapshot is exactly the output as that run left it (a copy read by globbing its
    # folders: run 1 left no older versions; run 2's copy read through its own latest snapshot)
    out = str(output)
    after1, after2 = str(tmp_path / "after1"), str(tmp_path / "after2")
    assert _glob_problems(tmp_path / "after1") == []
    for table in ("images", "segments"):
        globbed = sorted(
            pads.dataset(f"{after1}/{table}", format="parquet").to_table().to_pylist(),
            key=lambda r: (r["image_id"], r.get("segment_id", 0)),
        )
        assert _rows(pin(out, as_of_run=first.run_id), table) == globbed
        assert _rows(pin(out, as_of_run=second.run_id), table) == _rows(after2, table)
    latest = _rows(pin(out), "images")
    assert sorted(r["image_id"] for r in latest) == sorted(str(folder / f"p{i}.jpg") for i in range(6))
    by_id = {r["image_id"]: r["run_id"] for r in latest}
    assert by_id[str(folder / "p3.jpg")] == third.run_id and by_id[str(folder / "p1.jpg")] == second.run_id
    assert by_id[str(folder / "p0.jpg")] == first.run_id
    assert set(map(Path, snapshot_files(out)["images"])) <= set((output / "images").iterdir())
