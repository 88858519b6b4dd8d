"""The snapshot log: ``OUTPUT/_snapshots/<seq>.json``, each a view of both tables as of one commit point.

A snapshot lists every committed part it includes (``segments`` and ``images`` files of the same name: a part
is listed whole or not at all), with each part's counts and bytes, the run that wrote it, and the previous
sequence number. Readers read one snapshot (the latest by default; `read_snapshot`), so two queries of the
same snapshot agree, whatever runs meanwhile, and an older snapshot is the output as it was then (time travel).

The rules (the commit protocol, `pipeline.exactly_once.commit`, drives the writer, `SnapshotLog`):

1. **Copy on write.** A committed part file is never changed: its name hashes its image ids and names the run
   that wrote it (`pipeline.exactly_once.parts.part_name`), and a retraction writes the rows a part keeps as a
   new part. A file leaves the folders only by quarantine (unreadable) or by `clean_up`.
2. **Written by the lease holder, once.** A snapshot is written only after the driver confirmed its lease in
   the store, and created with put-if-absent (`pipeline.inputs.storage.publish`, exclusive: a link on local
   stores, ``If-None-Match: *`` on S3): of two writers of the same sequence number exactly one wins, the other
   raises `SnapshotConflict`.
3. **Commit points.** A run writes a snapshot after its start (clean-up, quarantine, retractions: kind
   ``start``), every ``--snapshot-every`` seconds while parts arrive (``progress``), and at its end (``end``,
   or ``failed`` when it fails). A part enters a snapshot only once its row reached the driver: both its files
   are written by then.
4. **Size.** Snapshot ``1`` and every `FULL_EVERY`-th are full (every part listed); the others list what
   changed since the previous one (parts added, parts removed). Reading snapshot ``n`` reads the full one at or
   below it and the deltas up to ``n`` (`read_snapshot`), so at most `FULL_EVERY` files.
5. **What is committed.** For a writer starting on the output, the committed parts are the latest snapshot's
   parts, plus the parts in the folders that the latest snapshot's run committed after it (the run stopped
   before its next snapshot: those are named with its run id). Other files not in the latest snapshot are
   versions a later snapshot dropped (retracted, kept for time travel) or files of a run that stopped before its
   first snapshot: no reader sees them, and `clean_up` deletes them. An output without ``_snapshots/`` (written
   before snapshots existed) has every part in its folders committed; its next run writes snapshot ``1``.
6. **Clean-up.** At the end of a run, under the lease: the snapshot files older than the newest ``keep`` ones
   (and than the full snapshot those build on) are deleted first, newest first (each snapshot left stays
   readable), then every part file that no remaining snapshot lists. A crash in between leaves files that nothing
   lists, which the next clean-up deletes: no file a kept snapshot lists is ever deleted.

Tested against: a reader querying during a job and during a re-run's retractions, time travel after three runs, one
retracting changed inputs (tests/pipeline/test_snapshots_job.py); snapshots read back through full snapshots and
deltas, a clean-up crashed after each of its deletions then run again, eight writers racing for one sequence number on
S3 (moto) and locally, a driver stalled past its lease (tests/pipeline/test_snapshots.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import posixpath
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec

from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.parts import part_run
from pipeline.inputs.storage import publish
from pipeline.schema import IMAGES_TABLE, SEGMENTS_TABLE, SNAPSHOTS_FOLDER, Counts

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
FULL_EVERY = 32  # snapshot 1 and every 32nd list every part; the others what changed since the previous one
STATS = ("images_ok", "images_error", "images_retryable", "segments", "bytes")  # a part's entry, in this order
Kind = Literal["start", "progress", "end", "failed"]

PartStats = tuple[int, int, int, int, int]  # `STATS`


class SnapshotError(RuntimeError):
    """The snapshot log cannot be read (a file missing from the chain, or not a snapshot): names the file."""


class SnapshotNotFound(LookupError):
    """The snapshot asked for (``--snapshot N``, ``--as-of-run RUN``) is not in the log (one line for the user)."""


class SnapshotConflict(RuntimeError):
    """Another writer created this sequence number first: this run no longer owns the output."""


def is_full(seq: int) -> bool:
    """Whether snapshot ``seq`` lists every part (else only what changed since ``seq - 1``)."""
    return seq == 1 or seq % FULL_EVERY == 0


@dataclass(frozen=True)
class Snapshot:
    """Both tables as of one commit point: ``parts`` maps each part's file name to its `STATS`."""

    seq: int
    run_id: str
    kind: str
    written: str  # local time, as run records write it
    parts: Mapping[str, PartStats]

    def files(self, out: Output, table: str) -> list[str]:
        """The paths (in ``out.fs``) of ``table``'s files in this snapshot, sorted."""
        folder = out.table(table) + "/"
        return [folder + name for name in sorted(self.parts)]

    @property
    def totals(self) -> Counts:
        """The output's counts in this snapshot."""
        sums = [sum(column) for column in zip(*self.parts.values())] or [0] * len(STATS)
        return Counts(images_ok=sums[0], images_error=sums[1], images_retryable=sums[2], segments=sums[3])


