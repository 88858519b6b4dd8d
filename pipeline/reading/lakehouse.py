"""An output snapshot registered in place as a Delta table and an Apache Iceberg table per output table.

A snapshot of an output is a sequence number ``seq``, the run that wrote it and the part files of each table
that it includes (paths inside ``out.fs``). Registering it makes each table's lakehouse file set equal to the
snapshot's, in one commit per table, without rewriting or copying a data file: the Parquet parts stay where the
run committed them, and Spark, Trino, DuckDB or Polars read them through the table's log.

- **Delta** (delta-rs, `register_delta`): the Delta table's root is the table folder itself (``OUTPUT/segments``,
  ``OUTPUT/images``), its log ``OUTPUT/<table>/_delta_log/`` (every reader of the output skips ``_`` names). A
  registration is one Delta commit: remove actions for the files the snapshot no longer lists, add actions (size,
  modification time, ``numRecords`` from the footer) for the new ones. Snapshot ↔ version: the commit carries
  the Delta transaction identifier ``txn(appId="panoptic-flow", version=seq)`` (``DeltaTable.transaction_version
  ("panoptic-flow")`` is the latest registered seq) and ``commitInfo["panoptic_flow.snapshot"] = seq``
  (``DeltaTable.history()`` maps every version to its seq). The first registration creates the table (version 0).
- **Iceberg** (pyiceberg, `register_iceberg`): tables ``<namespace>.segments`` and ``<namespace>.images``
  (default namespace ``panoptic_flow``). A registration is one Iceberg snapshot per table (one transaction:
  the files no longer listed deleted, the new ones added as ``add_files`` adds them: statistics from the
  footers, columns matched by name through the table's name mapping, since the parts carry no field ids). Its
  summary holds ``panoptic_flow.snapshot = seq``. Catalog: a named one (`load_catalog`, configured in
  ``~/.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__<NAME>__*``), or for a local output by default a SQLite catalog
  ``OUTPUT/_iceberg/catalog.db`` with its metadata under ``OUTPUT/_iceberg/warehouse/`` (`iceberg_catalog`).

Rules, the same for both formats:

- The snapshot's files of a table must lie under ``OUTPUT/<table>/``; they are read (footers only), never
  written. Data files that the snapshot no longer lists are removed from the table's log, not from the store.
- Registering the snapshot the table already holds (same seq, same files) is a no-op: no commit, the current
  version / identifier is returned. A seq lower than the one recorded, or the recorded seq with another file
  set, raises `ValueError` (the older state is reached by time travel: its Delta version / Iceberg snapshot).
- A newer seq with an unchanged file set is still committed (Delta: a commit without file actions; Iceberg: a
  snapshot without data changes), so that every registered seq has its version.
- One registration at a time per output: each commit is atomic (delta-rs writes the log entry with
  put-if-absent; Iceberg commits compare-and-swap in the catalog), but two registrations racing are not
  merged. On S3, delta-rs needs the store's conditional writes (``If-None-Match``), as the output's lease does.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import fsspec
import pyarrow.parquet as pq

from pipeline.exactly_once.output_paths import Output
from pipeline.inputs.storage import is_local
from pipeline.reading.output_tables import TABLE_SCHEMAS

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

logger = logging.getLogger(__name__)

SNAPSHOT_KEY = "panoptic_flow.snapshot"
"""The key of the snapshot seq in a Delta commit's ``commitInfo`` and an Iceberg snapshot's summary."""
RUN_KEY = "panoptic_flow.run_id"
"""The key of the run that wrote the snapshot (when given), beside `SNAPSHOT_KEY`."""
DELTA_APP_ID = "panoptic-flow"
"""The Delta transaction identifier (``txn.appId``) whose version is the registered snapshot seq."""
ICEBERG_FOLDER = "_iceberg"
"""``OUTPUT/_iceberg/``: a local output's default SQLite catalog (``catalog.db``) and warehouse (``warehouse/``)."""
ICEBERG_CATALOG_NAME = "panoptic_flow"
DEFAULT_NAMESPACE = "panoptic_flow"

_EXTRA = "pip install 'panoptic-flow[lakehouse]'"


