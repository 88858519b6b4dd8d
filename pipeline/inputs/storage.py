"""Whole objects in storage: read one with its identity, publish one whole or not at all, retry what is
transient.

Any fsspec filesystem works; two kinds get special care. Local (and shared, mounted) filesystems publish by
writing a hidden temporary file beside the target and renaming it over it. Object stores (``s3://`` via
s3fs, ``gs://``, ...) publish the finished bytes in one call: one PUT, or a multipart upload completed only
after its last part, so an interrupted upload never leaves a cut-short object under its final name (a
file object opened for writing would upload what it has when it is closed, even after an exception).

An error is *transient* when another attempt may not meet it: the store unreachable, a timeout, throttling,
5xx, a connection cut mid-body, a short read, access denied (credentials may be fixed). Such reads are
retried a few times here, and an image whose read still fails becomes a retryable error row. A missing
object is not transient.

Every read has a no-progress timeout, ``read_timeout_s`` (``--read-timeout``): a read that receives nothing
for that long (no connection, or no bytes) is given up with `ReadTimedOut`, a transient error; an object
whose bytes keep coming never times out, however large. On S3 (s3fs) botocore enforces it on the socket
(``connect_timeout`` and ``read_timeout``), with botocore's and s3fs's own retries off so that they cannot
multiply it (`retrying` makes every attempt, see `read_filesystem`). Any other read, local or fsspec, runs in
chunks on a worker thread watched by the caller (`watched`). A timed-out read is retried at most once, and
only on an object store, where another attempt gets a fresh connection: at most ≈ 2 × ``read_timeout_s``
per object there, ``read_timeout_s`` on a local or mounted filesystem, whose hang the next attempt would
only meet again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import queue
import stat
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import fsspec

from pipeline.config import FailureConfig, redact_uri

log = logging.getLogger(__name__)
T = TypeVar("T")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Storage errors worth a retry. s3fs surfaces a body cut mid-stream (after its own retries) as aiohttp's
    ClientPayloadError and some connection failures as botocore errors, neither of which is an OSError."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import botocore.exceptions

        errors.append(botocore.exceptions.BotoCoreError)
        errors.append(botocore.exceptions.ClientError)
    except ImportError:
        pass
    return tuple(errors)


TRANSIENT_ERRORS = _transient_errors()
READ_ATTEMPTS = 4  # bounded retries of transient storage errors: waits 0.5 s, 1 s, 2 s between attempts
TIMEOUT_ATTEMPTS = 2  # of which at most this many may time out (object stores; 1 on local filesystems)
WRITE_ATTEMPTS = 3  # the same for a publish (on top of s3fs's own retries)
_RETRY_BASE_S = 0.5
DEFAULT_READ_TIMEOUT_S = FailureConfig().read_timeout_s  # ``--read-timeout``'s default, seconds
READ_CHUNK = 1 << 20  # bytes per read call of a watched read: its progress is seen once per chunk


class ReadTimedOut(TimeoutError):
    """A read that received nothing (no connection, or no bytes) for ``--read-timeout`` seconds: transient."""


class ObjectInfo(NamedTuple):
    size: int | None  # bytes
    version: str | None  # `object_version`


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local (or a mounted, shared) filesystem."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocols or "s3a" in protocols


def object_version(info: dict[str, Any]) -> str | None:
    """What identifies one version of an object in fsspec ``info``: ETag (S3), generation (GCS), else mtime."""
    for key in ("ETag", "etag", "generation"):
        if info.get(key) not in (None, ""):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if mtime is None:
        return None
    return f"mtime={mtime.timestamp() if hasattr(mtime, 'timestamp') else float(mtime)!r}"


def retrying(
    what: str, action: Callable[[], T], *, attempts: int = READ_ATTEMPTS, timeout_attempts: int = TIMEOUT_ATTEMPTS
) -> T:
    """Run ``action`` with bounded retries of transient storage errors (never of a missing object); of its
    ``attempts``, at most ``timeout_attempts`` may end in `ReadTimedOut` (each one has waited a whole timeout)."""
    timeouts = 0
    for attempt in range(attempts):
        try:
            return action()
        except FileNotFoundError:
            raise  # gone is gone: no retry
        except ReadTimedOut as exc:
            timeouts += 1
            if timeouts >= timeout_attempts or attempt == attempts - 1:
                raise
            log.warning("%s timed out (%s); retry %d", what, exc, attempt + 1)  # at once: it has waited enough
        except TRANSIENT_ERRORS as exc:
            if attempt == attempts - 1:
                raise
            wait = _RETRY_BASE_S * 2**attempt
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt + 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


DEFAULT_MAX_BYTES = 1 << 30  # the hard cap on one read (`pipeline.config.InputConfig.max_bytes`'s default)


class NotARegularFile(ValueError):
    """A local input that is a FIFO, socket, device or folder (also behind a link): never opened, an error row."""


class TooLarge(ValueError):
    """An object larger than the read cap (``--max-bytes``): not read whole, an error row."""


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):  # fmt: skip
        if test(mode):
            return name
    return "not a file"


def check_regular(path: str) -> os.stat_result:
    """``os.stat`` of a local path (links followed) when it is a regular file; raises `NotARegularFile` for a
    FIFO, socket, device or folder without opening it (opening a FIFO blocks; a device never ends)."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise NotARegularFile(f"not a regular file ({_file_type(status.st_mode)}); not read")
    return status


