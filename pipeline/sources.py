"""Input sources: turn the user's input URIs into image rows of raw bytes, one row per image.

Inputs (any fsspec URI: ``s3://`` via s3fs honouring the AWS configuration incl. ``AWS_ENDPOINT_URL``,
``gs://``, ``az://`` when their package is installed, local paths):

- a prefix, folder or glob of image files (an existing path is taken literally, even with ``[`` or ``*`` in
  its name; local folders are walked following symbolic links, each real folder once);
- WebDataset-style ``.tar`` shards (the first image member of each sample key; other members ignored);
- Parquet files with an image-bytes column (and an optional id column);
- a manifest: a ``.txt`` (one URI per line) or a Parquet file with a ``uri`` column listing image files.
  This is the scalable way: it is read by Ray workers, never listed on the driver. Lines are normalised
  (``file://``, ``./``, ``..``; relative lines resolve against the manifest's own folder).

Only regular files are read: a local FIFO, socket or device (also behind a symbolic link) is found by ``stat``
at listing time (counted, logged) and becomes an error row "not a regular file" when its ref is read, without
ever being opened. No read goes past the object's size or ``--max-bytes`` (`pipeline.storage.read_object`).
Listed files whose names end in no image, ``.tar`` or ``.parquet`` extension are left out, counted and named
(`ResolvedInputs.left_out`); ``--input-format files`` reads them as images.

Nothing under the job's output is ever listed as an input. Raw bytes are read here and decoded in
`pipeline.decode`, so one bad object becomes one error row; an error that another attempt may not meet
(unreachable store, timeout, throttling, 5xx) is marked ``retryable`` and redone by the next run.

Ids (``image_id``) are unambiguous: a file's id is its URI (local: absolute path) with ``%`` and ``#``
percent-encoded, so it never contains ``#``; a shard member's id is that of its shard, ``#``, and the member
(tar member name, or ``row=N`` / the ``--id-column`` value for Parquet). The member also has a column of its
own; ``""`` names the shard itself (a shard that cannot be read, or the truncated rest of a tar).

Inputs travel as *refs* (`REF_SCHEMA`) until `read_ref` reads their bytes (in the model actor's shard call,
`pipeline.shard`); the resume filter and the de-duplication of repeated URIs work on refs (`pipeline.resume`),
so bytes of committed or repeated inputs are never read. A ref's ``skip`` lists members of a shard that are
already committed.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import posixpath
import stat
import tarfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS, InputConfig
from pipeline.ids import SHARD_ITSELF, file_id, member_id
from pipeline.storage import (
    DEFAULT_MAX_BYTES,
    TRANSIENT_ERRORS,
    NotARegularFile,
    TooLarge,
    describe_storage_error,
    is_local,
    object_version,
    read_object,
)

log = logging.getLogger(__name__)

RefKind = Literal["file", "tar", "parquet"]
REF_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("kind", pa.string()),
        ("skip", pa.list_(pa.string())),  # committed members of a shard, left out when it is read
        ("size", pa.int64()),  # from the listing (null: not listed, e.g. a manifest line)
        ("version", pa.string()),  # ETag / generation / mtime from the listing
    ]
)


class InputError(ValueError):
    """The inputs cannot be used (nothing found, no such bucket, unknown format); raised before any work."""


@dataclass(frozen=True)
class ResolvedInputs:
    refs: list[dict[str, Any]]  # {"uri", "kind", "size", "version"} rows listed on the driver
    manifests: list[str]  # manifest URIs, expanded by Ray workers
    left_out: int = 0  # listed files left out by their extension (no image, tar or Parquet name)
    left_out_examples: list[str] = dataclasses.field(default_factory=list)  # the first few of them
    not_regular: int = 0  # local inputs that are FIFOs, sockets or devices: error rows, never opened


# -- listing on the driver -----------------------------------------------------------------------------------


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


def output_location(output: str | None) -> tuple[fsspec.AbstractFileSystem, str] | None:
    """(filesystem, root path) of an output URI, to keep it out of the listing; None when there is none."""
    if not output:
        return None
    fs, root = fsspec.core.url_to_fs(output)
    if is_local(fs):
        root = os.path.realpath(root)
    return fs, root.rstrip("/")


def resolve_inputs(config: InputConfig, *, output: str | None = None) -> ResolvedInputs:
    """List what each input URI holds, leaving out anything under ``output``; raise `InputError` naming the
    URI when it is unusable."""
    refs: list[dict[str, Any]] = []
    manifests: list[str] = []
    left_out: list[str] = []
    left_out_count = 0
    excluded = output_location(output)
    for uri in config.uris:
        if config.format == "manifest" or (
            config.format == "auto" and uri.lower().endswith((".txt", ".manifest", ".lst"))
        ):
            _require_exists(uri)
            manifests.append(uri)
            continue
        listing = _list_uri(uri, config, excluded)
        if not listing.refs:
            under = listing.under_output
            inside = f" ({under} files under the output {output} left out)" if under else ""
            others = f" ({left_out_text(listing.left_out_count, listing.left_out)})" if listing.left_out_count else ""
            raise InputError(
                f"no images found under {uri} (looked for {', '.join(IMAGE_EXTENSIONS)}, .tar, .parquet){inside}"
                f"{others}"
            )
        if listing.under_output:
            log.warning(
                "left out %d files under the output %s found in the input %s", listing.under_output, output, uri
            )
        refs.extend(listing.refs)
        left_out_count += listing.left_out_count
        left_out.extend(listing.left_out[: LEFT_OUT_EXAMPLES - len(left_out)])
    if left_out_count:
        log.warning("%s", left_out_text(left_out_count, left_out))
    not_regular = [r["uri"] for r in refs if r.pop("regular", True) is False]
    if not_regular:
        log.warning(
            "%d inputs are not regular files (FIFOs, sockets, devices; e.g. %s): they become error rows and are "
            "never opened",
            len(not_regular),
            ", ".join(not_regular[:LEFT_OUT_EXAMPLES]),
        )
    _check_parquet_columns([r["uri"] for r in refs if r["kind"] == "parquet"], config)
    return ResolvedInputs(refs, manifests, left_out_count, left_out, len(not_regular))


LEFT_OUT_EXAMPLES = 5  # files named in the line about files left out by their extension


def left_out_text(count: int, examples: list[str]) -> str:
    return (
        f"left out {count} files whose names end in no image, .tar or .parquet extension (e.g. "
        f"{', '.join(examples)}); `--input-format files` reads every listed file as an image"
    )


PARQUET_FILES_CHECKED = 4  # Parquet inputs whose columns are checked up front (the others give error rows)


def _check_parquet_columns(uris: list[str], config: InputConfig) -> None:
    """Raise `InputError` when one of the first Parquet inputs has no usable image column (a wrong
    ``--bytes-column`` or ``--id-column``): reading only their footers, before any cluster work."""
    for uri in uris[:PARQUET_FILES_CHECKED]:
        try:
            fs, path = fsspec.core.url_to_fs(uri)
            with fs.open(path, "rb") as f:
                schema = pq.ParquetFile(f).schema_arrow
        except (*TRANSIENT_ERRORS, pa.ArrowException) as exc:
            raise InputError(f"{uri}: cannot read it as Parquet: {type(exc).__name__}: {exc}") from exc
        problem = parquet_columns_problem(schema, config.bytes_column, config.id_column)
        if problem:
            raise InputError(f"{uri}: {problem}")


def _require_exists(uri: str) -> None:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        exists = fs.exists(path)
    except (*TRANSIENT_ERRORS, ValueError) as exc:
        raise InputError(describe_storage_error(uri, exc)) from exc
    if not exists:
        raise InputError(f"input not found: {uri}")


class Listing(NamedTuple):
    refs: list[dict[str, Any]]
    under_output: int  # files left out because they are under the output
    left_out_count: int  # files left out by their extension
    left_out: list[str]  # the first `LEFT_OUT_EXAMPLES` of them


def _list_uri(uri: str, config: InputConfig, excluded: tuple[fsspec.AbstractFileSystem, str] | None) -> Listing:
    """The refs of one input URI and what was left out. A local ref that is no regular file has
    ``"regular": False`` (popped by `resolve_inputs`); its read gives the error row without opening it."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if is_local(fs):
            found = _walk_local(path)
        elif fs.exists(path) and not fs.isdir(path):
            found = {path: fs.info(path)}
        elif fs.isdir(path):
            found = fs.find(path, detail=True)
        elif any(ch in path for ch in "*?["):
            found = fs.glob(path, detail=True)
        else:
            raise InputError(f"input not found: {uri}")
    except InputError:
        raise
    except (*TRANSIENT_ERRORS, ValueError) as exc:  # no such bucket, access denied, bad endpoint...
        raise InputError(describe_storage_error(uri, exc)) from exc
    refs, skipped, left_out, left_out_count = [], 0, [], 0
    same_fs = excluded is not None and type(excluded[0]) is type(fs)
    for p in sorted(found):
        under_output = same_fs and (p == excluded[1] or p.startswith(excluded[1] + "/"))  # type: ignore[index]
        kind = _forced_kind(config) or _kind_of(p)
        if kind is None:
            if not under_output:
                left_out_count += 1
                if len(left_out) < LEFT_OUT_EXAMPLES:
                    left_out.append(_with_protocol(fs, p, uri))
            continue
        if under_output:
            skipped += 1
            continue
        info = found[p]
        size = info.get("size")
        ref = {
            "uri": _with_protocol(fs, p, uri),
            "kind": kind,
            "size": None if size is None else int(size),
            "version": object_version(info),
        }
        if info.get("regular") is False:
            ref["regular"] = False
        refs.append(ref)
    return Listing(refs, skipped, left_out_count, left_out)