# -- reading ---------------------------------------------------------------------------------------------------


def snapshot_seqs(out: Output) -> list[int]:
    """The sequence numbers in ``_snapshots/``, ascending, listed afresh (``[]``: no log)."""
    out.fs.invalidate_cache(out.snapshots)
    try:
        names = [posixpath.basename(p) for p in out.fs.ls(out.snapshots, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[: -len(".json")]) for n in names if n.endswith(".json") and n[: -len(".json")].isdigit())


def read_snapshot(out: Output, seq: int | None = None, *, as_of_run: str | None = None) -> Snapshot | None:
    """Snapshot ``seq``; or the last one run ``as_of_run`` wrote; or the latest. None when the output has no
    snapshot log (written before snapshots existed). Raises `SnapshotNotFound` for a sequence number or run not
    in the log, `SnapshotError` for a log that cannot be read."""
    seqs = snapshot_seqs(out)
    if not seqs:
        if seq is not None or as_of_run is not None:
            raise SnapshotNotFound(f"{out.uri} has no snapshots (_snapshots/): it was written before snapshots existed")
        return None
    if as_of_run is not None:
        return _last_of_run(out, seqs, as_of_run)
    if seq is None:
        seq = seqs[-1]
    if seq not in seqs:
        raise SnapshotNotFound(f"{out.uri} has no snapshot {seq} (kept: {_span(seqs)})")
    return snapshot_at(out, seq)


def snapshot_at(out: Output, seq: int) -> Snapshot:
    """Snapshot ``seq``, known to be in the log (no listing; kept in memory once read: snapshots never change)."""
    return _folded(out.fs, out.root, out.uri, seq)


def _span(seqs: list[int]) -> str:
    return f"{seqs[0]}..{seqs[-1]}" if len(seqs) > 1 else str(seqs[0])


def _last_of_run(out: Output, seqs: list[int], run_id: str) -> Snapshot:
    """The last snapshot ``run_id`` wrote (the summaries read at once)."""
    for summary in reversed(describe_snapshots(out, seqs)):
        if summary["run_id"] == run_id:
            return _folded(out.fs, out.root, out.uri, summary["seq"])
    raise SnapshotNotFound(f"no kept snapshot of {out.uri} was written by run {run_id!r} (kept: {_span(seqs)})")