def _too_large(size: int, max_bytes: int) -> TooLarge:
    return TooLarge(f"larger than --max-bytes ({size} > {max_bytes} bytes); not read")


def _read_local(path: str, max_bytes: int, progress: Callable[[], None]) -> tuple[bytes, dict[str, Any]]:
    """(bytes, {"size", "mtime"}) of a local regular file, at most ``max_bytes`` of it, read in `READ_CHUNK` s
    (``progress()`` after each). The file is stat'ed before it is opened (never a FIFO or device) and again
    through the open descriptor (opened without blocking: a file swapped for a FIFO in between is refused, not
    waited on)."""
    status = check_regular(path)
    if status.st_size > max_bytes:
        raise _too_large(status.st_size, max_bytes)
    progress()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise NotARegularFile(f"not a regular file ({_file_type(status.st_mode)}); not read")
        progress()
        data = _read_chunks(f.read, min(status.st_size, max_bytes) + 1, progress)  # one more: a file that grew
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data, {"size": status.st_size, "mtime": status.st_mtime}


def _read_chunks(read: Callable[[int], bytes], limit: int, progress: Callable[[], None]) -> bytes:
    """Up to ``limit`` bytes from ``read`` (a file's ``read``), `READ_CHUNK` at a time, to its end. Memory: the
    bytes once, plus one chunk (a `BytesIO` grows in place and hands its buffer over; a join of the chunks
    would hold the object twice)."""
    first = read(min(limit, READ_CHUNK))
    progress()
    left = limit - len(first)
    if not first or left <= 0:
        return first  # one chunk: most images
    buffer = io.BytesIO()
    buffer.write(first)
    del first
    while left > 0:
        chunk = read(min(left, READ_CHUNK))
        if not chunk:
            break
        buffer.write(chunk)
        left -= len(chunk)
        progress()
    return buffer.getvalue()


def watched(work: Callable[[Callable[[], None]], T], *, timeout_s: float, what: str) -> T:
    """``work(progress)`` run on a reader thread, given up with `ReadTimedOut` when it calls ``progress()``
    neither within ``timeout_s`` of starting nor within ``timeout_s`` of its previous call; its result (or its
    exception) otherwise.

    A thread blocked in a read that never returns (a hung NFS or FUSE mount) cannot be interrupted: it is
    abandoned, still blocked (a daemon, so it never holds up the process's exit), and whatever it reads later
    is dropped; a new reader thread takes its place. Each such read strands one thread until the mount
    answers. Reader threads are reused (`_READERS`): starting one per read would cost more than the read."""
    state = threading.Condition()
    last = [time.monotonic()]
    outcome: list[tuple[bool, Any]] = []  # [(True, result)] or [(False, exception)] once done

    def progress() -> None:
        with state:
            last[0] = time.monotonic()

    def run() -> None:
        try:
            result: tuple[bool, Any] = (True, work(progress))
        except BaseException as exc:  # handed to the caller, which raises it
            result = (False, exc)
        with state:
            outcome.append(result)
            state.notify_all()

    _READERS.submit(run)
    with state:
        while not outcome:
            left = last[0] + timeout_s - time.monotonic()
            if left <= 0:
                log.warning("%s received nothing for %g s: given up (its thread is abandoned)", what, timeout_s)
                raise ReadTimedOut(f"read timed out: no bytes for {timeout_s:g} s")
            state.wait(left)
    done, value = outcome[0]
    if not done:
        raise value
    return value  # type: ignore[no-any-return]