def _walk_local(path: str) -> dict[str, dict[str, Any]]:
    """{real-path-free absolute path: {"size", "mtime"}} of the files at a local path: a file, a folder
    (walked following symbolic links, each real folder once: a link loop is visited once and logged) or,
    when no such path exists, a glob. A broken link is listed, so that reading it gives an error row."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        return {path: _local_info(path)}
    if os.path.isdir(path):
        found: dict[str, dict[str, Any]] = {}
        seen: set[tuple[int, int]] = set()
        for folder, subfolders, files in os.walk(path, followlinks=True):
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in seen:
                log.warning("not listing %s again: a symbolic link leads back to a folder already listed", folder)
                subfolders.clear()
                continue
            seen.add((stat.st_dev, stat.st_ino))
            for name in files:
                full = os.path.join(folder, name)
                found[full] = _local_info(full)
        return found
    import glob

    matches = glob.glob(path, recursive=True)
    if not matches and not any(ch in path for ch in "*?["):
        raise InputError(f"input not found: {path}")
    found = {}
    for match in matches:
        found.update(_walk_local(match) if os.path.isdir(match) else {match: _local_info(match)})
    return found


def _local_info(path: str) -> dict[str, Any]:
    """{"size", "mtime", "regular"} by ``os.stat`` (links followed; nothing is opened)."""
    try:
        status = os.stat(path)
    except OSError:  # a broken link: listed, its read gives the error row
        return {"size": None, "mtime": None}
    return {"size": status.st_size, "mtime": status.st_mtime, "regular": stat.S_ISREG(status.st_mode)}


def _forced_kind(config: InputConfig) -> RefKind | None:
    return {"files": "file", "tar": "tar", "parquet": "parquet"}.get(config.format)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------
# Ray stage functions (pure: no Ray import; `pipeline.run` wires them)
# ------------------------------------------------------------------------------------------------------


def normalise_uri(line: str, *, base: str) -> str:
    """A manifest line as the URI it names: ``file://`` dropped, ``.``/``..`` and repeated ``/`` resolved,
    relative lines resolved against ``base`` (the manifest's folder, itself a local path or a URI)."""
    protocol, rest = fsspec.core.split_protocol(line)
    if protocol in ("file", "local"):
        protocol = None
    if protocol is None and not rest.startswith("/"):  # relative to the manifest's folder
        base_protocol, base_path = fsspec.core.split_protocol(base)
        protocol = None if base_protocol in (None, "file", "local") else base_protocol
        rest = posixpath.join(base_path, rest)
    if protocol is None:
        return posixpath.normpath("/" + rest.lstrip("/"))
    bucket, _, key = rest.partition("/")
    key = posixpath.normpath("/" + key).lstrip("/") if key else ""
    return f"{protocol}://{bucket}/{key}" if key else f"{protocol}://{bucket}"


def manifest_base(manifest: str) -> str:
    """The folder relative manifest lines resolve against (local paths made absolute)."""
    protocol, path = fsspec.core.split_protocol(manifest)
    if protocol in (None, "file", "local"):
        return os.path.dirname(os.path.abspath(path))
    return f"{protocol}://{posixpath.dirname(path)}"


def manifest_rows(batch: dict[str, np.ndarray], *, base: str) -> dict[str, np.ndarray]:
    """Manifest lines (column ``text`` or ``uri``) -> normalised {"uri", "kind": "file"} rows (`normalise_uri`
    against ``base``); blank lines and ``#`` comments dropped."""
    column = batch["uri"] if "uri" in batch else batch["text"]
    uris = [
        normalise_uri(str(u).strip(), base=base)
        for u in column
        if str(u).strip() and not str(u).lstrip().startswith("#")
    ]
    return {"uri": np.array(uris, dtype=object), "kind": np.array(["file"] * len(uris), dtype=object)}


def as_refs(batch: pa.Table) -> pa.Table:
    """Rows with ``uri`` and ``kind`` (the other `REF_SCHEMA` columns optional) -> `REF_SCHEMA` rows."""
    n = batch.num_rows
    columns = []
    for field in REF_SCHEMA:
        if field.name in batch.column_names:
            columns.append(batch.column(field.name).cast(field.type))
        elif field.name == "skip":
            columns.append(pa.array([[]] * n, field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.table(columns, schema=REF_SCHEMA)


class ImageRow(NamedTuple):
    """One image as `read_ref` gives it (``data`` empty and ``error`` set when it could not be read)."""

    image_id: str
    source: str
    member: str | None
    input_size: int | None
    input_version: str | None
    data: bytes
    error: str
    retryable: bool


def read_ref(
    uri: str,
    kind: str,
    skip: Collection[str],
    *,
    bytes_column: str,
    id_column: str | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[ImageRow]:
    """One ref -> its image rows (`ImageRow`, ``error`` "" when read): a file gives one, a shard one per member
    not in ``skip`` (committed members), plus a shard-level error row when part of it could not be read.

    Each object is read whole but never past ``max_bytes`` (``--max-bytes``; a larger object, shard included,
    is an error row "larger than --max-bytes"); a local input that is no regular file (a FIFO, socket or device,
    also behind a link) is an error row "not a regular file", never opened. An ``--id-column`` value repeated
    inside one Parquet shard gets an error row under the row's own id (``shard#row=N``) instead of a second row
    with the same id. Memory is bounded by one shard.
    """
    if kind == "file":
        return [_read_file(uri, max_bytes=max_bytes)]
    if kind in ("tar", "parquet"):
        return list(
            _read_shard(uri, kind, set(skip), bytes_column=bytes_column, id_column=id_column, max_bytes=max_bytes)
        )
    raise ValueError(f"unknown input kind {kind!r}")  # a bug, not bad data


def ref_rows(refs: pa.Table) -> Iterator[tuple[str, str, list[str]]]:
    """(uri, kind, skip) of each `REF_SCHEMA` row (``skip`` optional), in order."""
    n = refs.num_rows
    skips = refs.column("skip").to_pylist() if "skip" in refs.column_names else [None] * n
    for uri, kind, skip in zip(refs.column("uri").to_pylist(), refs.column("kind").to_pylist(), skips):
        yield str(uri), str(kind), [str(s) for s in skip or ()]


def image_columns(rows: list[ImageRow]) -> dict[str, np.ndarray]:
    """Image rows as columns {`INPUT_COLUMNS`, "data", "error", "retryable"}."""
    return {
        name: np.array([getattr(r, name) for r in rows], dtype=object if name != "retryable" else bool)
        for name in ImageRow._fields
    }


def read_refs(
    batch: dict[str, np.ndarray], *, bytes_column: str, id_column: str | None, max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, np.ndarray]:
    """Refs as columns ({"uri", "kind"}, optional "skip") -> the `image_columns` of all their rows (`read_ref`)."""
    n = len(batch["uri"])
    skips = batch["skip"] if "skip" in batch else [None] * n
    rows: list[ImageRow] = []
    for uri, kind, skip in zip(batch["uri"], batch["kind"], skips):
        done = () if skip is None else [str(s) for s in skip]
        rows.extend(
            read_ref(str(uri), str(kind), done, bytes_column=bytes_column, id_column=id_column, max_bytes=max_bytes)
        )
    return image_columns(rows)


def _read_file(uri: str, *, max_bytes: int) -> ImageRow:
    try:
        data, info = read_object(uri, max_bytes=max_bytes)
    except FileNotFoundError as exc:
        return ImageRow(file_id(uri), uri, None, None, None, b"", f"not found: {exc}", False)
    except (NotARegularFile, TooLarge) as exc:
        return ImageRow(file_id(uri), uri, None, None, None, b"", str(exc), False)
    except TRANSIENT_ERRORS as exc:
        return ImageRow(file_id(uri), uri, None, None, None, b"", _unreadable(exc), True)
    return ImageRow(file_id(uri), uri, None, info.size, info.version, data, "", False)


def _unreadable(exc: BaseException) -> str:
    return f"unreadable: {type(exc).__name__}: {exc}"


def _read_shard(
    uri: str, kind: str, done: set[str], *, bytes_column: str, id_column: str | None, max_bytes: int
) -> Iterator[ImageRow]:
    """The rows of one tar / Parquet shard: its members not in ``done``, then, when part of it could not be
    read, one shard-level error row (member `SHARD_ITSELF`)."""
    shard_row = ImageRow(member_id(uri, SHARD_ITSELF), uri, SHARD_ITSELF, None, None, b"", "", False)
    try:
        data, info = read_object(uri, max_bytes=max_bytes)
    except FileNotFoundError as exc:
        if SHARD_ITSELF not in done:
            yield shard_row._replace(error=f"not found: {exc}")
        return
    except (NotARegularFile, TooLarge) as exc:
        if SHARD_ITSELF not in done:
            yield shard_row._replace(error=str(exc))
        return
    except TRANSIENT_ERRORS as exc:
        if SHARD_ITSELF not in done:
            yield shard_row._replace(error=_unreadable(exc), retryable=True)
        return
    shard_row = shard_row._replace(input_size=info.size, input_version=info.version)
    members = iter_tar_images(data, skip=done) if kind == "tar" else iter_parquet_images(data, bytes_column, id_column)
    seen: dict[str, int] = {}
    try:
        for member, image_id, image in members:
            if member in done:
                continue
            image_id = image_id or member_id(uri, member)
            repeat = seen.get(image_id, 0)
            seen[image_id] = repeat + 1
            if repeat:  # an --id-column value again: an error row under the row's own id
                error = f"repeated image id {image_id!r} in this shard (its first row is kept)"
                yield shard_row._replace(image_id=member_id(uri, member), member=member, error=error)
            else:
                yield shard_row._replace(image_id=image_id, member=member, data=image)
    except ShardError as exc:
        if SHARD_ITSELF not in done:
            yield shard_row._replace(error=str(exc))


class ShardError(ValueError):
    """A shard that can be read only in part: its rows so far stand, the rest becomes one error row."""


def iter_tar_images(data: bytes, *, skip: Collection[str] = ()) -> Iterator[tuple[str, None, bytes]]:
    """(member name, None, bytes) of the first image member of each sample key, in archive order; members in
    ``skip`` are not extracted (they are still read: a tar has no index). Raises `ShardError` after the last
    whole member when the archive is cut short or corrupt further on."""
    seen: set[str] = set()
    last = "the first member"
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115 (closed by the `with` below)
    except tarfile.TarError as exc:
        raise ShardError(f"unreadable: not a tar archive: {exc}") from exc
    with archive:
        try:
            for member in archive:
                if member.isfile() and _kind_of(member.name) == "file":
                    key = member.name.rsplit(".", 1)[0]
                    if key not in seen:
                        seen.add(key)
                        if member.name not in skip:
                            handle = archive.extractfile(member)
                            image = handle.read() if handle else b""
                            if len(image) != member.size:
                                raise ShardError(f"truncated tar: member {member.name} is cut short")
                            yield member.name, None, image
                last = f"member {member.name}"
        except tarfile.TarError as exc:
            raise ShardError(f"truncated or corrupt tar after {last}: {exc}") from exc
        end = archive.offset  # where the next header would start: the end-of-archive marker in a whole tar
    if end + 512 > len(data) or any(data[end : end + 512]):
        raise ShardError(
            f"truncated tar: {len(data) - end} bytes after {last} are neither a member nor the end-of-archive "
            "marker; members after it are missing"
        )


def iter_parquet_images(
    data: bytes, bytes_column: str, id_column: str | None
) -> Iterator[tuple[str, str | None, bytes]]:
    """("row=N", the id column's value or None, bytes) of each row of a Parquet file with an image-bytes
    column; a file whose columns do not fit raises `ShardError` naming what is wrong."""
    try:
        file = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"unreadable: not a Parquet file: {exc}") from exc
    problem = parquet_columns_problem(file.schema_arrow, bytes_column, id_column)
    if problem:
        raise ShardError(problem)
    try:
        table = file.read(columns=[bytes_column] + ([id_column] if id_column else []))
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"unreadable: corrupt Parquet data: {exc}") from exc
    images = table.column(bytes_column).to_pylist()
    ids = table.column(id_column).to_pylist() if id_column else [None] * len(images)
    for i, (image_id, value) in enumerate(zip(ids, images)):
        if isinstance(value, dict):  # e.g. Hugging Face datasets' {"bytes": ..., "path": ...}
            value = value.get("bytes")
        yield f"row={i}", (None if image_id is None else str(image_id)), bytes(value or b"")


def parquet_columns_problem(schema: pa.Schema, bytes_column: str, id_column: str | None) -> str | None:
    """Why a Parquet file with ``schema`` cannot be read as images (None when it can)."""
    names = schema.names
    if bytes_column not in names:
        return f"no column {bytes_column!r} with image bytes (columns: {', '.join(names)}; see --bytes-column)"
    kind = schema.field(bytes_column).type
    if pa.types.is_struct(kind):  # {"bytes": ..., "path": ...}
        kind = kind.field("bytes").type if kind.get_field_index("bytes") >= 0 else kind
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)):
        return f"column {bytes_column!r} holds {kind}, not image bytes (binary)"
    if id_column is not None and id_column not in names:
        return f"no id column {id_column!r} (columns: {', '.join(names)}; see --id-column)"
    return None
