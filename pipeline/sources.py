"""Input sources: turn the user's input URIs into image rows of raw bytes, one row per image.

Inputs (any fsspec URI: ``s3://`` via s3fs honouring the AWS configuration incl. ``AWS_ENDPOINT_URL``,
``gs://``, ``az://`` when their package is installed, local paths):

- a prefix, folder or glob of image files;
- WebDataset-style ``.tar`` shards (the first image member of each sample key; other members ignored);
- Parquet files with an image-bytes column (and an optional id column);
- a manifest: a ``.txt`` (one URI per line) or a Parquet file with a ``uri`` column listing image files.
  This is the scalable way: it is read by Ray workers, never listed on the driver.

Raw bytes are read here and decoded in `pipeline.decode`, so one bad object becomes one error row.
``image_id`` is stable: the object's URI, plus ``#member`` inside a tar shard or ``#row=N`` in Parquet.

Inputs travel as *refs* (`REF_SCHEMA`: ``uri``, ``kind``, ``skip``) until `read_refs` reads their bytes; the
resume filter and the de-duplication of repeated URIs work on refs (see `pipeline.run.build_refs`), so bytes of
committed or repeated inputs are never read. ``skip`` lists image ids of a shard that are already committed.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS, InputConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

RefKind = Literal["file", "tar", "parquet"]
REF_SCHEMA = pa.schema([("uri", pa.string()), ("kind", pa.string()), ("skip", pa.list_(pa.string()))])


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
    except ImportError:
        pass
    return tuple(errors)


TRANSIENT_ERRORS = _transient_errors()
READ_ATTEMPTS = 4  # bounded retries of transient storage errors: waits 0.5 s, 1 s, 2 s between attempts
_RETRY_BASE_S = 0.5


class InputError(ValueError):
    """The inputs cannot be used (nothing found, no such bucket, unknown format); raised before any work."""


@dataclass(frozen=True)
class ResolvedInputs:
    refs: list[dict[str, str]]  # {"uri", "kind"} rows listed on the driver (folders, globs, shards)
    manifests: list[str]  # manifest URIs, expanded by Ray workers


def _kind_of(path: str) -> RefKind | None:
    lower = path.lower()
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(IMAGE_EXTENSIONS):
        return "file"
    return None


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> str:
    protocol = fsspec.core.split_protocol(uri)[0]
    return f"{protocol}://{path}" if protocol and protocol not in ("file", "local") else path


def resolve_inputs(config: InputConfig) -> ResolvedInputs:
    """List what each input URI holds; raise `InputError` naming the URI when it is unusable."""
    refs: list[dict[str, str]] = []
    manifests: list[str] = []
    for uri in config.uris:
        if config.format == "manifest" or (
            config.format == "auto" and uri.lower().endswith((".txt", ".manifest", ".lst"))
        ):
            _require_exists(uri)
            manifests.append(uri)
            continue
        found = _list_uri(uri, config)
        if not found:
            raise InputError(f"no images found under {uri} (looked for {', '.join(IMAGE_EXTENSIONS)}, .tar, .parquet)")
        refs.extend(found)
    return ResolvedInputs(refs, manifests)


def _require_exists(uri: str) -> None:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        exists = fs.exists(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot access {uri}: {type(exc).__name__}: {exc}") from exc
    if not exists:
        raise InputError(f"input not found: {uri}")


def _list_uri(uri: str, config: InputConfig) -> list[dict[str, str]]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if any(ch in path for ch in "*?["):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(fs.find(path))
        elif fs.exists(path):
            paths = [path]
        else:
            raise InputError(f"input not found: {uri}")
    except InputError:
        raise
    except (OSError, ValueError) as exc:  # no such bucket, access denied, bad endpoint...
        raise InputError(f"cannot access {uri}: {type(exc).__name__}: {exc}") from exc
    refs = []
    for p in paths:
        kind = _forced_kind(config) or _kind_of(p)
        if kind is not None:
            refs.append({"uri": _with_protocol(fs, p, uri), "kind": kind})
    return refs


def _forced_kind(config: InputConfig) -> RefKind | None:
    return {"files": "file", "tar": "tar", "parquet": "parquet"}.get(config.format)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------
# Ray stage functions (pure: no Ray import; `pipeline.run` wires them)
# ------------------------------------------------------------------------------------------------------


def manifest_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Manifest lines (column ``text`` or ``uri``) -> {"uri", "kind": "file"} rows; blank lines dropped."""
    column = batch["uri"] if "uri" in batch else batch["text"]
    uris = [str(u).strip() for u in column if str(u).strip() and not str(u).lstrip().startswith("#")]
    return {"uri": np.array(uris, dtype=object), "kind": np.array(["file"] * len(uris), dtype=object)}


def as_refs(batch: pa.Table) -> pa.Table:
    """{"uri", "kind"} rows (``skip`` optional) -> `REF_SCHEMA` rows, ``skip`` empty where absent."""
    n = batch.num_rows
    skip_type = REF_SCHEMA.field("skip").type
    skip = batch.column("skip").cast(skip_type) if "skip" in batch.column_names else pa.array([[]] * n, skip_type)
    columns = [batch.column("uri").cast(pa.string()), batch.column("kind").cast(pa.string()), skip]
    return pa.table(columns, schema=REF_SCHEMA)


