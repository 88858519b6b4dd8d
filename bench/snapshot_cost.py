"""What the snapshot log (`pipeline.exactly_once.snapshots`) costs at 10 k, 50 k and 100 k parts (issue 27).

On a local output under a temporary folder (and, with ``--s3-parts N``, on S3 through a moto server on 127.0.0.1
that the bench starts in a child process), with synthetic parts named like real ones
(``part-<24 hex>-<run_id>.parquet``, five-int stats):

1. **Write cost per commit point**: `SnapshotLog.write` of the full snapshot (seq 1) and of deltas adding 1, 16 and
   256 parts; seconds and bytes of each file; beside it the driver's CPU for the delta (over the names changed
   since the latest snapshot), the copy of ``live`` the written snapshot keeps (the one step still over all N
   entries) and the ``only_if_changed`` comparison (`SnapshotLog.changed`).
2. **Read cost**: `read_snapshot` of the latest snapshot in the chain's worst case (a full snapshot and
   ``FULL_EVERY - 1`` deltas: seq 63 when ``FULL_EVERY`` = 32), cold (``_folded`` cleared), seconds and bytes
   read; `snapshot_seqs` (the listing) apart.
3. **Reader overhead vs globbing** (local): N empty files in ``images/`` and ``segments/``, then
   ``table_files(pin(uri), "images")`` through the snapshot vs the glob path of an output without
   ``_snapshots/`` (the same folder with the log renamed aside), alternating.
4. **Clean-up** (local): `clean_up` with nothing to delete (a run's end): both folders listed
   (`OutputCommitter.listed_parts`) and every kept snapshot read.
5. **``FULL_EVERY`` alternatives** at the largest N: 8 and 128 (the module global patched), bytes written per
   commit point over one cycle vs files and seconds of the worst read.

Each timing is the median of ``--repeats`` (3). Results: ``bench/results/snapshot_cost.json``; the markdown
tables are printed.

    flock /tmp/pf-ray-tests.lock env PYTHONPATH=. .venv/bin/python -m bench.snapshot_cost --parts 100000 \
        --s3-parts 10000
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import posixpath
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.exactly_once import snapshots
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.snapshots import PartStats, SnapshotLog, clean_up, read_snapshot, snapshot_seqs
from pipeline.reading.output_tables import pin, table_files
from pipeline.schema import IMAGES_TABLE, SEGMENTS_TABLE

T = TypeVar("T")

RESULTS = Path(__file__).resolve().parent / "results" / "snapshot_cost.json"
RUN_ID = "20261208T021200Z-a1b2c3"  # `pipeline.exactly_once.lease.new_run_id`'s shape
DELTAS = (1, 16, 256)  # parts added by one commit point
CHAIN_DELTA = 16  # parts each delta of the read chain adds
ALTERNATIVES = (8, 128)  # FULL_EVERY values tried beside the module's
BUCKET = "bench-snapshots"


# -- synthetic parts -------------------------------------------------------------------------------------------


def part_names(count: int, *, start: int = 0, run_id: str = RUN_ID) -> list[str]:
    """``count`` part file names as `pipeline.exactly_once.parts.part_name` spells them (a 96-bit hash, here of
    the index ``start``, ``start + 1``, ...)."""
    return [
        f"part-{hashlib.sha256(str(i).encode()).hexdigest()[:24]}-{run_id}.parquet" for i in range(start, start + count)
    ]


def part_stats(i: int) -> PartStats:
    """Plausible `STATS` of part ``i``: images ok / error / retryable, segments, bytes."""
    return (2000 - i % 7, i % 3, 0, 30_000 + i % 997, 9_000_000 + (i * 7919) % 1_000_000)


def synthetic_live(count: int, *, start: int = 0) -> dict[str, PartStats]:
    return {name: part_stats(start + i) for i, name in enumerate(part_names(count, start=start))}


# -- timing ----------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def median_s(fn: Callable[[], object], repeats: int, *, before: Callable[[], None] | None = None) -> float:
    """The median wall time of ``repeats`` calls of ``fn`` (``before`` runs untimed ahead of each)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        times.append(timed(fn)[0])
    return statistics.median(times)


