"""One writer per output: a lease taken before a run touches the output, renewed while it runs, released at
the end. A second run on a held output stops before doing anything (`LeaseHeld`: one line, exit code 2).

What each store guarantees:

- **Local and shared filesystems** (``/path``, ``file://``): an exclusive ``flock`` on ``OUTPUT/_lease.json``
  held by the driver process for the whole run; the holder's record is written into the file. The kernel
  releases the lock when the process ends however it ends (``kill -9`` included), so a re-run takes over at
  once and there is nothing to expire. On NFS, ``flock`` works through the server's lock manager (NFSv4,
  or NLM for v3); a filesystem without one refuses the lock and the run stops.
- **S3 and stores with S3's conditional writes** (``s3://``): ``OUTPUT/_lease.json`` is created with
  ``If-None-Match: *`` (of two creators, exactly one succeeds), renewed every ``ttl/4`` with ``If-Match`` on
  its ETag (a renewal fails once another run has taken the lease) and deleted at the end. A lease not
  renewed for ``ttl`` seconds (default 120) has expired and is taken over with ``If-Match`` on the expired
  lease's ETag, so of two takers exactly one wins. Expiry is judged by the store's own clock, never by the
  holder's: the age of the lease object is the ``Date`` of the store's response minus the object's
  ``Last-Modified`` (both stamped by the store), so a holder whose clock runs fast or slow neither blocks the
  output past its expiry nor is taken over while it renews. A lease whose recorded renewal time disagrees
  with the store's time of that write by more than `CLOCK_TOLERANCE_S` is reported ("its host's clock looks
  wrong"); it expires like any other, ``ttl`` after it stopped changing. A lease whose holder ran on this
  host in a process that is gone is taken over at once (the usual case: the driver died and the job is
  submitted again on the same head node); ``take_over=True`` takes over a live-looking lease on purpose.
- **Other object stores** (``gs://``, ``az://``, ...): best effort, without conditional writes through
  fsspec: an existence check, a write, a read back. Two runs started within moments of each other can
  both proceed; do not start two runs on one output there.

Fencing: a write task commits a part, and a retraction rewrites or deletes one, only after `check_holder` has
read the lease and found its own run in it, so a run that lost its lease (it stalled past the expiry and was
taken over) stops committing.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec

from pipeline.exactly_once.output_paths import Output
from pipeline.inputs.storage import is_local, is_s3, precondition_failed

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 120.0
CLOCK_TOLERANCE_S = 30.0  # a recorded renewal time further than this from the store's time of the write: reported


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (the message is the one line shown to the user)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run: it must not commit anything more."""


