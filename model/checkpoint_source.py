"""Where checkpoint bytes come from: a local path, or any fsspec URI copied once into a local cache.

Sources: a local path, any fsspec URI (``s3://...``, ``gs://...``) or ``https://`` — remote files are copied
once into a local cache (``$PANOPTIC_FLOW_CACHE`` or ``~/.cache/panoptic-flow``) keyed by URI, atomically, so
that concurrent actors never see a half-written file. An official file's name carries the start of its
sha256; `check_sha256_prefix` verifies it. The errors of every checkpoint step are declared here.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import fsspec

_SHA_IN_NAME = re.compile(r"-([0-9a-f]{8})\.(?:pth|pt|bin|safetensors)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


class CheckpointNotFound(CheckpointError):
    """The checkpoint's file or URI does not exist, or could not be reached (offline, DNS, refused)."""


def cache_dir() -> Path:
    """Where remote checkpoints are cached."""
    return Path(os.environ.get("PANOPTIC_FLOW_CACHE", Path.home() / ".cache" / "panoptic-flow"))


def fetch(uri: str) -> Path:
    """A local path holding ``uri``'s bytes: the path itself when local, else a cached copy."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        path = Path(fsspec.core.strip_protocol(uri) if protocol else uri)
        if not path.is_file():
            raise CheckpointNotFound(f"weights file not found: {uri}")
        return path
    name = Path(uri.split("?")[0]).name or "weights"
    target = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        with fsspec.open(uri, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except (OSError, ValueError) as exc:  # fsspec raises FileNotFoundError, ClientConnectorError, PermissionError...
        partial.unlink(missing_ok=True)
        # the exception's own text may repeat the URI with its credentials: only its type is named
        if _unreachable(exc):
            raise CheckpointNotFound(f"{uri} could not be reached ({_root_cause(exc)}; offline?)") from exc
        if isinstance(exc, FileNotFoundError):
            raise CheckpointNotFound(f"weights not found at {uri}") from exc
        raise CheckpointError(f"cannot read weights from {uri}: {type(exc).__name__}") from exc
    os.replace(partial, target)  # atomic: concurrent actors never see a half-written file
    return target


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return chain


def _unreachable(exc: BaseException) -> bool:
    """The store could not be reached (refused, DNS, timeout): fsspec's HTTP reports even that as a
    FileNotFoundError, caused by the connection error."""
    return any(
        isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and "Connect" in type(e).__name__)
        for e in _causes(exc)
    )


def _root_cause(exc: BaseException) -> str:
    return type(_causes(exc)[-1]).__name__


def file_sha256(path: Path | str) -> str:
    """The hex sha256 of a local file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256_prefix(path: Path, name: str) -> None:
    """Official files carry the first 8 hex digits of their sha256 in their name: verify it."""
    match = _SHA_IN_NAME.search(name)
    if match is None:
        return
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
        raise CheckpointError(
            f"{name}: sha256 {digest[:8]}… does not match the {match.group(1)} in its name "
            "(corrupt or truncated download?)"
        )