def cold() -> None:
    """Forget the snapshots read so far (`snapshots._folded` keeps the last 16 in memory)."""
    snapshots._folded.cache_clear()


@contextlib.contextmanager
def full_every(value: int) -> Iterator[None]:
    """``snapshots.FULL_EVERY`` set to ``value`` meanwhile (the read cache cleared on both sides: its key does not
    hold the value)."""
    saved = snapshots.FULL_EVERY
    snapshots.FULL_EVERY = value
    cold()
    try:
        yield
    finally:
        snapshots.FULL_EVERY = saved
        cold()


def file_bytes(out: Output, seq: int) -> int:
    return int(out.fs.size(posixpath.join(out.snapshots, snapshots.seq_name(seq))))


# -- 1. write cost per commit point ----------------------------------------------------------------------------


def write_cost(uri: str, parts: int, *, repeats: int = 3, deltas: tuple[int, ...] = DELTAS) -> dict[str, Any]:
    """`SnapshotLog.write` of a full snapshot of ``parts`` parts (seq 1) and then of one delta per entry of
    ``deltas`` (that many parts added), on a fresh output under ``uri`` per repeat: median seconds and bytes of
    each; and the driver CPU of the steps of a write besides the file (``cpu``: `walk_cost`)."""
    live = synthetic_live(parts)
    times: dict[str, list[float]] = {"full": [], **{f"delta_{k}": [] for k in deltas}}
    sizes: dict[str, int] = {}
    log = SnapshotLog(Output.of(f"{uri}/write-0"), RUN_ID)
    for r in range(repeats):
        log = SnapshotLog(Output.of(f"{uri}/write-{r}"), RUN_ID)
        commit(log, live)
        seconds, snapshot = timed(lambda log=log: log.write("start"))  # type: ignore[misc]
        times["full"].append(seconds)
        sizes["full"] = file_bytes(log.out, snapshot.seq)
        added = parts
        for k in deltas:
            commit(log, synthetic_live(k, start=added))
            added += k
            seconds, snapshot = timed(lambda log=log: log.write("progress"))  # type: ignore[misc]
            times[f"delta_{k}"].append(seconds)
            sizes[f"delta_{k}"] = file_bytes(log.out, snapshot.seq)
    return {
        "parts": parts,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "bytes": sizes,
        "cpu": walk_cost(log, repeats=repeats),
    }


def commit(log: SnapshotLog, parts: dict[str, tuple[int, ...]]) -> None:
    """``parts`` committed, as the driver records each part row it receives (`SnapshotLog.add`)."""
    for name, stats in parts.items():
        log.add({"part": name, **dict(zip(snapshots.STATS, stats))})


def walk_cost(log: SnapshotLog, *, repeats: int) -> dict[str, float]:
    """Seconds of what `SnapshotLog.write` computes besides the file, with one part changed since ``log``'s latest
    snapshot: the delta (`SnapshotLog._delta`, over the names changed since) and `SnapshotLog.changed`; and the
    copy of ``live`` the written snapshot keeps, each the median of ``repeats``."""
    assert log.latest is not None
    commit(log, synthetic_live(1, start=10**9))
    return {
        "delta_s": median_s(log._delta, repeats),
        "copy_s": median_s(lambda: dict(log.live), repeats),
        "changed_check_s": median_s(lambda: log.changed, repeats),
    }


# -- 2. read cost ----------------------------------------------------------------------------------------------


@dataclass
class Chain:
    """A snapshot log of ``2 * FULL_EVERY - 1`` snapshots (full, deltas, full, deltas) ending at ``parts`` parts."""

    out: Output
    full_every: int
    names: list[str]  # the latest snapshot's parts
    write_s: dict[int, float] = field(default_factory=dict)  # per seq

    @property
    def latest(self) -> int:
        return 2 * self.full_every - 1