def file_ref_keys(batch: pa.Table) -> pa.Table:
    """File refs -> rows of the resume/de-duplication aggregation: {"uri", "listed": 1, "committed": 0}."""
    n = batch.num_rows
    return pa.table(
        {
            "uri": batch.column("uri").cast(pa.string()),
            "listed": pa.array(np.ones(n, dtype=np.int8)),
            "committed": pa.array(np.zeros(n, dtype=np.int8)),
        }
    )


def files_to_do(batch: pa.Table) -> pa.Table:
    """One aggregated row per URI {"uri", "listed", "committed"} (maxima over its key rows) -> the `REF_SCHEMA`
    file refs that are listed and not committed: each URI once, however often it was listed."""
    todo = batch.filter(pc.and_(pc.equal(batch.column("listed"), 1), pc.not_equal(batch.column("committed"), 1)))
    n = todo.num_rows
    return as_refs(pa.table({"uri": todo.column("uri"), "kind": pa.array(["file"] * n, pa.string())}))


def read_refs(batch: dict[str, np.ndarray], *, bytes_column: str, id_column: str | None) -> dict[str, np.ndarray]:
    """Refs -> image rows {"image_id", "source", "data", "error"} (error "" when read).

    Image ids in a ref's ``skip`` (optional column: committed members of a shard) are left out, and so are
    repeats of an id within one shard (a Parquet id column can repeat). Memory is bounded by one shard.
    """
    rows: list[tuple[str, str, bytes, str]] = []
    skips = batch["skip"] if "skip" in batch else [None] * len(batch["uri"])
    for uri, kind, skip in zip(batch["uri"], batch["kind"], skips):
        uri, kind = str(uri), str(kind)
        done = set() if skip is None else {str(s) for s in skip}  # grows with the shard's images only
        try:
            if kind == "file":
                images: Iterator[tuple[str, bytes]] = iter([(uri, read_bytes(uri))])
            elif kind == "tar":
                images = ((f"{uri}#{name}", data) for name, data in iter_tar_images(uri, skip=done, prefix=f"{uri}#"))
            elif kind == "parquet":
                images = iter_parquet_images(uri, bytes_column, id_column)
            else:
                raise ValueError(f"unknown input kind {kind!r}")
            for image_id, data in images:
                if image_id not in done:
                    done.add(image_id)
                    rows.append((image_id, uri, data, ""))
        except (*TRANSIENT_ERRORS, ValueError, tarfile.TarError, KeyError) as exc:
            if uri not in done:  # an unreadable shard's error row may be committed already
                rows.append((uri, uri, b"", f"unreadable: {type(exc).__name__}: {exc}"))
    return {
        "image_id": np.array([r[0] for r in rows], dtype=object),
        "source": np.array([r[1] for r in rows], dtype=object),
        "data": np.array([r[2] for r in rows], dtype=object),
        "error": np.array([r[3] for r in rows], dtype=object),
    }


def _retrying(what: str, action: Callable[[], T]) -> T:
    """Run ``action`` with bounded retries of transient storage errors (never of a missing object)."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return action()
        except FileNotFoundError:
            raise  # gone is gone: no retry
        except TRANSIENT_ERRORS as exc:
            if attempt == READ_ATTEMPTS - 1:
                raise
            wait = _RETRY_BASE_S * 2**attempt
            log.warning(
                "reading %s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt + 1, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def read_bytes(uri: str) -> bytes:
    """Whole object at ``uri``; a short read (size differs from the listing's) counts as an error."""

    def attempt() -> bytes:
        fs, path = fsspec.core.url_to_fs(uri)
        data = fs.cat_file(path)
        size = fs.size(path)
        if size is not None and len(data) != size:
            raise OSError(f"short read: got {len(data)} of {size} bytes")
        return data

    return _retrying(uri, attempt)


def iter_tar_images(uri: str, *, skip: Collection[str] = (), prefix: str = "") -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the first image member of each sample key, in archive order; members whose
    ``prefix + name`` is in ``skip`` are not extracted (they are still read: a tar has no index)."""
    data = read_bytes(uri)
    seen: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        for member in archive:
            if not member.isfile() or _kind_of(member.name) != "file":
                continue
            key = member.name.rsplit(".", 1)[0]
            if key in seen:
                continue
            seen.add(key)
            if prefix + member.name in skip:
                continue
            handle = archive.extractfile(member)
            yield member.name, handle.read() if handle else b""


def iter_parquet_images(uri: str, bytes_column: str, id_column: str | None) -> Iterator[tuple[str, bytes]]:
    """(image_id, bytes) of each row of a Parquet file with an image-bytes column."""
    table = pq.read_table(io.BytesIO(read_bytes(uri)), columns=[bytes_column] + ([id_column] if id_column else []))
    images = table.column(bytes_column).to_pylist()
    ids = table.column(id_column).to_pylist() if id_column else [f"{uri}#row={i}" for i in range(len(images))]
    for image_id, value in zip(ids, images):
        if isinstance(value, dict):  # e.g. Hugging Face datasets' {"bytes": ..., "path": ...}
            value = value.get("bytes")
        yield str(image_id), bytes(value or b"")
