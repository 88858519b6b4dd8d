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
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import stat
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import fsspec

from pipeline.config import redact_uri

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
WRITE_ATTEMPTS = 3  # the same for a publish (on top of s3fs's own retries)
_RETRY_BASE_S = 0.5


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


def retrying(what: str, action: Callable[[], T], *, attempts: int = READ_ATTEMPTS) -> T:
    """Run ``action`` with bounded retries of transient storage errors (never of a missing object)."""
    for attempt in range(attempts):
        try:
            return action()
        except FileNotFoundError:
            raise  # gone is gone: no retry
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


def _read_local(path: str, max_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """(bytes, {"size", "mtime"}) of a local regular file, at most ``max_bytes`` of it. The file is stat'ed
    before it is opened (never a FIFO or device) and again through the open descriptor (opened without
    blocking: a file swapped for a FIFO in between is refused, not waited on)."""
    status = check_regular(path)
    if status.st_size > max_bytes:
        raise _too_large(status.st_size, max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise NotARegularFile(f"not a regular file ({_file_type(status.st_mode)}); not read")
        data = f.read(min(status.st_size, max_bytes) + 1)  # one byte more: a file that grew shows it
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data, {"size": status.st_size, "mtime": status.st_mtime}


def read_object(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, ObjectInfo]:
    """Whole object at ``uri`` and what identifies it (size, version); a short read (the size differs from
    the object's) counts as a transient error.

    Bounded: at most the object's size as the store reports it when the read starts, plus one byte, and never
    more than ``max_bytes`` + 1 bytes (`TooLarge` past ``max_bytes``: an object larger than the store says, or
    of unknown size, cannot exhaust memory). Local paths must be regular files (`NotARegularFile`, checked
    before opening)."""

    def attempt() -> tuple[bytes, ObjectInfo]:
        fs, path = fsspec.core.url_to_fs(uri)
        if is_local(fs):
            data, info = _read_local(path, max_bytes)
        else:
            info = fs.info(path)
            size = info.get("size")
            if size is not None and size > max_bytes:
                raise _too_large(size, max_bytes)
            limit = max_bytes if size is None else size
            data = b"" if limit == 0 else fs.cat_file(path, start=0, end=limit + 1)
            if len(data) > max_bytes:
                raise _too_large(len(data), max_bytes)
        size = info.get("size")
        if size is not None and len(data) != size:
            raise OSError(f"short read: got {len(data)} of {size} bytes")
        return data, ObjectInfo(len(data), object_version(info))

    return retrying(f"reading {uri}", attempt)


def read_bytes(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Whole object at ``uri`` (see `read_object`)."""
    return read_object(uri, max_bytes=max_bytes)[0]


def publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> int:
    """Put ``data`` at ``path`` whole, or not at all (see the module docstring); returns its size."""

    def attempt() -> int:
        if not is_local(fs):
            fs.pipe_file(path, data)
            return len(data)
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        temporary = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
        return len(data)

    return retrying(f"writing {path}", attempt, attempts=WRITE_ATTEMPTS)


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