class _ReaderThreads:
    """Daemon threads that run `watched` reads, one at a time each: an idle one takes the next read, and a new
    one starts when none is idle (so a thread stuck in a read that never returns is never waited for). A forked
    child, which has none of its parent's threads, starts afresh."""

    def __init__(self) -> None:
        self._start_afresh()

    def _start_afresh(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._pid = os.getpid()
        self.started = 0  # threads started in this process (idle, busy or stuck)

    def submit(self, job: Callable[[], None]) -> None:
        if self._pid != os.getpid():  # forked: the idle threads counted are the parent's
            self._start_afresh()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self.started += 1
                threading.Thread(target=self._serve, name=f"storage-read-{self.started}", daemon=True).start()
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            self._jobs.get()()  # the job catches everything itself
            with self._lock:
                self._idle += 1


_READERS = _ReaderThreads()


def read_filesystem(
    uri: str, *, read_timeout_s: float, single_attempt: bool = True
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) to read the input ``uri`` with: on S3, an s3fs filesystem whose botocore client has
    ``read_timeout_s`` as its connect and read timeouts. With ``single_attempt`` (reads) it makes one attempt per
    call, botocore's retries and s3fs's own off (s3fs retries a timeout 5 times, nested in its retries of the
    request: 25 attempts of one read), and `retrying` makes the attempts instead; without it (listing) both keep
    their retries. Any other URI: its usual filesystem."""
    if fsspec.core.split_protocol(uri)[0] not in ("s3", "s3a"):
        return fsspec.core.url_to_fs(uri)
    options: dict[str, Any] = s3_timeouts(read_timeout_s)
    if single_attempt:
        options["retries"] = {"mode": "standard", "total_max_attempts": 1}
    fs, path = fsspec.core.url_to_fs(uri, config_kwargs=options)  # one instance per options: reads share it
    if single_attempt:
        fs.retries = 1  # an instance attribute of s3fs (default 5), not a constructor argument
    return fs, path


def s3_timeouts(read_timeout_s: float) -> dict[str, float]:
    """botocore ``Config`` options (s3fs's ``config_kwargs``) that give up a connection or a read that receives
    nothing for ``read_timeout_s`` (s3fs's defaults: 5 s and 15 s)."""
    return {"connect_timeout": read_timeout_s, "read_timeout": read_timeout_s}


def _is_timeout(exc: BaseException) -> bool:
    """Whether an error of an S3 read (s3fs, aiohttp or botocore) is a connect or read timeout."""
    if isinstance(exc, TimeoutError):  # fsspec's FSTimeoutError (a body that stalled), asyncio's, the socket's
        return True
    try:
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    except ImportError:
        return False
    return isinstance(exc, ReadTimeoutError | ConnectTimeoutError)


def read_object(
    uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
) -> tuple[bytes, ObjectInfo]:
    """Whole object at ``uri`` and what identifies it (size, version); a short read (the size differs from
    the object's) counts as a transient error.

    Bounded: at most the object's size as the store reports it when the read starts, plus one byte, and never
    more than ``max_bytes`` + 1 bytes (`TooLarge` past ``max_bytes``: an object larger than the store says, or
    of unknown size, cannot exhaust memory). Local paths must be regular files (`NotARegularFile`, checked
    before opening). A read that receives nothing for ``read_timeout_s`` seconds (connecting, or between
    bytes) raises `ReadTimedOut`, after one more attempt on an object store (see the module docstring)."""
    fs, path = read_filesystem(uri, read_timeout_s=read_timeout_s)
    local = is_local(fs)

    def read(progress: Callable[[], None]) -> tuple[bytes, dict[str, Any]]:
        if local:
            return _read_local(path, max_bytes, progress)
        info = fs.info(path)
        size = info.get("size")
        if size is not None and size > max_bytes:
            raise _too_large(size, max_bytes)
        progress()
        limit = max_bytes if size is None else size
        if limit == 0:
            return b"", info
        if is_s3(fs):  # botocore watches the socket: one ranged GET, no thread
            return fs.cat_file(path, start=0, end=limit + 1), info
        with fs.open(path, "rb") as f:
            return _read_chunks(f.read, limit + 1, progress), info

    def attempt() -> tuple[bytes, ObjectInfo]:
        if is_s3(fs):
            try:
                data, info = read(lambda: None)
            except Exception as exc:
                if _is_timeout(exc):
                    raise ReadTimedOut(
                        f"read timed out: no bytes for {read_timeout_s:g} s ({type(exc).__name__})"
                    ) from exc
                raise
        else:
            data, info = watched(read, timeout_s=read_timeout_s, what=f"reading {uri}")
        if len(data) > max_bytes:
            raise _too_large(len(data), max_bytes)
        size = info.get("size")
        if size is not None and len(data) != size:
            raise OSError(f"short read: got {len(data)} of {size} bytes")
        return data, ObjectInfo(len(data), object_version(info))

    return retrying(f"reading {uri}", attempt, timeout_attempts=1 if local else TIMEOUT_ATTEMPTS)


def read_bytes(
    uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
) -> bytes:
    """Whole object at ``uri`` (see `read_object`)."""
    return read_object(uri, max_bytes=max_bytes, read_timeout_s=read_timeout_s)[0]


def publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, exclusive: bool = False) -> int:
    """Put ``data`` at ``path`` whole, or not at all (see the module docstring); returns its size.

    ``exclusive``: create it only if there is no ``path`` yet (put-if-absent), else raise `FileExistsError`: a hard
    link of the temporary file on local stores, ``If-None-Match: *`` on S3, an existence check before the write
    elsewhere (best effort). A ``path`` already holding exactly ``data`` counts as created (an earlier attempt whose
    reply was lost)."""

    def attempt() -> int:
        if not is_local(fs):
            if exclusive and not is_s3(fs):
                fs.invalidate_cache(posixpath.dirname(path))
                if fs.exists(path):
                    raise FileExistsError(path)
            try:
                fs.pipe_file(path, data, **({"mode": "create"} if exclusive and is_s3(fs) else {}))
            except OSError as exc:
                if exclusive and (isinstance(exc, FileExistsError) or precondition_failed(exc)):
                    raise FileExistsError(path) from exc
                raise
            return len(data)
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        temporary = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            if exclusive:
                os.link(temporary, path)  # fails when ``path`` exists: exactly one creator
            else:
                os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
        return len(data)

    try:
        return retrying(f"writing {path}", attempt, attempts=WRITE_ATTEMPTS)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if fs.cat_file(path) == data:
                return len(data)
        raise


def precondition_failed(exc: OSError) -> bool:
    """Whether s3fs's error is S3's ``412 PreconditionFailed`` (s3fs raises it as a plain OSError)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


def describe_storage_error(uri: str, exc: BaseException) -> str:
    """One line saying what failed on ``uri`` and what to do about it (credentials, endpoint, permissions),
    without the secrets ``uri`` or the error may carry (`pipeline.config.redact_uri`)."""
    return redact_uri(_describe_storage_error(uri, exc))


def _describe_storage_error(uri: str, exc: BaseException) -> str:
    name, text = type(exc).__name__, str(exc)
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        return (
            f"cannot access {uri}: no AWS credentials found; set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or run where an instance role provides them"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") or isinstance(
        exc, ConnectionError
    ):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint"
        return f"cannot access {uri}: cannot reach {endpoint} ({name}); check the network and AWS_ENDPOINT_URL"
    if isinstance(exc, PermissionError) or name in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"cannot access {uri}: access denied ({text}); check the credentials and their permissions"
    if isinstance(exc, NotADirectoryError | FileExistsError):
        return f"cannot use {uri}: a file is in the way ({text})"
    return f"cannot access {uri}: {name}: {text}"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `publish`'s temporary files (left behind by a process that was killed)."""
    return name.startswith(".") and name.endswith(".tmp")
