"""Readers: a ref (`pipeline.inputs.sources.REF_SCHEMA`) read into image rows of raw bytes, and one image read back.

One `Reader` per ref kind, in the table `READERS`:

- ``"file"``: an image file or object, one row;
- ``"tar"``: a WebDataset-style shard, one row per sample key (its first image member, in archive order; other
  members ignored);
- ``"parquet"``: a file with an image-bytes column (binary, or a ``{"bytes": ...}`` struct) and an optional id
  column, one row per row (member ``row=N``).

A reader's ``rows`` reads a whole ref into `ImageRow` s (`read_ref`: the pipeline's block call,
`pipeline.segmenting.block_call`); its ``image`` reads the bytes of one image of it back, by the ``member`` its row
stored (`read_image`: ``panoptic-flow show``), so the pipeline and whatever draws its results read inputs one way.

Only regular files are read: a local FIFO, socket or device (also behind a symbolic link) becomes an error row
"not a regular file" without ever being opened. No read goes past the object's size or ``--max-bytes``
(`pipeline.inputs.storage.read_object`), and a read that receives nothing for ``--read-timeout`` seconds is given up
(a retryable error row "read timed out"). Raw bytes are read here and decoded in `pipeline.inputs.decode`, so one
bad object becomes one error row; an error that another attempt may not meet (unreachable store, timeout, throttling,
5xx) is marked ``retryable`` and redone by the next run.

Ids (``image_id``, `pipeline.inputs.ids`): a file's id is its URI with ``%`` and ``#`` percent-encoded; a shard
member's id is that of its shard, ``#``, and the member (tar member name, or ``row=N``), unless an
``--id-column`` gives it. The member also has a column of its own; ``""`` (`pipeline.inputs.ids.SHARD_ITSELF`) names
the shard itself (a shard that cannot be read, or the truncated rest of a tar). A ref's ``skip`` lists members
of a shard that are already committed: they are left out when it is read.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Collection, Iterator
from functools import partial
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS
from pipeline.inputs.ids import SHARD_ITSELF, file_id, member_id
from pipeline.inputs.storage import (
    DEFAULT_MAX_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    TRANSIENT_ERRORS,
    NotARegularFile,
    TooLarge,
    read_bytes,
    read_filesystem,
    read_object,
)

RefKind = Literal["file", "tar", "parquet"]


_FORCED_KINDS: dict[str, RefKind] = {"files": "file", "tar": "tar", "parquet": "parquet"}


def kind_of(path: str, input_format: str = "auto") -> RefKind | None:
    """The kind of ref ``path`` is: the one ``--input-format`` forces (``files``, ``tar``, ``parquet``), else by
    its extension (``.tar``, ``.parquet``, an image's); None for another extension."""
    if input_format in _FORCED_KINDS:
        return _FORCED_KINDS[input_format]
    lower = path.lower()
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(IMAGE_EXTENSIONS):
        return "file"
    return None


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


class ReadOptions(NamedTuple):
    """What a read needs besides the ref: the run's ``--bytes-column``, ``--id-column``, ``--max-bytes`` and
    ``--read-timeout``."""

    bytes_column: str = "image"
    id_column: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


class Reader(NamedTuple):
    """How one kind of ref is read."""

    rows: Callable[[str, set[str], ReadOptions], Iterator[ImageRow]]  # (uri, skip, options) -> its image rows
    image: Callable[[str, str | None, ReadOptions], bytes]  # (uri, member, options) -> one image's encoded bytes


def read_ref(
    uri: str,
    kind: str,
    skip: Collection[str],
    *,
    bytes_column: str,
    id_column: str | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> list[ImageRow]:
    """One ref -> its image rows (`ImageRow`, ``error`` "" when read): a file gives one, a shard one per member
    not in ``skip`` (committed members), plus a shard-level error row when part of it could not be read.

    Each object is read whole but never past ``max_bytes`` (``--max-bytes``; a larger object, shard included,
    is an error row "larger than --max-bytes"); a local input that is no regular file (a FIFO, socket or device,
    also behind a link) is an error row "not a regular file", never opened. A read that receives nothing for
    ``read_timeout_s`` seconds (``--read-timeout``) is a retryable error row "read timed out". An
    ``--id-column`` value repeated inside one Parquet shard gets an error row under the row's own id
    (``shard#row=N``) instead of a second row with the same id. Memory is bounded by one shard.
    """
    options = ReadOptions(bytes_column, id_column, max_bytes, read_timeout_s)
    return list(_reader(kind).rows(uri, set(skip), options))


def read_image(
    uri: str,
    kind: str,
    member: str | None,
    *,
    bytes_column: str = "image",
    id_column: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> bytes:
    """The encoded bytes of one image of a ref, by the ``member`` its row stored: the object itself (a file,
    ``member`` None), a tar member (its name exactly as stored, never normalised as a path), a Parquet row
    (``row=N``, or the value of ``id_column``). Raises `FileNotFoundError` when there is no such member
    (IndexError for a row past the end), ValueError when the member names nothing this kind can hold."""
    return _reader(kind).image(uri, member, ReadOptions(bytes_column, id_column, max_bytes, read_timeout_s))


def _reader(kind: str) -> Reader:
    reader = READERS.get(kind)
    if reader is None:
        raise ValueError(f"unknown input kind {kind!r}")  # a bug, not bad data
    return reader


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
    batch: dict[str, np.ndarray],
    *,
    bytes_column: str,
    id_column: str | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """Refs as columns ({"uri", "kind"}, optional "skip") -> the `image_columns` of all their rows (`read_ref`)."""
    n = len(batch["uri"])
    skips = batch["skip"] if "skip" in batch else [None] * n
    rows: list[ImageRow] = []
    for uri, kind, skip in zip(batch["uri"], batch["kind"], skips):
        done = () if skip is None else [str(s) for s in skip]
        rows.extend(
            read_ref(
                str(uri),
                str(kind),
                done,
                bytes_column=bytes_column,
                id_column=id_column,
                max_bytes=max_bytes,
                read_timeout_s=read_timeout_s,
            )
        )
    return image_columns(rows)


def _unreadable(exc: BaseException) -> str:
    return f"unreadable: {type(exc).__name__}: {exc}"


# -- files -------------------------------------------------------------------------------------------------


def _file_rows(uri: str, skip: set[str], options: ReadOptions) -> Iterator[ImageRow]:
    """The one row of an image file (``skip`` does not apply: a file has no members)."""
    try:
        data, info = read_object(uri, max_bytes=options.max_bytes, read_timeout_s=options.read_timeout_s)
    except FileNotFoundError as exc:
        yield ImageRow(file_id(uri), uri, None, None, None, b"", f"not found: {exc}", False)
    except (NotARegularFile, TooLarge) as exc:
        yield ImageRow(file_id(uri), uri, None, None, None, b"", str(exc), False)
    except TRANSIENT_ERRORS as exc:
        yield ImageRow(file_id(uri), uri, None, None, None, b"", _unreadable(exc), True)
    else:
        yield ImageRow(file_id(uri), uri, None, info.size, info.version, data, "", False)


def _file_image(uri: str, member: str | None, options: ReadOptions) -> bytes:
    if member is not None:
        raise ValueError(f"{uri} is an image file: it has no member {member!r}")
    return read_bytes(uri, max_bytes=options.max_bytes, read_timeout_s=options.read_timeout_s)


# -- shards: what tar and Parquet share --------------------------------------------------------------------

# (shard bytes, skip, options) -> (member, its id or None for the generated one, image bytes) of each image
Members = Callable[[bytes, set[str], ReadOptions], Iterator[tuple[str, str | None, bytes]]]


class ShardError(ValueError):
    """A shard that can be read only in part: its rows so far stand, the rest becomes one error row."""


def _shard_rows(uri: str, done: set[str], options: ReadOptions, *, members: Members) -> Iterator[ImageRow]:
    """The rows of one shard: its ``members`` (member, id or None, bytes) not in ``done``, then, when part of it
    could not be read, one shard-level error row (member `SHARD_ITSELF`)."""
    shard_row = ImageRow(member_id(uri, SHARD_ITSELF), uri, SHARD_ITSELF, None, None, b"", "", False)
    try:
        data, info = read_object(uri, max_bytes=options.max_bytes, read_timeout_s=options.read_timeout_s)
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
    seen: dict[str, int] = {}
    try:
        for member, image_id, image in members(data, done, options):
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


# -- tar ---------------------------------------------------------------------------------------------------


# A member name that is not UTF-8 (a Latin-1 name from an old tool) is read with its bytes escaped (``caf\\xe9.png``):
# a valid string for ids and Arrow, the same whenever the shard is read (`show` finds the member by it).
TAR_NAME_ERRORS = "backslashreplace"


def iter_tar_images(data: bytes, *, skip: Collection[str] = ()) -> Iterator[tuple[str, None, bytes]]:
    """(member name, None, bytes) of the first image member of each sample key, in archive order; members in
    ``skip`` are not extracted (they are still read: a tar has no index). Raises `ShardError` after the last
    whole member when the archive is cut short or corrupt further on."""
    seen: set[str] = set()
    last = "the first member"
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:", errors=TAR_NAME_ERRORS)  # noqa: SIM115 (closed below)
    except tarfile.TarError as exc:
        raise ShardError(f"unreadable: not a tar archive: {exc}") from exc
    with archive:
        try:
            for member in archive:
                if member.isfile() and kind_of(member.name) == "file":
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


def _tar_members(data: bytes, skip: set[str], options: ReadOptions) -> Iterator[tuple[str, str | None, bytes]]:
    return iter_tar_images(data, skip=skip)


def _tar_image(uri: str, member: str | None, options: ReadOptions) -> bytes:
    """One member's bytes, the archive streamed up to it (not read whole: a tar has no index)."""
    fs, path = read_filesystem(uri, read_timeout_s=options.read_timeout_s)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:", errors=TAR_NAME_ERRORS) as tar:
        for info in tar:  # stops at the member instead of indexing the whole archive
            if info.isfile() and info.name == member:  # the name exactly as stored (never normalised as a path)
                data = tar.extractfile(info)
                assert data is not None
                return data.read()
    raise FileNotFoundError(f"member {member!r} not found in {uri}")


# -- Parquet -----------------------------------------------------------------------------------------------


def _cell_bytes(value: Any) -> Any:
    """A bytes column's cell as its image bytes: binary itself, or a ``{"bytes": ...}`` struct's field (e.g.
    Hugging Face datasets' ``{"bytes": ..., "path": ...}``)."""
    return value.get("bytes") if isinstance(value, dict) else value


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
        yield f"row={i}", (None if image_id is None else str(image_id)), bytes(_cell_bytes(value) or b"")


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


def _parquet_members(data: bytes, skip: set[str], options: ReadOptions) -> Iterator[tuple[str, str | None, bytes]]:
    return iter_parquet_images(data, options.bytes_column, options.id_column)


def _parquet_image(uri: str, member: str | None, options: ReadOptions) -> bytes:
    """One row's bytes, reading only its row group: ``row=N``, or the row whose ``id_column`` holds ``member``."""
    if member is not None and member.startswith("row=") and member[len("row=") :].isdigit():
        return _parquet_row(uri, int(member[len("row=") :]), options)
    if options.id_column is None:
        raise ValueError(f"cannot find {member!r} in {uri}: not 'row=N' and the run has no id_column")
    fs, path = read_filesystem(uri, read_timeout_s=options.read_timeout_s)
    with fs.open(path, "rb") as f:
        table = pq.read_table(
            f, columns=[options.id_column, options.bytes_column], filters=[(options.id_column, "==", member)]
        )
    if table.num_rows == 0:
        raise FileNotFoundError(f"no row with {options.id_column} == {member!r} in {uri}")
    value = table.column(options.bytes_column)[0].as_py()
    return _image_bytes(value, f"{uri} column {options.bytes_column!r}")


def _parquet_row(uri: str, row: int, options: ReadOptions) -> bytes:
    column = options.bytes_column
    fs, path = read_filesystem(uri, read_timeout_s=options.read_timeout_s)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        offset = row
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if offset < n:
                value = parquet.read_row_group(group, columns=[column]).column(0)[offset].as_py()
                break
            offset -= n
        else:
            raise IndexError(f"{uri} has {parquet.metadata.num_rows} rows, no row {row}")
    return _image_bytes(value, f"{uri} row {row} column {column!r}")


def _image_bytes(value: Any, where: str) -> bytes:
    image = _cell_bytes(value)
    if not isinstance(image, bytes):
        raise ValueError(f"{where} holds no image bytes")
    return image


READERS: dict[str, Reader] = {
    "file": Reader(_file_rows, _file_image),
    "tar": Reader(partial(_shard_rows, members=_tar_members), _tar_image),
    "parquet": Reader(partial(_shard_rows, members=_parquet_members), _parquet_image),
}
