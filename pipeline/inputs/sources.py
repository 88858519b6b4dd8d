"""Input sources: turn the user's input URIs into *refs*, one per image file or shard (`REF_SCHEMA`).

Inputs (any fsspec URI: ``s3://`` via s3fs honouring the AWS configuration incl. ``AWS_ENDPOINT_URL``,
``gs://``, ``az://`` when their package is installed, local paths):

- a prefix, folder or glob of image files (an existing path is taken literally, even with ``[`` or ``*`` in
  its name; local folders are walked following symbolic links, each real folder once);
- WebDataset-style ``.tar`` shards (the first image member of each sample key; other members ignored);
- Parquet files with an image-bytes column (and an optional id column);
- a manifest: a ``.txt`` (one URI per line) or a Parquet file with a ``uri`` column listing image files.
  This is the scalable way: it is read by Ray workers, never listed on the driver. Lines are normalised
  (``file://``, ``./``, ``..``; relative lines resolve against the manifest's own folder).

A local FIFO, socket or device (also behind a symbolic link) is found by ``stat`` at listing time (counted,
logged) and becomes an error row "not a regular file" when its ref is read, without ever being opened. Listed
files whose names end in no image, ``.tar`` or ``.parquet`` extension are left out, counted and named
(`ResolvedInputs.left_out`); ``--input-format files`` reads them as images. Nothing under the job's output is
ever listed as an input.

Refs travel until `pipeline.inputs.readers.read_ref` reads their bytes (in the model actor's block call,
`pipeline.segmenting.block_call`); the resume filter and the de-duplication of repeated URIs work on refs
(`pipeline.exactly_once.resume`), so bytes of committed or repeated inputs are never read. A ref's ``skip`` lists
members of a shard that are already committed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS, InputConfig
from pipeline.exactly_once.output_paths import Output
from pipeline.inputs.readers import kind_of, parquet_columns_problem
from pipeline.inputs.storage import (
    DEFAULT_READ_TIMEOUT_S,
    TRANSIENT_ERRORS,
    describe_storage_error,
    is_local,
    object_version,
    read_filesystem,
)

log = logging.getLogger(__name__)

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


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> str:
    protocol = fsspec.core.split_protocol(uri)[0]
    return f"{protocol}://{path}" if protocol and protocol not in ("file", "local") else path


def resolve_inputs(
    config: InputConfig, *, output: str | None = None, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
) -> ResolvedInputs:
    """List what each input URI holds, leaving out anything under ``output``; raise `InputError` naming the
    URI when it is unusable. On S3 each request gives up after ``read_timeout_s`` without an answer (s3fs and
    botocore still retry it: the listing is done once, on the driver)."""
    refs: list[dict[str, Any]] = []
    manifests: list[str] = []
    left_out: list[str] = []
    left_out_count = 0
    excluded = Output.of(output) if output else None  # kept out of the listing (`Output.holds`)
    for uri in config.uris:
        if config.format == "manifest" or (
            config.format == "auto" and uri.lower().endswith((".txt", ".manifest", ".lst"))
        ):
            _require_exists(uri, read_timeout_s)
            manifests.append(uri)
            continue
        listing = _list_uri(uri, config, excluded, read_timeout_s)
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
    _check_parquet_columns([r["uri"] for r in refs if r["kind"] == "parquet"], config, read_timeout_s)
    return ResolvedInputs(refs, manifests, left_out_count, left_out, len(not_regular))


LEFT_OUT_EXAMPLES = 5  # files named in the line about files left out by their extension


def left_out_text(count: int, examples: list[str]) -> str:
    return (
        f"left out {count} files whose names end in no image, .tar or .parquet extension (e.g. "
        f"{', '.join(examples)}); `--input-format files` reads every listed file as an image"
    )


PARQUET_FILES_CHECKED = 4  # Parquet inputs whose columns are checked up front (the others give error rows)


def _check_parquet_columns(uris: list[str], config: InputConfig, read_timeout_s: float) -> None:
    """Raise `InputError` when one of the first Parquet inputs has no usable image column (a wrong
    ``--bytes-column`` or ``--id-column``): reading only their footers, before any cluster work."""
    for uri in uris[:PARQUET_FILES_CHECKED]:
        try:
            fs, path = read_filesystem(uri, read_timeout_s=read_timeout_s, single_attempt=False)
            with fs.open(path, "rb") as f:
                schema = pq.ParquetFile(f).schema_arrow
        except (*TRANSIENT_ERRORS, pa.ArrowException) as exc:
            raise InputError(f"{uri}: cannot read it as Parquet: {type(exc).__name__}: {exc}") from exc
        problem = parquet_columns_problem(schema, config.bytes_column, config.id_column)
        if problem:
            raise InputError(f"{uri}: {problem}")


def _require_exists(uri: str, read_timeout_s: float) -> None:
    try:
        fs, path = read_filesystem(uri, read_timeout_s=read_timeout_s, single_attempt=False)
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


def _list_uri(uri: str, config: InputConfig, excluded: Output | None, read_timeout_s: float) -> Listing:
    """The refs of one input URI and what was left out. A local ref that is no regular file has
    ``"regular": False`` (popped by `resolve_inputs`); its read gives the error row without opening it."""
    try:
        fs, path = read_filesystem(uri, read_timeout_s=read_timeout_s, single_attempt=False)
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
    for p in sorted(found):
        under_output = excluded is not None and excluded.holds(fs, p)
        kind = kind_of(p, config.format)
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
