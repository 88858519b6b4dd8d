"""The snapshot log (`pipeline.exactly_once.snapshots`) without Ray: snapshots read back as written through full
snapshots and deltas, which parts a starting run finds committed, two writers racing for one sequence number (local
and S3 on moto), a driver stalled past its lease, and a clean-up crashed between its steps."""

from __future__ import annotations

import contextlib
import json
import random
import threading
from pathlib import Path

import boto3
import pytest
import s3fs

from pipeline.exactly_once import snapshots
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease, LeaseLost
from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.parts import part_name
from pipeline.exactly_once.snapshots import (
    SnapshotConflict,
    SnapshotLog,
    SnapshotNotFound,
    clean_up,
    read_snapshot,
    snapshot_seqs,
)
from pipeline.schema import IMAGES_TABLE, SEGMENTS_TABLE


def _stats(rng: random.Random) -> tuple[int, int, int, int, int]:
    ok, error = rng.randint(0, 5), rng.randint(0, 2)
    return (ok, error, rng.randint(0, error), rng.randint(0, 40), rng.randint(100, 9000))


def _fresh_read(out: Output, seq: int | None = None, **kwargs: str) -> snapshots.Snapshot | None:
    snapshots._folded.cache_clear()  # read the files, not this process's memory of them
    return read_snapshot(out, seq, **kwargs)


def test_snapshots_read_back_as_written_through_full_snapshots_and_deltas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots, "FULL_EVERY", 4)
    out = Output.of(str(tmp_path / "out"))
    rng = random.Random(7)
    expected: dict[int, dict[str, tuple[int, ...]]] = {}
    runs: dict[int, str] = {}
    live: dict[str, tuple[int, int, int, int, int]] = {}
    log = SnapshotLog(out, "r1")
    log.open({})
    for step in range(11):
        if step == 5:  # a second run takes over the log where the first left it
            log = SnapshotLog(out, "r2")
            assert log.open({name: stats[4] for name, stats in live.items()}) == sorted(live)
            for name, stats in live.items():
                log.count(name, dict(zip(snapshots.STATS, stats)))
        for _ in range(rng.randint(0, 3)):  # parts committed
            name = part_name([f"img{rng.random()}"], log.run_id)
            live[name] = _stats(rng)
            log.add({"part": name, **dict(zip(snapshots.STATS, live[name]))})
        if live and rng.random() < 0.5:  # a retraction: one part's rest written anew
            old = rng.choice(sorted(live))
            new = part_name([f"rest{step}"], log.run_id)
            removed = dict(zip(snapshots.STATS[:4], (1, 0, 0, 2)))
            live[old] = (5, 0, 0, 9, 500)
            log.add({"part": old, **dict(zip(snapshots.STATS, live[old]))})
            log.replace(old, new, removed=removed, new_bytes=321)
            del live[old]
            live[new] = (4, 0, 0, 7, 321)
        if live and rng.random() < 0.3:  # a quarantine
            gone = rng.choice(sorted(live))
            log.drop(gone)
            del live[gone]
        written = log.write("progress")
        expected[written.seq], runs[written.seq] = dict(live), log.run_id
    assert snapshot_seqs(out) == list(range(1, 12))
    for seq, parts in expected.items():
        entry = json.loads((tmp_path / "out" / "_snapshots" / snapshots.seq_name(seq)).read_text())
        assert entry["full"] == (seq in (1, 4, 8)) and entry["previous"] == (seq - 1 if seq > 1 else None)
        snapshot = _fresh_read(out, seq)
        assert snapshot is not None and dict(snapshot.parts) == parts and snapshot.run_id == runs[seq]
        assert snapshot.totals.images == sum(s[0] + s[1] for s in parts.values())
    assert _fresh_read(out).seq == 11  # type: ignore[union-attr]
    assert _fresh_read(out, as_of_run="r1").seq == 5  # type: ignore[union-attr]  # r1's last snapshot
    with pytest.raises(SnapshotNotFound, match=r"no snapshot 12 .*kept: 1\.\.11"):
        _fresh_read(out, 12)
    with pytest.raises(SnapshotNotFound, match="by run 'r9'"):
        _fresh_read(out, as_of_run="r9")
    assert _fresh_read(Output.of(str(tmp_path / "empty"))) is None


