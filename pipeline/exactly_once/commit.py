"""The commit protocol: how a run's rows enter an output exactly once, across crashes, retries and re-runs.

`OutputCommitter` holds the protocol in one class, shaped like Ray Data's ``Datasink`` (driver hooks around
worker hooks; its ``write_datasink`` is not used, since it would materialise the dataset):

=======================  ========  =====================================================================
hook                     where     what
=======================  ========  =====================================================================
`prepare`                driver    clean up what interrupted runs left; the committed parts
`quarantine`             driver    move an unreadable committed part aside
`retract`                either    the rows a committed part keeps, written as a new part, when the resume redoes
                                   some of its rows (on workers, or in the driver for a small output:
                                   `pipeline.exactly_once.resume`)
`snapshot`               driver    the next snapshot of the committed parts (start, progress, end, failed)
`on_write_start`         driver    the run's record in ``_runs/``, ``_SUCCESS`` removed
`write_part`             worker    commit one part (the model actor's block call, `pipeline.segmenting.block_call`)
`on_write_complete`      driver    the last snapshot, the record completed, ``_SUCCESS`` written, the clean-up
`on_write_failed`        driver    a last snapshot, the record marked failed
=======================  ========  =====================================================================

Layout under OUTPUT/ (names in `pipeline.schema`, paths from `pipeline.exactly_once.output_paths.Output`)::

    segments/part-<hash>-<run_id>.parquet   one row per segment (pipeline.schema.SEGMENTS_SCHEMA)
    images/part-<hash>-<run_id>.parquet     one row per image (pipeline.schema.IMAGES_SCHEMA): the commit record
    _snapshots/<seq>.json          both tables as of a commit point: what readers read
                                   (`pipeline.exactly_once.snapshots`)
    _runs/<run_id>.json            each run's record (`pipeline.exactly_once.run_records`)
    _SUCCESS                       the last run finished: its counts and the output's totals
    _lease.json                    the lease of the run writing the output (`pipeline.exactly_once.lease`)
    _quarantine/<run_id>/          unreadable parts a run moved aside

The guarantees
--------------
1. **One writer.** A run takes the output's lease (`pipeline.exactly_once.lease`) before it touches anything; a second
   run on a held output stops (exit code 2). Every driver hook checks, in the store and not only in memory, that the
   run still holds the lease right before it changes anything (`confirm_lease`), and every commit and every retraction
   of a part checks it again (`check_holder`), so a driver stalled past its lease's expiry, whose output another run
   took over, changes nothing.
2. **Commit.** A part (`pipeline.exactly_once.parts`: at most ``--rows-per-file`` images) is committed by
   `write_part`: its ``segments`` file, then its ``images`` file, each published whole
   (`pipeline.inputs.storage.publish`: a temporary file renamed on local stores, one PUT on object stores). The
   ``images`` file is the commit record of every image in it (ok or error), and carries its counts in its footer. Part
   names hash the part's image ids and name the run, so Ray's retry of a block call whose actor died (before, between
   or after the two files) overwrites its own files instead of adding a second copy, and no other run ever writes
   that name: a committed file is never changed (copy on write; `retract` writes a new part).
3. **Start.** `prepare` removes temporary files and ``segments`` parts without an ``images`` part (a crash between the
   two writes), then returns the committed parts; `pipeline.exactly_once.inspection` reads their footers and
   `quarantine` moves a part that cannot be read (cut short, not Parquet) to ``_quarantine/<run>/`` with its
   ``segments`` part: its images are done again. The committed parts are the latest snapshot's plus those its run
   committed after it (`pipeline.exactly_once.snapshots`, rule 5; every part for an output without snapshots).
   What else a re-run redoes is `pipeline.exactly_once.resume_decision`; `retract` writes the rows each part
   concerned keeps as a new part (`pipeline.exactly_once.retraction`) before the run commits anything.
5. **Snapshots.** Readers read snapshots, never the folders: `snapshot` writes the next one (put-if-absent, after
   `confirm_lease`) after the start (the retractions replaced in it), every ``--snapshot-every`` seconds from the part
   rows the driver receives (a part is listed once both its files exist), and at the end (``end``, or ``failed``);
   `on_write_complete` then deletes the snapshots past ``--keep-snapshots`` and the files no remaining snapshot
   lists (`pipeline.exactly_once.snapshots.clean_up`, under the lease). Of two writers of one snapshot number one
   wins; the other stops (`pipeline.exactly_once.snapshots.SnapshotConflict`).
4. **Records.** Each images row names its run (``run_id``). Before the run's first commit, `on_write_start`
   writes its record and removes ``_SUCCESS``: an output never holds rows of a run without its record, nor a
   ``_SUCCESS`` older than its newest rows. `on_write_complete` writes ``_SUCCESS`` (this run's counts and the
   output's totals) and completes the record, both from what the driver knows, never from a listing (an
   object store's listing cache can be stale); a run with nothing to do leaves no record. Parts and records
   are listed afresh (`invalidate_cache`).

Tested against: a killed model actor, a killed driver then a re-run, a lost node, a block call killed between a part's
two files and after both, two runs started together and one started mid-run, an exception and a signal during an S3
upload, a store that drops connections, an unreadable committed part, the output inside the input folder
(tests/pipeline/test_faults.py, test_write_stage.py, test_output_integrity.py, test_s3_faults.py); a lease taken by
another run before a retraction: no part rewritten or deleted, in the driver and on Ray workers (test_retraction.py,
test_resume_executors.py); two unreadable committed parts on a local and on an S3 output, re-run with another
``--rows-per-file`` so that no redone part overwrites a bad one by name (test_quarantine.py); leases written by hosts
whose clocks run an hour fast or slow (test_lease_clock.py); SIGTERM / SIGINT mid-run, then a resume
(tests/jobs/test_stop.py); a driver stalled past its lease's expiry while another run takes the output over and
finishes, and a run on an S3 output whose ``_runs/`` listing was cached (test_stalled_driver.py); every read failing
after the first 16 images, so that the error budget stops the job (`pipeline.error_budget`: the run marked failed, its
parts kept), then a re-run (tests/jobs/test_error_budget_job.py); inputs that kill their model actor while decoding or
segmenting, with one actor and two, and a hung model batch: each gets one error row and its shard-mates are committed
once, as retries on restarted actors cut the same parts in the same order (`pipeline.segmenting.poison`;
tests/pipeline/test_poison_job.py, the deaths simulated in process in test_block_call.py); an S3 GET that stalls after
its headers: a retryable error row within the read timeout, the rest committed, and a re-run redoes that image only
(tests/pipeline/test_job_read_timeout.py); a reader querying during a job and during a re-run's retractions, time
travel by run after three runs, eight snapshot writers racing on S3, a driver stalled past its lease writing no
snapshot, a clean-up crashed after each of its deletions (tests/pipeline/test_snapshots_job.py, test_snapshots.py).
The runs started mid-run and the killed driver are held right after their first commit by a fault hook (no race with
the job's speed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import time
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import SnapshotConfig, redact_uri
from pipeline.error_budget import error_kinds
from pipeline.exactly_once.lease import Lease, check_holder
from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.parts import PART_PREFIX, parquet_bytes, part_counts, part_name, split_results
from pipeline.exactly_once.retraction import retraction_row, split_part
from pipeline.exactly_once.run_records import now, publish_record
from pipeline.exactly_once.snapshots import Kind, Snapshot, SnapshotLog, clean_up
from pipeline.inputs.storage import is_local, is_temporary, publish
from pipeline.schema import IMAGES_TABLE, QUARANTINE_FOLDER, RETRACTION_SCHEMA, SEGMENTS_SCHEMA, SEGMENTS_TABLE

log = logging.getLogger(__name__)


class OutputCommitter:
    """The commit protocol of one run on one output (see the module docstring).

    On the driver it holds the run's `Lease`; pickled for the workers it is just (output, run id), and its
    worker hooks check the lease in the store.
    """

    def __init__(
        self,
        output: str,
        run_id: str,
        *,
        lease: Lease | None = None,
        snapshots: SnapshotConfig = SnapshotConfig(),  # noqa: B008 (frozen)
    ) -> None:
        self.out = Output.of(output)
        self.run_id = run_id
        self.snapshot_config = snapshots
        self._lease = lease  # the driver's; None on a worker
        self._record: dict[str, Any] | None = None  # this run's record, once `on_write_start` wrote it
        self.snapshots = SnapshotLog(self.out, run_id)  # the driver's: what the next snapshot lists

    def __reduce__(self) -> tuple[type[OutputCommitter], tuple[str, str]]:
        return OutputCommitter, (self.out.uri, self.run_id)

    # -- the driver ----------------------------------------------------------------------------------------

    def confirm_lease(self) -> None:
        """This run still holds its lease, in memory and in the store (before each change to the output)."""
        if self._lease is None:
            raise RuntimeError("driver hooks need the run's lease")
        self._lease.raise_if_lost()
        check_holder(self.out.uri, self.run_id)

    def raise_if_lost(self) -> None:
        """Raise `pipeline.exactly_once.lease.LeaseLost` if the lease's renewer found it lost (in memory: no store
        read)."""
        if self._lease is None:
            raise RuntimeError("driver hooks need the run's lease")
        self._lease.raise_if_lost()

    def prepare(self) -> list[str]:
        """Remove what interrupted runs left behind (temporary files; ``segments`` parts without their
        ``images`` part, each logged); returns the committed images part paths, sorted: the latest snapshot's
        parts and those committed after it by its run (`pipeline.exactly_once.snapshots`, rule 5)."""
        self.confirm_lease()
        out = self.out
        segments, temporary_segments = _part_names(out.fs, out.table(SEGMENTS_TABLE))
        images, temporary_images = _part_names(out.fs, out.table(IMAGES_TABLE))
        for path in temporary_segments + temporary_images:
            with contextlib.suppress(FileNotFoundError):
                out.fs.rm(path)
        for name in sorted(set(segments) - set(images)):
            log.warning("removing segments part %s: an interrupted run wrote it but never committed it", name)
            out.fs.rm(out.part(SEGMENTS_TABLE, name))
        committed = self.snapshots.open({name: size + segments.get(name, 0) for name, size in images.items()})
        return [out.part(IMAGES_TABLE, n) for n in committed]

    def listed_parts(self) -> dict[str, dict[str, int]]:
        """``{table: {part file name: bytes}}`` of both folders, listed afresh."""
        return {table: _part_names(self.out.fs, self.out.table(table))[0] for table in (IMAGES_TABLE, SEGMENTS_TABLE)}

    def snapshot(self, kind: Kind, *, only_if_changed: bool = False) -> Snapshot | None:
        """Write the next snapshot of the committed parts (`pipeline.exactly_once.snapshots`), after confirming
        the lease in the store; with ``only_if_changed``, none when they equal the latest snapshot's."""
        if only_if_changed and not self.snapshots.changed:
            return None
        self.confirm_lease()
        return self.snapshots.write(kind)

    def quarantine(self, part: str, *, problem: str) -> None:
        """Move an unreadable committed part (both tables) to ``_quarantine/<run_id>/``: its images are redone.

        The ``images`` file goes first (the commit record: once it is gone, its images are uncommitted), then
        the ``segments`` file. A failure to move either raises: the run must not redo images whose bad part
        stays in place (readers would fail on it and its rows would count twice). The only error tolerated is
        a source that is gone: an ``images`` file moved aside by hand since the listing, or a ``segments`` file
        removed by hand (an interrupted quarantine leaves the ``segments`` file as an orphan, which the next
        run's `prepare` removes). A destination folder that does not exist is created (local stores)."""
        self.confirm_lease()
        out, name = self.out, posixpath.basename(part)
        log.warning("moving unreadable part %s to %s/%s/ (%s); its images are done again", name, QUARANTINE_FOLDER,
                    self.run_id, problem)  # fmt: skip
        for table in (IMAGES_TABLE, SEGMENTS_TABLE):  # images first: the commit record goes, then its segments
            source, folder = out.part(table, name), out.quarantine(self.run_id, table)
            if is_local(out.fs):
                out.fs.makedirs(folder, exist_ok=True)
            try:
                out.fs.mv(source, posixpath.join(folder, name))
            except FileNotFoundError:
                if out.fs.exists(source):  # the source is there: the move itself failed
                    raise
                log.warning("%s/%s was gone already: nothing to move", table, name)
            out.fs.invalidate_cache(out.table(table))
        self.snapshots.drop(name)

    def on_write_start(self, record: dict[str, Any]) -> None:
        """Before this run's first commit: its ``record`` in ``_runs/``, and ``_SUCCESS`` removed."""
        self.confirm_lease()
        with contextlib.suppress(FileNotFoundError):
            self.out.fs.rm_file(self.out.success)
        publish_record(self.out, record)
        self._record = record

    def on_write_complete(self, report: dict[str, Any]) -> None:
        """The run's last snapshot (``end``; a run that committed nothing: only if the committed parts changed),
        ``_SUCCESS`` holding ``report`` (this run's counts and the output's totals) and the snapshot's number,
        this run's record completed with them if the run wrote one; then the clean-up
        (`pipeline.exactly_once.snapshots.clean_up`, keeping ``--keep-snapshots``)."""
        self.snapshot("end", only_if_changed=self._record is None)
        latest = self.snapshots.latest
        report = {**report, "snapshot": latest.seq if latest is not None else None}
        self.confirm_lease()
        if self._record is not None:
            publish_record(self.out, {**self._record, "status": "finished", "finished": now(), **report})
        publish(self.out.fs, self.out.success, json.dumps(report, indent=2, default=str).encode())
        try:
            keep = self.snapshot_config.keep_snapshots
            clean_up(self.out, keep=keep, listed=self.listed_parts, confirm=self.confirm_lease)
        except Exception as exc:  # the run is done: what is left is deleted by the next run's clean-up
            log.warning("clean-up of %s stopped (%s: %s); the next run's clean-up finishes it",
                        redact_uri(self.out.uri), type(exc).__name__, exc)  # fmt: skip

    def on_write_failed(self, exc: BaseException) -> None:
        """Mark this run's record failed, if it has one (best effort: the run is failing already)."""
        if self._record is None:
            return
        try:
            self.snapshot("failed", only_if_changed=True)  # readers see the parts it committed
            publish_record(
                self.out, {**self._record, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            )
        except Exception as inner:  # never hide the run's own error behind this one (a lost lease included)
            log.warning("could not mark run %s failed in %s: %s", self.run_id, redact_uri(self.out.uri), inner)

    def committed(self, row: dict[str, Any]) -> None:
        """A part's `pipeline.schema.PART_ROW_SCHEMA` row reached the driver: the next snapshot lists it, written
        now when ``--snapshot-every`` seconds passed since the last one (``progress``)."""
        self.snapshots.add(row)
        if self.snapshots.due(self.snapshot_config.snapshot_every_s):
            self.snapshot("progress")

    def retracted(self, row: dict[str, Any]) -> None:
        """A `retract` row reached the driver: the next snapshot lists its new part instead of its old one."""
        self.snapshots.replace(row["part"], row["new_part"], removed=row, new_bytes=row["new_bytes"] or 0)

    # -- a worker (or the driver, for a small output) -------------------------------------------------------

    def retract(self, retractions: pa.Table) -> pa.Table:
        """Write, for each committed part that ``retractions`` (`pipeline.exactly_once.retraction.retraction_rows`)
        name images of, the rows it keeps as a new part of this run (``segments`` first, then ``images``, each
        published whole; nothing for a part left empty), in part name order. The old files are never changed:
        the run's next snapshot drops them (`retracted`). Returns one `pipeline.schema.RETRACTION_SCHEMA` row per
        part: what was removed, and the new part. Each part checks the lease in the store right before it writes
        (the same fence as `write_part`): a run that lost its lease raises
        `pipeline.exactly_once.lease.LeaseLost` and writes no further part. A Ray stage: on workers, every row of
        a part in one partition; or in the driver, on all of them."""
        removed = [RETRACTION_SCHEMA.empty_table()]
        if retractions.num_rows == 0:  # an empty partition of the shuffle
            return removed[0]
        for name in sorted(set(retractions.column("part").to_pylist())):
            removed.append(self._retract_part(name, retractions.filter(pc.equal(retractions.column("part"), name))))
        return pa.concat_tables(removed)

    def _retract_part(self, name: str, group: pa.Table) -> pa.Table:
        out = self.out
        images_path, segments_path = out.part(IMAGES_TABLE, name), out.part(SEGMENTS_TABLE, name)
        with out.fs.open(images_path, "rb") as f:
            images = pq.read_table(f)
        kept, removed = split_part(images, group)
        check_holder(out.uri, self.run_id, not_doing=f"not retracting rows from {name}")
        new_name, written = None, 0
        if kept.num_rows:
            with out.fs.open(segments_path, "rb") as f:
                segments = pq.read_table(f, schema=SEGMENTS_SCHEMA)
            removed_ids = removed.column("image_id")
            segments = segments.filter(pc.invert(pc.is_in(segments.column("image_id"), value_set=removed_ids)))
            new_name = part_name(kept.column("image_id").to_pylist(), self.run_id)
            written = publish(out.fs, out.part(SEGMENTS_TABLE, new_name), parquet_bytes(segments))
            written += publish(out.fs, out.part(IMAGES_TABLE, new_name), parquet_bytes(kept, counts=part_counts(kept)))
        log.info("retracted %d rows from part %s (the rest: %s)", removed.num_rows, name, new_name or "none")
        return retraction_row(name, removed, new_part=new_name, new_bytes=written)

    def write_part(self, results: pa.Table, *, node_id: str = "") -> dict[str, object] | None:
        """Commit ``results`` (`pipeline.schema.RESULT_SCHEMA` rows) as one part. Returns its
        `pipeline.schema.PART_ROW_SCHEMA` row (None for no rows). Raises `pipeline.exactly_once.lease.LeaseLost`
        when the
        run no longer holds the output."""
        if results.num_rows == 0:
            return None
        started = time.perf_counter()
        out = self.out
        images, segments = split_results(results, run_id=self.run_id)
        name = part_name(images.column("image_id").to_pylist(), self.run_id)
        check_holder(out.uri, self.run_id)
        counts = part_counts(images)
        written = publish(out.fs, out.part(SEGMENTS_TABLE, name), parquet_bytes(segments))
        written += publish(out.fs, out.part(IMAGES_TABLE, name), parquet_bytes(images, counts=counts))  # commit
        seconds = time.perf_counter() - started
        kinds = error_kinds(images.column("error").to_pylist()) if counts["images_error"] else []
        return {"part": name, **counts, "bytes": written, "node_id": node_id, "seconds": seconds, "error_kinds": kinds}


def _part_names(fs: fsspec.AbstractFileSystem, folder: str) -> tuple[dict[str, int], list[str]]:
    """({part file name: bytes}, temporary files) of one table folder, listed afresh (never from a listing
    cache)."""
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}, []
    sizes = {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries}
    parts = {n: size for n, size in sizes.items() if n.startswith(PART_PREFIX) and n.endswith(".parquet")}
    return parts, [posixpath.join(folder, n) for n in sizes if is_temporary(n)]
