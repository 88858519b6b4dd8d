"""`bench.snapshot_cost` at 200 parts: what it times is what it claims (the snapshot read back lists exactly the
parts written, a delta is a fraction of the full snapshot, the snapshot and the glob list the same files, clean-up
deletes nothing), and ``FULL_EVERY`` is restored after an alternative. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

from bench.snapshot_cost import (
    alternatives,
    build_chain,
    cleanup_cost,
    create_part_files,
    part_names,
    read_cost,
    reader_cost,
    write_cost,
)
from pipeline.exactly_once import snapshots
from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.parts import part_run
from pipeline.exactly_once.snapshots import read_snapshot

PARTS = 200


def test_part_names_look_like_real_ones() -> None:
    names = part_names(3, start=7)
    assert len(set(names)) == 3
    for name in names:
        assert name.startswith("part-") and name.endswith(".parquet")
        assert len(name.split("-")[1]) == 24
        assert part_run(name) == "20261208T021200Z-a1b2c3"


def test_a_delta_is_a_fraction_of_the_full_snapshot(tmp_path: Path) -> None:
    result = write_cost(str(tmp_path), PARTS, repeats=1)
    size = result["bytes"]
    assert size["delta_1"] * 20 < size["full"]
    assert size["delta_1"] < size["delta_16"] < size["delta_256"]
    assert set(result["cpu"]) == {"delta_s", "copy_s", "changed_check_s"}
    last = read_snapshot(Output.of(str(tmp_path / "write-0")))
    assert last is not None and len(last.parts) == PARTS + 1 + 16 + 256


def test_the_worst_chain_reads_back_exactly_the_parts_written(tmp_path: Path) -> None:
    chain = build_chain(str(tmp_path / "chain"), PARTS, per_delta=2)
    assert snapshots.snapshot_seqs(chain.out) == list(range(1, 64))
    snapshots._folded.cache_clear()
    found = read_snapshot(chain.out)
    assert found is not None and found.seq == 63 and sorted(found.parts) == chain.names and len(chain.names) == PARTS
    read = read_cost(chain, repeats=1)
    assert (read["files_read"], read["parts"]) == (32, PARTS)
    assert read["bytes_read"] > read["full_bytes"] > read["delta_bytes"]

    create_part_files(chain)
    reader = reader_cost(chain, repeats=1)  # asserts the snapshot's list equals the glob's
    assert reader["parts"] == PARTS
    assert chain.out.fs.isdir(chain.out.snapshots)  # the log is back after the glob side
    cleanup = cleanup_cost(chain, repeats=1)  # asserts nothing was deleted
    assert cleanup["snapshots_kept"] == 63
    assert len(list(Path(chain.out.table("images")).iterdir())) == PARTS


def test_full_every_alternatives_restore_the_module_value(tmp_path: Path) -> None:
    before = snapshots.FULL_EVERY
    rows = alternatives(tmp_path, 2_000, repeats=1)
    assert before == snapshots.FULL_EVERY
    by_every = {row["full_every"]: row for row in rows}
    assert set(by_every) == {8, before, 128}
    assert [by_every[e]["worst_read_files"] for e in (8, before, 128)] == [8, before, 128]
    assert by_every[8]["bytes_per_commit"] > by_every[128]["bytes_per_commit"]