def build_chain(uri: str, parts: int, *, per_delta: int | None = None) -> Chain:
    """The worst chain for a reader under the current ``FULL_EVERY``: its latest snapshot is read from a full
    snapshot and ``FULL_EVERY - 1`` deltas, each adding ``per_delta`` parts (default `CHAIN_DELTA`, fewer where
    ``parts`` is small), and lists ``parts`` parts."""
    every = snapshots.FULL_EVERY
    latest = 2 * every - 1
    if per_delta is None:
        per_delta = min(CHAIN_DELTA, max(1, parts // (4 * every)))
    first = parts - per_delta * (latest - 1)
    if first < 1:
        raise ValueError(f"{parts} parts are too few for {latest - 1} deltas of {per_delta}: lower per_delta")
    out = Output.of(uri)
    log = SnapshotLog(out, RUN_ID)
    commit(log, synthetic_live(first))
    chain = Chain(out, every, [])
    added = first
    for seq in range(1, latest + 1):
        if seq > 1:
            commit(log, synthetic_live(per_delta, start=added))
            added += per_delta
        chain.write_s[seq] = timed(lambda: log.write("progress"))[0]
    chain.names = sorted(log.live)
    return chain


def read_cost(chain: Chain, *, repeats: int = 3) -> dict[str, Any]:
    """Cold `read_snapshot` of the chain's latest snapshot (the worst case) and of its full snapshot alone, and
    `snapshot_seqs`: median seconds; files and bytes read."""
    out, every = chain.out, chain.full_every
    found = read_snapshot(out)
    assert found is not None and found.seq == chain.latest and sorted(found.parts) == chain.names
    files = range(every, chain.latest + 1)
    return {
        "parts": len(chain.names),
        "latest_seq": chain.latest,
        "files_read": len(files),
        "bytes_read": sum(file_bytes(out, s) for s in files),
        "latest_s": median_s(lambda: read_snapshot(out), repeats, before=cold),
        "full_only_s": median_s(lambda: read_snapshot(out, every), repeats, before=cold),
        "snapshot_seqs_s": median_s(lambda: snapshot_seqs(out), repeats),
        "full_bytes": file_bytes(out, every),
        "delta_bytes": statistics.median(file_bytes(out, s) for s in range(every + 1, chain.latest + 1)),
    }


# -- 3. reader overhead vs globbing; 4. clean-up ---------------------------------------------------------------


def create_part_files(chain: Chain) -> None:
    """An empty file per part of the chain's latest snapshot in ``images/`` and ``segments/`` (local)."""
    for table in (IMAGES_TABLE, SEGMENTS_TABLE):
        folder = Path(chain.out.table(table))
        folder.mkdir(parents=True, exist_ok=True)
        for name in chain.names:
            (folder / name).touch()


@contextlib.contextmanager
def without_log(out: Output) -> Iterator[None]:
    """``_snapshots/`` renamed aside meanwhile: the output reads as one written before snapshots (globbed)."""
    aside = out.snapshots + ".aside"
    os.rename(out.snapshots, aside)
    try:
        yield
    finally:
        os.rename(aside, out.snapshots)


def reader_cost(chain: Chain, *, repeats: int = 3) -> dict[str, Any]:
    """``table_files(pin(uri), "images")`` through the snapshot (cold) vs globbing the folder, alternating per
    repeat; the two lists are checked equal."""
    uri = chain.out.uri
    through: list[float] = []
    globbed: list[float] = []
    for _ in range(repeats):
        cold()
        seconds, (snapshot_list, _) = timed(lambda: table_files(pin(uri), IMAGES_TABLE))
        through.append(seconds)
        with without_log(chain.out):
            cold()
            seconds, (glob_list, _) = timed(lambda: table_files(pin(uri), IMAGES_TABLE))
            globbed.append(seconds)
        assert snapshot_list == glob_list and len(glob_list) == len(chain.names)
    snapshot_s, glob_s = statistics.median(through), statistics.median(globbed)
    return {"parts": len(chain.names), "snapshot_s": snapshot_s, "glob_s": glob_s, "ratio": snapshot_s / glob_s}


def cleanup_cost(chain: Chain, *, repeats: int = 3, keep: int = 100) -> dict[str, Any]:
    """`clean_up` with nothing to delete (every part listed by the latest snapshot, ``keep`` at the committer's
    default): median seconds, and of the folders' listing alone."""
    committer = OutputCommitter(chain.out.uri, RUN_ID)  # listed_parts needs no lease

    def run() -> None:
        done = clean_up(chain.out, keep=keep, listed=committer.listed_parts, confirm=lambda: None)
        assert (done.snapshots, done.parts) == (0, 0), done

    return {
        "parts": len(chain.names),
        "snapshots_kept": len(snapshot_seqs(chain.out)),
        "clean_up_s": median_s(run, repeats, before=cold),
        "listing_s": median_s(committer.listed_parts, repeats),
    }


# -- 5. FULL_EVERY alternatives --------------------------------------------------------------------------------


def cycle_cost(chain: Chain, read: dict[str, Any]) -> dict[str, Any]:
    """Per commit point over one cycle of the chain (the full snapshot at ``FULL_EVERY`` and the deltas after
    it): mean bytes and seconds written; and the worst read."""
    seqs = range(chain.full_every, chain.latest + 1)
    return {
        "full_every": chain.full_every,
        "bytes_per_commit": statistics.mean(file_bytes(chain.out, s) for s in seqs),
        "write_s_per_commit": statistics.mean(chain.write_s[s] for s in seqs),
        "worst_read_files": read["files_read"],
        "worst_read_bytes": read["bytes_read"],
        "worst_read_s": read["latest_s"],
    }


# -- S3 through moto -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto server on 127.0.0.1 in a child process, this process's S3 clients pointed at it (dummy credentials,
    no instance metadata, no profile); yields the bucket's URI."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        os.environ.pop(name, None)
    os.environ.update(env)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"moto server on port {port} did not start")
            time.sleep(0.2)
        out = Output.of(f"s3://{BUCKET}")
        out.fs.mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- the bench -------------------------------------------------------------------------------------------------