@functools.lru_cache(maxsize=16)  # snapshots never change once written: safe to keep
def _folded(fs: fsspec.AbstractFileSystem, root: str, uri: str, seq: int) -> Snapshot:
    """Snapshot ``seq``: the full snapshot at or below it, then each delta up to it."""
    folder = posixpath.join(root, SNAPSHOTS_FOLDER)
    base = seq if is_full(seq) else max(1, seq - seq % FULL_EVERY)
    paths = [posixpath.join(folder, seq_name(s)) for s in range(base, seq + 1)]
    contents = fs.cat(paths, on_error="return") if len(paths) > 1 else {paths[0]: _cat(fs, paths[0])}
    parts: dict[str, PartStats] = {}
    entry: dict[str, Any] = {}
    for s, path in zip(range(base, seq + 1), paths):  # the files fetched at once (concurrently on object stores)
        entry = _parse_entry(path, contents.get(path, FileNotFoundError(path)))
        if entry.get("seq") != s or (s > base and entry.get("previous") != s - 1):
            raise SnapshotError(f"{uri}: _snapshots/{seq_name(s)} is not snapshot {s} of the chain")
        if entry.get("full"):
            parts = {}
        for name in entry.get("removed", ()):
            parts.pop(name, None)
        added = entry["added"]
        parts.update(zip(added["part"], zip(*(added[k] for k in STATS))))
    return Snapshot(seq, entry["run_id"], entry["kind"], entry["written"], parts)


def _cat(fs: fsspec.AbstractFileSystem, path: str) -> bytes | Exception:
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        return exc


def _read_entry(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    return _parse_entry(path, _cat(fs, path))


def _parse_entry(path: str, content: bytes | Exception) -> dict[str, Any]:
    """One snapshot file's JSON, or `SnapshotError` naming what is wrong with it."""
    if isinstance(content, FileNotFoundError):
        raise SnapshotError(f"{path} is missing: the snapshot log was cut (deleted by hand?)")
    if isinstance(content, Exception):
        raise content
    try:
        entry = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path} is not a snapshot ({exc})") from None
    if not isinstance(entry, dict) or entry.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{path} is not a snapshot of format {SNAPSHOT_FORMAT}")
    return entry


def seq_name(seq: int) -> str:
    """``_snapshots/``'s file name of snapshot ``seq`` (zero-padded: names sort as numbers)."""
    return f"{seq:010d}.json"


# -- writing ---------------------------------------------------------------------------------------------------