def register_delta(
    out: Output, files: Mapping[str, Sequence[str]], *, snapshot: int, run_id: str | None = None
) -> dict[str, int]:
    """Register ``files`` (table name -> part paths inside ``out.fs``) as snapshot ``snapshot`` of the Delta table
    at ``OUTPUT/<table>/``: one commit per table (none when the table already holds this snapshot).

    Returns each table's Delta version that holds the snapshot. Raises `ValueError` for a file outside its table
    folder, an unknown table name, or a snapshot older than (or different from) the one registered.
    """
    try:
        from deltalake import CommitProperties, DeltaTable, Schema, Transaction
        from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions
    except ImportError as e:
        raise ImportError(f"registering a Delta table needs deltalake: {_EXTRA}") from e

    storage_options = delta_storage_options(out)
    versions: dict[str, int] = {}
    for table, paths in files.items():
        wanted = _relative_paths(out, table, paths)  # Delta path (percent-encoded, relative) -> path in out.fs
        uri = delta_uri(out, table)
        commit = CommitProperties(
            custom_metadata={SNAPSHOT_KEY: snapshot, **({RUN_KEY: run_id} if run_id else {})},
            app_transactions=[Transaction(DELTA_APP_ID, snapshot)],
        )
        if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
            adds = [_delta_add(out.fs, wanted[name], name, AddAction) for name in sorted(wanted)]
            create_table_with_add_actions(
                uri,
                Schema.from_arrow(TABLE_SCHEMAS[table]),
                adds,
                mode="error",
                name=table,
                description=f"panoptic-flow {table}: the output's Parquet parts, registered in place",
                storage_options=storage_options,
                commit_properties=commit,
            )
            versions[table] = DeltaTable(uri, storage_options=storage_options).version()
            logger.info("delta %s: created at version %d with %d files (snapshot %d)", table, 0, len(adds), snapshot)
            continue
        dt = DeltaTable(uri, storage_options=storage_options)
        current = {str(p): int(s) for p, s in zip(*_delta_files(dt))}
        recorded = dt.transaction_version(DELTA_APP_ID)
        if _already_registered("Delta", table, recorded, snapshot, set(current) == set(wanted)):
            versions[table] = dt.version()
            continue
        now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
        actions: list[Any] = [
            RemoveAction(name, data_change=True, deletion_timestamp=now_ms, size=current[name], partition_values={})
            for name in sorted(set(current) - set(wanted))
        ]
        actions += [_delta_add(out.fs, wanted[name], name, AddAction) for name in sorted(set(wanted) - set(current))]
        dt.create_write_transaction(actions, "append", TABLE_SCHEMAS[table], commit_properties=commit)
        dt.update_incremental()
        versions[table] = dt.version()
        logger.info(
            "delta %s: version %d, snapshot %d (%d files added, %d removed)",
            table,
            versions[table],
            snapshot,
            sum(isinstance(a, AddAction) for a in actions),
            sum(isinstance(a, RemoveAction) for a in actions),
        )
    return versions


def delta_uri(out: Output, table: str) -> str:
    """The URI of ``table``'s Delta table: its folder (``/abs/OUTPUT/segments``, ``s3://bucket/OUTPUT/segments``)."""
    folder = out.table(table)
    return folder if is_local(out.fs) else out.fs.unstrip_protocol(folder)


def delta_storage_options(out: Output) -> dict[str, str]:
    """delta-rs's ``storage_options`` for ``out``: empty for a local output; for ``s3://`` the endpoint, region
    and keys that ``out.fs`` (s3fs) was given or finds in the environment (``AWS_ENDPOINT_URL[_S3]``, ...), with
    ``AWS_ALLOW_HTTP`` for an ``http://`` endpoint. Anything left out, delta-rs takes from the environment."""
    if is_local(out.fs) or "s3" not in _protocols(out.fs):
        return {}
    client_kwargs: dict[str, Any] = dict(getattr(out.fs, "client_kwargs", None) or {})
    endpoint = (
        client_kwargs.get("endpoint_url")
        or getattr(out.fs, "endpoint_url", None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = client_kwargs.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": region,
        "AWS_ACCESS_KEY_ID": getattr(out.fs, "key", None),
        "AWS_SECRET_ACCESS_KEY": getattr(out.fs, "secret", None),
        "AWS_SESSION_TOKEN": getattr(out.fs, "token", None),
    }
    if endpoint and str(endpoint).startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    return {k: str(v) for k, v in options.items() if v}


def register_iceberg(
    out: Output,
    files: Mapping[str, Sequence[str]],
    *,
    snapshot: int,
    run_id: str | None = None,
    catalog: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
) -> dict[str, str]:
    """Register ``files`` (table name -> part paths inside ``out.fs``) as snapshot ``snapshot`` of the Iceberg
    tables ``<namespace>.<table>`` of ``catalog`` (`iceberg_catalog`): one Iceberg snapshot per table (none
    when the table already holds this snapshot). The namespace and tables are created when missing.

    Returns each table's identifier (``panoptic_flow.segments``). Raises `ValueError` as `register_delta` does,
    and for an output that is not local without a ``catalog`` name.
    """
    cat = iceberg_catalog(out, catalog=catalog)
    from pyiceberg.exceptions import NoSuchTableError
    from pyiceberg.io.pyarrow import parquet_file_to_data_file
    from pyiceberg.table import TableProperties

    cat.create_namespace_if_not_exists(namespace)
    identifiers: dict[str, str] = {}
    for table, paths in files.items():
        wanted = {out.fs.unstrip_protocol(p): p for p in _relative_paths(out, table, paths).values()}
        identifier = f"{namespace}.{table}"
        try:  # not create_table_if_not_exists: it writes a metadata file before it finds the table exists
            iceberg = cat.load_table(identifier)
        except NoSuchTableError:
            iceberg = cat.create_table(identifier, schema=TABLE_SCHEMAS[table])
        identifiers[table] = identifier
        current = {task.file.file_path: task.file for task in iceberg.scan().plan_files()}
        head = iceberg.current_snapshot()
        recorded_text = head.summary.additional_properties.get(SNAPSHOT_KEY) if head and head.summary else None
        recorded = int(recorded_text) if recorded_text is not None else None
        if _already_registered("Iceberg", identifier, recorded, snapshot, set(current) == set(wanted)):
            continue
        properties = {SNAPSHOT_KEY: str(snapshot), **({RUN_KEY: run_id} if run_id else {})}
        with iceberg.transaction() as tx:
            if tx.table_metadata.name_mapping() is None:  # the parts have no field ids: columns matched by name
                name_mapping = tx.table_metadata.schema().name_mapping.model_dump_json()
                tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING: name_mapping})
            with tx.update_snapshot(snapshot_properties=properties).overwrite() as change:
                for location in sorted(set(current) - set(wanted)):
                    change.delete_data_file(current[location])
                for location in sorted(set(wanted) - set(current)):
                    change.append_data_file(parquet_file_to_data_file(iceberg.io, tx.table_metadata, location))
        logger.info(
            "iceberg %s: snapshot %d (%d files added, %d removed)",
            identifier,
            snapshot,
            len(set(wanted) - set(current)),
            len(set(current) - set(wanted)),
        )
    return identifiers