def local_size(folder: Path, parts: int, *, repeats: int) -> dict[str, Any]:
    """Items 1–4 at ``parts`` parts on a local output under ``folder``."""
    started = time.perf_counter()
    result: dict[str, Any] = {"write": write_cost(str(folder / "write"), parts, repeats=repeats)}
    chain = build_chain(str(folder / "chain"), parts)
    result["read"] = read_cost(chain, repeats=repeats)
    result["cycle"] = cycle_cost(chain, result["read"])
    create_part_files(chain)
    result["reader"] = reader_cost(chain, repeats=repeats)
    result["clean_up"] = cleanup_cost(chain, repeats=repeats)
    result["bench_s"] = time.perf_counter() - started
    return result


def alternatives(folder: Path, parts: int, *, repeats: int) -> list[dict[str, Any]]:
    """Bytes per commit point and the worst read under each ``FULL_EVERY`` of `ALTERNATIVES` (and the module's)."""
    rows = []
    for every in sorted({*ALTERNATIVES, snapshots.FULL_EVERY}):
        with full_every(every):
            chain = build_chain(str(folder / f"every-{every}"), parts)
            rows.append(cycle_cost(chain, read_cost(chain, repeats=repeats)))
    return rows


def s3_size(uri: str, parts: int, *, repeats: int) -> dict[str, Any]:
    """Items 1 and 2 at ``parts`` parts on S3."""
    chain = build_chain(f"{uri}/n{parts}/chain", parts)
    return {
        "write": write_cost(f"{uri}/n{parts}/write", parts, repeats=repeats),
        "read": read_cost(chain, repeats=repeats),
    }