def test_a_starting_run_finds_committed_the_latest_snapshot_and_what_its_run_committed_after_it(
    tmp_path: Path,
) -> None:
    out = Output.of(str(tmp_path / "out"))
    first = SnapshotLog(out, "r1")
    assert first.open({"part-0a.parquet": 10, "part-0b.parquet": 20}) == ["part-0a.parquet", "part-0b.parquet"]
    first.write("start")  # an output from before snapshots: every part it holds is committed (snapshot 1)
    kept, rewritten = part_name(["k"], "r2"), part_name(["x"], "r2")
    second = SnapshotLog(out, "r2")
    second.open({"part-0a.parquet": 10, "part-0b.parquet": 20})
    second.replace("part-0b.parquet", rewritten, removed=dict.fromkeys(snapshots.STATS, 0), new_bytes=5)
    second.add({"part": kept, **dict.fromkeys(snapshots.STATS, 1)})
    second.write("progress")  # then r2 commits more and stops before its next snapshot
    later, stray = part_name(["later"], "r2"), part_name(["stray"], "r3")  # r3 stopped before its first snapshot
    listed = {"part-0a.parquet": 10, "part-0b.parquet": 20, kept: 1, rewritten: 5, later: 7, stray: 8}
    third = SnapshotLog(out, "r4")
    assert third.open(listed) == sorted(["part-0a.parquet", kept, rewritten, later])  # not b (retracted), not r3's
    assert third.live[later] == (0, 0, 0, 0, 7)  # counted from its footer by the inspection
    del listed["part-0a.parquet"]  # moved aside by hand since snapshot 2
    assert SnapshotLog(out, "r5").open(listed) == sorted([kept, rewritten, later])


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    name = "pf-snapshots"
    client = boto3.client("s3")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name