@dataclass
class SnapshotLog:
    """The writer of one run's snapshots, in the driver (owned by `pipeline.exactly_once.commit.OutputCommitter`,
    which confirms the lease before each `write`). ``live`` is what the next snapshot lists; it changes only
    through `open`, `count`, `add`, `drop` and `replace`, which keep the names changed since the latest snapshot and
    running sums, so that a commit point costs what changed, not the number of parts."""

    out: Output
    run_id: str
    live: dict[str, PartStats] = field(default_factory=dict)
    latest: Snapshot | None = None  # the latest snapshot in the store, as this run last wrote or read it
    _touched: set[str] = field(default_factory=set)  # names added, changed or dropped since ``latest``
    _sums: list[int] = field(default_factory=lambda: [0] * len(STATS))  # of ``live``'s stats
    _written_since: float = field(default_factory=time.monotonic)

    def open(self, listed: Mapping[str, int]) -> list[str]:
        """The committed parts (rule 5), given the ``images`` part names in the folders and each part's bytes (both
        files); returns their names, sorted. Counts not known from the log are zeros until `count`."""
        self.latest = read_snapshot(self.out)
        snapshot = self.latest
        if snapshot is None:
            self.live = {name: (0, 0, 0, 0, size) for name, size in listed.items()}
        else:
            self.live = {name: stats for name, stats in snapshot.parts.items() if name in listed}
            for name in sorted(set(snapshot.parts) - set(listed)):
                log.warning("part %s of snapshot %d is gone from the output (moved or deleted by hand)", name,
                            snapshot.seq)  # fmt: skip
            for name, size in listed.items():
                if name not in snapshot.parts and part_run(name) == snapshot.run_id:
                    self.live[name] = (0, 0, 0, 0, size)  # committed after the last snapshot of a run that stopped
        known = set(snapshot.parts) if snapshot is not None else set()
        self._touched = set(self.live).symmetric_difference(known)
        self._sums = [sum(column) for column in zip(*self.live.values())] or [0] * len(STATS)
        return sorted(self.live)

    def _set(self, name: str, stats: PartStats | None) -> None:
        """``live[name] = stats`` (None: removed), keeping the sums and the changed names."""
        old = self.live.pop(name, None)
        for i, value in enumerate(old or ()):
            self._sums[i] -= value
        if stats is not None:
            self.live[name] = stats
            for i, value in enumerate(stats):
                self._sums[i] += value
        self._touched.add(name)

    def count(self, name: str, counts: Mapping[str, int]) -> None:
        """Set a committed part's counts (from its footer: `pipeline.exactly_once.inspection`)."""
        size = self.live[name][4]
        self._set(name, (*(int(counts[k]) for k in STATS[:4]), size))  # type: ignore[arg-type]

    def add(self, row: Mapping[str, Any]) -> None:
        """A part committed (its `pipeline.schema.PART_ROW_SCHEMA` row)."""
        self._set(row["part"], tuple(int(row[k] or 0) for k in STATS))  # type: ignore[arg-type]

    def drop(self, name: str) -> None:
        """A part no longer committed (quarantined, or emptied by a retraction)."""
        self._set(name, None)

    def replace(self, name: str, new_name: str | None, *, removed: Mapping[str, int], new_bytes: int) -> None:
        """A retraction: part ``name`` lost the ``removed`` counts and its rest was written as ``new_name`` (None:
        nothing was left)."""
        old = self.live[name]
        self._set(name, None)
        if new_name is not None:
            counts = tuple(old[i] - int(removed[k]) for i, k in enumerate(STATS[:4]))
            self._set(new_name, (*counts, new_bytes))  # type: ignore[arg-type]

    def due(self, every_s: float) -> bool:
        """Whether ``every_s`` seconds passed since this run's last snapshot."""
        return time.monotonic() - self._written_since >= every_s

    def _delta(self) -> tuple[dict[str, PartStats], list[str]]:
        """(parts added or changed, names removed) since ``latest``, from the names touched since."""
        previous = self.latest.parts if self.latest is not None else {}
        added = {n: self.live[n] for n in self._touched if n in self.live and previous.get(n) != self.live[n]}
        return added, sorted(n for n in self._touched if n not in self.live and n in previous)

    @property
    def changed(self) -> bool:
        """Whether ``live`` differs from the latest snapshot (or the output has none yet)."""
        return self.latest is None or any(self._delta())

    def write(self, kind: Kind) -> Snapshot:
        """Create the next snapshot of ``live`` (put-if-absent). Raises `SnapshotConflict` when another writer
        created that sequence number first. The caller confirmed the lease."""
        previous = self.latest
        seq = previous.seq + 1 if previous is not None else 1
        written = _now()
        sums = self._sums
        entry: dict[str, Any] = {
            "summary": {
                "seq": seq,
                "run_id": self.run_id,
                "kind": kind,
                "written": written,
                "parts": len(self.live),
                "images": sums[0] + sums[1],
                "segments": sums[3],
                "bytes": sums[4],
            },  # first: read alone
            "format": SNAPSHOT_FORMAT,
            "seq": seq,
            "previous": previous.seq if previous else None,
            "run_id": self.run_id,
            "kind": kind,
            "written": written,
            "full": is_full(seq),
        }
        added, removed = (self.live, []) if is_full(seq) or previous is None else self._delta()
        names = sorted(added)
        entry["added"] = {"part": names, **{k: [added[n][i] for n in names] for i, k in enumerate(STATS)}}
        entry["removed"] = removed
        path = posixpath.join(self.out.snapshots, seq_name(seq))
        try:
            publish(self.out.fs, path, json.dumps(entry, separators=(",", ":")).encode(), exclusive=True)
        except FileExistsError:
            raise SnapshotConflict(
                f"snapshot {seq} of {self.out.uri} was written by another run: run {self.run_id} no longer owns the "
                "output; nothing more is written"
            ) from None
        self.out.fs.invalidate_cache(self.out.snapshots)
        self.latest = Snapshot(seq, self.run_id, kind, written, dict(self.live))
        self._touched, self._written_since = set(), time.monotonic()
        log.debug("snapshot %d: %d parts (%s)", seq, len(self.live), kind)
        return self.latest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- clean-up --------------------------------------------------------------------------------------------------