def iceberg_catalog(out: Output, *, catalog: str | None = None) -> Catalog:
    """The Iceberg catalog for ``out``: pyiceberg's ``load_catalog(catalog)`` when named, else (local outputs
    only) the SQLite catalog ``OUTPUT/_iceberg/catalog.db`` with warehouse ``OUTPUT/_iceberg/warehouse/``,
    created on first use."""
    try:
        from pyiceberg.catalog import load_catalog
        from pyiceberg.catalog.sql import SqlCatalog
    except ImportError as e:
        raise ImportError(f"registering an Iceberg table needs pyiceberg and its SQL catalog: {_EXTRA}") from e
    if catalog is not None:
        return load_catalog(catalog)
    if not is_local(out.fs):
        raise ValueError(
            f"no Iceberg catalog named for {out.uri!r}: the default SQLite catalog is for local outputs only; "
            "name one configured in ~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__* (--catalog NAME)"
        )
    folder = posixpath.join(out.root, ICEBERG_FOLDER)
    os.makedirs(posixpath.join(folder, "warehouse"), exist_ok=True)
    return SqlCatalog(
        ICEBERG_CATALOG_NAME,
        uri=f"sqlite:///{posixpath.join(folder, 'catalog.db')}",
        warehouse=f"file://{posixpath.join(folder, 'warehouse')}",
    )


def _relative_paths(out: Output, table: str, paths: Sequence[str]) -> dict[str, str]:
    """``{relative path as the Delta log spells it (percent-encoded): path in out.fs}`` for one table's files."""
    if table not in TABLE_SCHEMAS:
        raise ValueError(f"table must be one of {sorted(TABLE_SCHEMAS)}, got {table!r}")
    folder = out.table(table) + "/"
    relative: dict[str, str] = {}
    for path in paths:
        if not path.startswith(folder) or not path.endswith(".parquet"):
            raise ValueError(f"{path!r} is not a Parquet file of {table!r} under {folder!r}")
        relative[quote(path[len(folder) :])] = path
    if len(relative) != len(paths):
        raise ValueError(f"the snapshot lists a file of {table!r} twice")
    return relative


def _already_registered(kind: str, table: str, recorded: int | None, snapshot: int, same_files: bool) -> bool:
    """Whether the table already holds ``snapshot`` (then nothing is committed); raise when it holds a newer one
    or the same seq with other files."""
    if recorded is None or recorded < snapshot:
        return False
    if recorded > snapshot:
        raise ValueError(
            f"{kind} table {table} already holds snapshot {recorded}: an older snapshot ({snapshot}) is not "
            "registered over it (time travel to its version instead)"
        )
    if not same_files:
        raise ValueError(f"{kind} table {table} holds snapshot {snapshot} with other files than the ones given")
    logger.info("%s %s: snapshot %d already registered", kind, table, snapshot)
    return True


def _delta_files(dt: Any) -> tuple[list[str], list[int]]:
    """The relative paths (as logged) and sizes of the files of a Delta table's current version."""
    actions = dt.get_add_actions(flatten=True)
    return [str(p) for p in actions.column("path").to_pylist()], [
        int(s) for s in actions.column("size_bytes").to_pylist()
    ]


def _delta_add(fs: fsspec.AbstractFileSystem, path: str, name: str, add_action: Any) -> Any:
    """The Delta add action of the existing part ``path`` (logged as ``name``): size, modification time and the
    row count from its footer."""
    info = fs.info(path)
    modified = info.get("mtime") or info.get("LastModified") or fs.modified(path)
    seconds = modified.timestamp() if isinstance(modified, datetime) else float(modified)
    with fs.open(path, "rb") as f:
        rows = pq.read_metadata(f).num_rows
    return add_action(
        path=name,
        size=int(info["size"]),
        partition_values={},
        modification_time=int(seconds * 1000),
        data_change=True,
        stats=json.dumps({"numRecords": rows}),
    )


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