def report(result: dict[str, Any]) -> str:
    """The markdown tables of ``result`` (as `main` writes it)."""
    ms = lambda s: f"{s * 1e3:,.1f}"  # noqa: E731
    kb = lambda b: f"{b / 1e3:,.1f}"  # noqa: E731
    lines = []
    for where, sizes in (("local", result["local"]), ("S3 (moto)", result.get("s3", {}))):
        if not sizes:
            continue
        lines += [
            f"\nWrite per commit point, {where} (ms / KB; CPU of a write besides the file, one part changed):\n",
            "| parts | full | +1 | +16 | +256 | full KB | +1 KB | +16 KB | +256 KB | delta | copy of live "
            "| changed check |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in sizes.items():
            w = r["write"]
            s, b, c = w["seconds"], w["bytes"], w["cpu"]
            lines.append(
                f"| {int(n):,} | {ms(s['full'])} | {ms(s['delta_1'])} | {ms(s['delta_16'])} | {ms(s['delta_256'])} "
                f"| {kb(b['full'])} | {kb(b['delta_1'])} | {kb(b['delta_16'])} | {kb(b['delta_256'])} "
                f"| {ms(c['delta_s'])} | {ms(c['copy_s'])} | {ms(c['changed_check_s'])} |"
            )
        lines += [
            f"\nRead, {where}, cold (ms):\n",
            "| parts | latest: seq (files) | ms | KB read | the full one alone | snapshot_seqs |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in sizes.items():
            d = r["read"]
            lines.append(
                f"| {int(n):,} | {d['latest_seq']} ({d['files_read']}) | {ms(d['latest_s'])} | {kb(d['bytes_read'])} "
                f"| {ms(d['full_only_s'])} "
                f"| {ms(d['snapshot_seqs_s'])} |"
            )
    lines += [
        "\nReader and clean-up, local (ms):\n",
        "| parts | pin + table_files (snapshot) | glob | snapshot / glob | clean_up (nothing to delete) "
        "| of which listing |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in result["local"].items():
        rd, cu = r["reader"], r["clean_up"]
        lines.append(
            f"| {int(n):,} | {ms(rd['snapshot_s'])} | {ms(rd['glob_s'])} | {rd['ratio']:.2f} | {ms(cu['clean_up_s'])} "
            f"| {ms(cu['listing_s'])} |"
        )
    if result.get("full_every"):
        lines += [
            f"\nFULL_EVERY at {result['full_every_parts']:,} parts (one cycle: the full snapshot and its deltas):\n",
            "| FULL_EVERY | KB written per commit point | ms written per commit point | worst read: files | KB | ms |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in result["full_every"]:
            lines.append(
                f"| {row['full_every']} | {kb(row['bytes_per_commit'])} | {ms(row['write_s_per_commit'])} "
                f"| {row['worst_read_files']} | {kb(row['worst_read_bytes'])} | {ms(row['worst_read_s'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, default=100_000, help="the largest N (also 10 k and 50 k below it)")
    parser.add_argument("--s3-parts", type=int, default=0, help="N on S3 through moto (0: no S3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-alternatives", action="store_true", help="skip FULL_EVERY = 8 / 128")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from bench.machine import contention, describe

    sizes = sorted({n for n in (10_000, 50_000) if n < args.parts} | {args.parts})
    result: dict[str, Any] = {"machine": describe(), "command": sys.argv, "full_every_module": snapshots.FULL_EVERY}
    result["local"] = {}
    with tempfile.TemporaryDirectory(prefix="pf-snapshot-cost-") as tmp:
        for n in sizes:
            result["local"][n] = local_size(Path(tmp) / f"n{n}", n, repeats=args.repeats)
            print(f"local {n:,} parts: {result['local'][n]['bench_s']:.1f} s", file=sys.stderr)
        if not args.no_alternatives:
            result["full_every_parts"] = args.parts
            result["full_every"] = alternatives(Path(tmp) / "alternatives", args.parts, repeats=args.repeats)
    if args.s3_parts:
        with moto_s3() as bucket:
            result["s3"] = {args.s3_parts: s3_size(bucket, args.s3_parts, repeats=args.repeats)}
    result["contention_at_end"] = contention()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(report(result))


if __name__ == "__main__":
    main()