@dataclass
class CleanUp:
    """What `clean_up` deleted."""

    snapshots: int = 0
    parts: int = 0
    bytes: int = 0


def clean_up(
    out: Output,
    *,
    keep: int,
    listed: Callable[[], Mapping[str, Mapping[str, int]]],
    confirm: Callable[[], None],
) -> CleanUp:
    """Delete the snapshot files older than the newest ``keep`` (and than the full snapshot they build on), then
    the part files no remaining snapshot lists (rule 6). ``listed()``: ``{table: {file name: bytes}}`` of the
    folders, listed afresh; ``confirm()`` raises unless the caller still holds the lease (called before each
    step). Returns what was deleted."""
    done = CleanUp()
    seqs = snapshot_seqs(out)
    if not seqs:
        return done
    oldest = seqs[max(0, len(seqs) - keep)]
    base = oldest if is_full(oldest) else max(1, oldest - oldest % FULL_EVERY)
    confirm()
    # first the snapshots, newest first (each one left can still be read: its chain is older), then the files
    for seq in sorted((s for s in seqs if s < base), reverse=True):
        with contextlib.suppress(FileNotFoundError):
            out.fs.rm_file(posixpath.join(out.snapshots, seq_name(seq)))
        done.snapshots += 1
    out.fs.invalidate_cache(out.snapshots)
    kept = [s for s in seqs if s >= base]
    referenced = set(read_snapshot(out, kept[0]).parts)  # type: ignore[union-attr]
    for seq in kept[1:]:
        referenced |= set(_read_entry(out.fs, posixpath.join(out.snapshots, seq_name(seq)))["added"]["part"])
    confirm()
    files = listed()
    for table in (IMAGES_TABLE, SEGMENTS_TABLE):  # images first: a segments file left alone is removed at start
        for name, size in sorted(files.get(table, {}).items()):
            if name in referenced:
                continue
            with contextlib.suppress(FileNotFoundError):
                out.fs.rm_file(out.part(table, name))
            done.parts += table == IMAGES_TABLE
            done.bytes += size
    for table in (IMAGES_TABLE, SEGMENTS_TABLE):
        out.fs.invalidate_cache(out.table(table))
    if done.snapshots or done.parts:
        log.info("clean-up: %d snapshots and %d parts (%d bytes) deleted", done.snapshots, done.parts, done.bytes)
    return done


SUMMARY_BYTES = 4096  # a snapshot file starts with its summary: reading this much of it is enough
_SUMMARY_START = '{"summary":'


def describe_snapshots(out: Output, seqs: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """The summary of every kept snapshot (or of ``seqs``), oldest first: ``seq``, ``run_id``, ``kind``, ``written``,
    ``parts``, ``images``, ``segments``, ``bytes``. Only the start of each file is read (`SUMMARY_BYTES`, all at
    once): a full snapshot at 100 k parts is 8.7 MB."""
    seqs = snapshot_seqs(out) if seqs is None else list(seqs)
    paths = [posixpath.join(out.snapshots, seq_name(s)) for s in seqs]
    heads = out.fs.cat(paths, start=0, end=SUMMARY_BYTES, on_error="return") if paths else {}
    summaries = []
    for path in paths:
        head = heads.get(path, FileNotFoundError(path))
        if isinstance(head, FileNotFoundError):
            raise SnapshotError(f"{path} is missing: the snapshot log was cut (deleted by hand?)")
        if isinstance(head, Exception):
            raise head
        text = head.decode(errors="replace")
        try:
            if not text.startswith(_SUMMARY_START):
                raise ValueError("no summary first")
            summary, _ = json.JSONDecoder().raw_decode(text, len(_SUMMARY_START))
        except ValueError as exc:
            raise SnapshotError(f"{path} is not a snapshot of format {SNAPSHOT_FORMAT} ({exc})") from None
        summaries.append(summary)
    return summaries