@pytest.mark.parametrize("store", ["local", "s3"])
def test_of_two_writers_of_one_sequence_number_exactly_one_wins(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight writers, each holding snapshot ``n`` as the latest, write ``n + 1`` at once (a barrier): one wins, seven
    raise `SnapshotConflict`, and snapshot ``n + 1`` is the winner's, whole. Five rounds."""
    root = f"s3://{request.getfixturevalue('bucket')}/race" if store == "s3" else str(tmp_path / "race")
    out = Output.of(root)
    base = SnapshotLog(out, "base")
    base.open({})
    base.write("start")
    for round_ in range(5):
        writers = [SnapshotLog(out, f"w{round_}-{i}") for i in range(8)]
        barrier = threading.Barrier(len(writers))
        outcomes: dict[str, str] = {}

        def write(log: SnapshotLog, barrier: threading.Barrier, outcomes: dict[str, str], seq: int) -> None:
            log.open({})
            log.add({"part": part_name([log.run_id], log.run_id), **dict(zip(snapshots.STATS, (1, 0, 0, 3, 100)))})
            barrier.wait()
            try:
                log.write("progress")
                outcomes[log.run_id] = "won"
            except SnapshotConflict as exc:
                assert f"snapshot {seq} of" in str(exc) and "no longer owns the output" in str(exc)
                outcomes[log.run_id] = "lost"

        threads = [threading.Thread(target=write, args=(w, barrier, outcomes, round_ + 2)) for w in writers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [run for run, outcome in outcomes.items() if outcome == "won"]
        assert len(outcomes) == 8 and len(winners) == 1
        snapshot = _fresh_read(out)
        assert snapshot is not None and snapshot.seq == round_ + 2 and snapshot.run_id == winners[0]
        assert list(snapshot.parts) == [part_name([winners[0]], winners[0])]


def test_a_driver_stalled_past_its_lease_writes_no_snapshot(bucket: str) -> None:
    """On S3, the run whose lease another run took (it stalled past the expiry) writes no snapshot: neither at a
    commit point nor when it fails."""
    output = f"s3://{bucket}/stalled"
    lease = Lease.acquire(output, "stalled")
    committer = OutputCommitter(output, "stalled", lease=lease)
    assert committer.prepare() == []
    committer.snapshot("start")
    committer.committed({"part": part_name(["a"], "stalled"), **dict.fromkeys(snapshots.STATS, 1)})
    taker = Lease.acquire(output, "taker", take_over=True)
    try:
        with pytest.raises(LeaseLost, match="run stalled does not hold the lease"):
            committer.snapshot("progress")
        committer._record = {"run_id": "stalled"}  # as after its on_write_start
        committer.on_write_failed(RuntimeError("stalled"))  # best effort: logs, writes nothing
    finally:
        taker.release()
        lease.release()
    assert snapshot_seqs(Output.of(output)) == [1]
    assert not s3fs.S3FileSystem().exists(f"{bucket}/stalled/_runs/stalled.json")


def _write_part(out: Output, name: str) -> None:
    for table in (IMAGES_TABLE, SEGMENTS_TABLE):
        path = Path(out.part(table, name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


def _history(tmp_path: Path) -> Output:
    """An output whose 10 snapshots each rewrite one part (as re-runs retracting rows do): 2 parts live, older
    versions kept for the snapshots that list them, plus a file no snapshot lists (a stopped run's)."""
    out = Output.of(str(tmp_path / "out"))
    log = SnapshotLog(out, "r0")
    log.open({})
    for name in ("part-0a.parquet", "part-0b.parquet"):
        _write_part(out, name)
        log.add({"part": name, **dict.fromkeys(snapshots.STATS, 1)})
    log.write("start")
    for step in range(9):
        log.run_id = f"r{step + 1}"
        old = sorted(log.live)[step % 2]
        new = part_name([f"v{step}"], log.run_id)
        _write_part(out, new)
        log.replace(old, new, removed=dict.fromkeys(snapshots.STATS, 0), new_bytes=1)
        log.write("start")
    _write_part(out, part_name(["stopped"], "r99"))
    return out


def _listed(out: Output) -> dict[str, dict[str, int]]:
    tables = (IMAGES_TABLE, SEGMENTS_TABLE)
    return {t: {p.name: p.stat().st_size for p in Path(out.table(t)).glob("part-*")} for t in tables}


def _check_kept_snapshots_readable(out: Output) -> set[str]:
    """Every file of every snapshot left in the log exists; returns the names they list."""
    listed: set[str] = set()
    for seq in snapshot_seqs(out):
        snapshot = _fresh_read(out, seq)
        assert snapshot is not None
        for table in (IMAGES_TABLE, SEGMENTS_TABLE):
            missing = [p for p in snapshot.files(out, table) if not Path(p).exists()]
            assert not missing, f"snapshot {seq} lists deleted files {missing}"
        listed |= set(snapshot.parts)
    return listed


def test_a_clean_up_crashed_between_its_steps_never_deletes_what_a_kept_snapshot_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots, "FULL_EVERY", 4)
    reference = _history(tmp_path / "reference")
    done = clean_up(reference, keep=3, listed=lambda: _listed(reference), confirm=lambda: None)
    deletions = done.snapshots + 2 * done.parts
    assert snapshot_seqs(reference) == [8, 9, 10]  # the newest 3 build on full snapshot 8
    assert done.snapshots == 7 and set(_listed(reference)[IMAGES_TABLE]) == _check_kept_snapshots_readable(reference)

    for crash_after in range(deletions):  # a crash after each deletion in turn, then a clean-up that completes
        out = _history(tmp_path / f"crash{crash_after}")
        fs, calls = out.fs, []
        real_rm = fs.rm_file

        def crashing_rm(path: str, _real=real_rm, _calls=calls, _limit=crash_after) -> None:
            if len(_calls) == _limit:
                raise KeyboardInterrupt("killed mid clean-up")
            _calls.append(path)
            _real(path)

        monkeypatch.setattr(fs, "rm_file", crashing_rm)
        with pytest.raises(KeyboardInterrupt):
            clean_up(out, keep=3, listed=lambda out=out: _listed(out), confirm=lambda: None)
        monkeypatch.setattr(fs, "rm_file", real_rm)
        _check_kept_snapshots_readable(out)
        clean_up(out, keep=3, listed=lambda out=out: _listed(out), confirm=lambda: None)
        assert snapshot_seqs(out) == [8, 9, 10]
        assert _listed(out) == _listed(reference)  # the same files left as an uninterrupted clean-up leaves


def test_a_clean_up_stops_when_the_lease_is_lost(tmp_path: Path) -> None:
    out = _history(tmp_path)
    before = _listed(out), snapshot_seqs(out)

    def lost() -> None:
        raise LeaseLost("run r9 does not hold the lease")

    with pytest.raises(LeaseLost):
        clean_up(out, keep=1, listed=lambda: _listed(out), confirm=lost)
    assert (_listed(out), snapshot_seqs(out)) == before