def lease_path(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    out = Output.of(output)
    return out.fs, out.lease


def _process_start(pid: int) -> str | None:
    """The start time of a process on this host (clock ticks since boot), or None if there is no such
    process; with the pid it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


@dataclass
class Lease:
    """This run's hold on an output. Use `acquire`; `release` (or the context manager) gives it back."""

    output: str
    run_id: str
    ttl_s: float = DEFAULT_TTL_S
    record: dict[str, Any] = field(default_factory=dict)
    _etag: str | None = None
    _file: Any = None  # local: the open, locked file
    _lost: LeaseLost | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None
    _released: bool = False

    @classmethod
    def acquire(cls, output: str, run_id: str, *, take_over: bool = False, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        """Take the lease or raise `LeaseHeld` naming the holder; starts renewing it in the background."""
        lease = cls(output, run_id, ttl_s)
        fs, path = lease_path(output)
        lease.record = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "renewed": time.time(),
            "ttl_s": ttl_s,
        }
        if is_local(fs):
            fs.makedirs(posixpath.dirname(path), exist_ok=True)  # object stores have no folders (and s3fs would
            # create a missing bucket here)
            lease._acquire_local(path)
        else:
            if is_s3(fs):
                lease._acquire_conditional(fs, path, take_over=take_over)
            else:
                lease._acquire_best_effort(fs, path, take_over=take_over)
            lease._start_renewing()
        log.info("lease on %s taken by run %s", output, run_id)
        return lease

    # -- local: flock ---------------------------------------------------------------------------------

    def _acquire_local(self, path: str) -> None:
        handle = open(path, "a+")  # noqa: SIM115 (kept open while the run holds the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse(handle.read())
            handle.close()
            raise LeaseHeld(_held_message(self.output, holder, local=True)) from None
        except OSError as exc:
            handle.close()
            message = f"cannot lock {path} ({exc}): this filesystem offers no locks; use another --output"
            raise LeaseHeld(message) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self.record))
        handle.flush()
        self._file = handle

    # -- S3: conditional writes -----------------------------------------------------------------------

    def _acquire_conditional(self, fs: fsspec.AbstractFileSystem, path: str, *, take_over: bool) -> None:
        for _ in range(8):  # each pass either wins, fails with LeaseHeld, or saw the lease change under it
            try:
                self._etag = _etag_of(fs.pipe_file(path, self._body(), mode="create"))
                return
            except FileExistsError:
                pass
            except OSError as exc:  # s3fs maps 412 PreconditionFailed to an OSError subclass
                if not precondition_failed(exc):
                    raise
            seen = _read(fs, path)
            holder = seen.record
            if holder is None:  # released in between: try to create it again
                continue
            if not (take_over or _is_dead(holder, age_s=seen.age_s)):
                raise LeaseHeld(_held_message(self.output, holder, local=False, seen=seen))
            if seen.skew_s is not None and abs(seen.skew_s) > CLOCK_TOLERANCE_S:
                log.warning("the lease of run %s: %s", holder.get("run_id"), _clock_note(seen.skew_s))
            try:
                self._etag = _etag_of(fs.pipe_file(path, self._body(), IfMatch=seen.etag))
                log.warning("took over the lease of run %s on %s", holder.get("run_id"), self.output)
                return
            except OSError as exc:
                if not (precondition_failed(exc) or isinstance(exc, FileNotFoundError)):
                    raise
        raise LeaseHeld(f"the lease on {self.output} keeps changing hands; another run is starting there")

    def _renew_conditional(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.record["renewed"] = time.time()
        try:
            self._etag = _etag_of(fs.pipe_file(path, self._body(), IfMatch=self._etag))
        except OSError as exc:
            if precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                holder = _read(fs, path).record
                raise LeaseLost(f"run {self.run_id} lost its lease on {self.output} to {holder}") from exc
            raise

    # -- other stores: best effort --------------------------------------------------------------------

    def _acquire_best_effort(self, fs: fsspec.AbstractFileSystem, path: str, *, take_over: bool) -> None:
        seen = _read(fs, path)
        holder = seen.record
        if holder is not None and not (take_over or _is_dead(holder, age_s=seen.age_s)):
            raise LeaseHeld(_held_message(self.output, holder, local=False, seen=seen))
        fs.pipe_file(path, self._body())
        holder = _read(fs, path).record
        if holder is None or holder.get("run_id") != self.run_id:
            raise LeaseHeld(_held_message(self.output, holder or {}, local=False))

    # -- while running --------------------------------------------------------------------------------

    def _body(self) -> bytes:
        return json.dumps(self.record).encode()

    def renew(self) -> None:
        """Extend the lease (object stores); raises `LeaseLost` when another run took it."""
        fs, path = lease_path(self.output)
        if is_local(fs):
            return
        if is_s3(fs):
            self._renew_conditional(fs, path)
            return
        holder = _read(fs, path).record
        if holder is None or holder.get("run_id") != self.run_id:
            raise LeaseLost(f"run {self.run_id} lost its lease on {self.output} to {holder}")
        self.record["renewed"] = time.time()
        fs.pipe_file(path, self._body())

    def _start_renewing(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except LeaseLost as exc:
                    log.error("%s", exc)
                    self._lost = exc
                    return
                except Exception as exc:  # a store hiccup: the next renewal tries again before the expiry
                    log.warning("renewing the lease on %s failed (%s: %s)", self.output, type(exc).__name__, exc)

        self._renewer = threading.Thread(target=loop, name=f"lease-{self.run_id}", daemon=True)
        self._renewer.start()

    def raise_if_lost(self) -> None:
        if self._lost is not None:
            raise self._lost

    def release(self) -> None:
        """Give the lease back (idempotent)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
            self._renewer = None
        fs, path = lease_path(self.output)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
                self._file.write(json.dumps({**self.record, "released": time.time()}))
                self._file.flush()
            self._file.close()  # closing drops the flock
            self._file = None
            return
        if self._lost is None and not self._released:
            holder = _read(fs, path).record
            if holder is not None and holder.get("run_id") == self.run_id:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(path)
        self._released = True

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_holder(output: str, run_id: str, *, not_doing: str = "not committing") -> None:
    """Raise `LeaseLost` unless the output's lease names ``run_id`` (a write task calls this before it
    commits a part; a retraction before it changes one). ``not_doing`` ends the message: what was left undone."""
    fs, path = lease_path(output)
    if is_local(fs):
        try:
            with open(path) as f:
                holder = _parse(f.read())
        except FileNotFoundError:
            holder = None
    else:
        holder = _read(fs, path).record
    if holder is None or holder.get("run_id") != run_id or "released" in holder:
        raise LeaseLost(f"run {run_id} does not hold the lease on {output} (holder: {holder}); {not_doing}")


class _Seen(NamedTuple):
    """The lease object as a taker reads it."""

    record: dict[str, Any] | None  # None: no lease
    etag: str | None
    age_s: float | None  # since the store last wrote it, by the store's clock (None: the store does not say)
    skew_s: float | None  # the record's "renewed" minus the store's time of that write: the holder's clock error


_NONE = _Seen(None, None, None, None)


def _read(fs: fsspec.AbstractFileSystem, path: str) -> _Seen:
    """The lease object (`_NONE` when there is none). On S3 its ETag and ages come from one HEAD read before the
    body, so the record is at least as new as the ETag (a conditional write on a stale ETag fails, it never
    wins wrongly)."""
    try:
        etag, written, store_now = _head(fs, path) if is_s3(fs) else (None, None, None)
        body = fs.cat_file(path)
    except FileNotFoundError:
        return _NONE
    record = _parse(body.decode(errors="replace"))
    age = None if written is None or store_now is None else max(0.0, store_now - written)
    renewed = (record or {}).get("renewed")
    skew = renewed - written if written is not None and isinstance(renewed, int | float) else None
    return _Seen(record, etag, age, skew)


def _head(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str | None, float | None, float | None]:
    """(ETag, Last-Modified, the response's Date) of an S3 object, both times as the store's own epoch seconds:
    one direct request, no listing cache."""
    bucket, key, _ = fs.split_path(path)
    response = fs.call_s3("head_object", Bucket=bucket, Key=key)
    modified = response.get("LastModified")
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    store_now = email.utils.parsedate_to_datetime(date).timestamp() if date else None
    return response.get("ETag"), (modified.timestamp() if modified is not None else None), store_now


def _parse(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return {"run_id": "?", "unreadable": text[:80]}
    return record if isinstance(record, dict) else None


def _etag_of(response: object) -> str | None:
    return response.get("ETag") if isinstance(response, dict) else None


def _is_dead(holder: dict[str, Any], *, age_s: float | None, now: float | None = None) -> bool:
    """Whether the holder cannot be running any more: released; not renewed for its ``ttl_s`` (judged by
    ``age_s``, the store's own time since the lease was written, when the store gives it; else by the record's
    renewal time against this host's clock ``now``); or it ran on this host in a process that is gone."""
    if "released" in holder:
        return True
    ttl = float(holder.get("ttl_s", DEFAULT_TTL_S))
    renewed = holder.get("renewed")
    if age_s is not None:
        if age_s >= ttl:
            return True
    elif isinstance(renewed, int | float) and (time.time() if now is None else now) > renewed + ttl:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return _process_start(holder["pid"]) != holder.get("pid_start")
    return False


def _clock_note(skew_s: float) -> str:
    way = "ahead of" if skew_s > 0 else "behind"
    return (
        f"its host's clock looks wrong: the renewal time it recorded is {abs(skew_s):.0f} s {way} the store's time "
        "of that write (expiry is judged by the store's clock)"
    )


def _held_message(output: str, holder: dict[str, Any] | None, *, local: bool, seen: _Seen | None = None) -> str:
    holder = holder or {}
    who = (
        f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"started {holder.get('started', '?')})"
    )
    if local:
        return (
            f"output {output} is being written by {who}; it holds the lock while it runs, so wait for it to "
            "finish or stop it"
        )
    renewed = holder.get("renewed")
    ttl = float(holder.get("ttl_s", DEFAULT_TTL_S))
    if seen is not None and seen.age_s is not None:
        expiry = f"its lease expires in {ttl - seen.age_s:.0f} s unless renewed (by the store's clock)"
        if seen.skew_s is not None and abs(seen.skew_s) > CLOCK_TOLERANCE_S:
            expiry += f"; {_clock_note(seen.skew_s)}"
    elif isinstance(renewed, int | float):
        left = renewed + ttl - time.time()
        expiry = f"its lease expires in {left:.0f} s unless renewed"
        if left > ttl + CLOCK_TOLERANCE_S:
            expiry += f" (its host's clock looks wrong: it claims a renewal {left - ttl:.0f} s in the future)"
    else:
        expiry = "its lease has no expiry time"
    return (
        f"output {output} is being written by {who}; {expiry}. If that run is dead, wait for the expiry or "
        "re-run with --take-over-lease"
    )


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
