"""`pipeline.reading.lakehouse`: an output's snapshots registered as Delta and Iceberg tables, read back by
delta-rs, pyiceberg and Polars row for row against pyarrow reading exactly the snapshot's files; no data file
is touched.

The output is a handful of parts written here in the declared schemas (lists and the RLE struct included, one
part in a sub-folder); snapshot 2 is snapshot 1 with one part pair gone and one added, as a retraction's rewrite
leaves it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.exactly_once.output_paths import Output
from pipeline.reading.lakehouse import (
    DELTA_APP_ID,
    SNAPSHOT_KEY,
    delta_storage_options,
    delta_uri,
    iceberg_catalog,
    register_delta,
    register_iceberg,
)
from pipeline.schema import IMAGES_SCHEMA, IMAGES_TABLE, SEGMENTS_SCHEMA, SEGMENTS_TABLE

deltalake = pytest.importorskip("deltalake")
pl = pytest.importorskip("polars")
pytest.importorskip("pyiceberg")

TABLES = (SEGMENTS_TABLE, IMAGES_TABLE)
SCHEMAS = {SEGMENTS_TABLE: SEGMENTS_SCHEMA, IMAGES_TABLE: IMAGES_SCHEMA}
Files = dict[str, list[str]]


def _rows(part: int) -> dict[str, list[dict[str, Any]]]:
    """Two ok images (with 0..2 segments) and one error image for part ``part``."""
    images: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    for i in range(2):
        image_id = f"s3://in/p{part}/img{i}.jpg"
        for s in range(i + part % 2 + 1):
            segments.append(
                {
                    "image_id": image_id,
                    "source": image_id,
                    "segment_id": s,
                    "category_id": 18 + s,
                    "category": f"class_{18 + s}",
                    "isthing": s == 0,
                    "score": 0.5 + s / 8,
                    "area": 100 * (part + 1) + s,
                    "bbox": [s, part, 4, 5],
                    "rle": {"size": [6, 8], "counts": f"{part}{i}{s}ab"},
                }
            )
        n = i + part % 2 + 1
        images.append(_image(image_id, status="ok", width=8, height=6, num_segments=n))
    images.append(_image(f"s3://in/p{part}/bad.jpg", status="error", error="corrupt image header"))
    return {SEGMENTS_TABLE: segments, IMAGES_TABLE: images}


def _image(image_id: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "image_id": image_id,
        "source": image_id,
        "member": None,
        "width": None,
        "height": None,
        "error": None,
        "retryable": False,
        "num_segments": 0,
        "run_id": "run-1",
        "input_size": 1234,
        "input_version": "etag-1",
    }
    return {**row, **values}


def _write_parts(root: Path, parts: Sequence[int]) -> Files:
    """One part pair per number in ``parts`` (``part-<hash>-r1.parquet``; part 1 in a sub-folder)."""
    files: Files = {table: [] for table in TABLES}
    for part in parts:
        name = f"part-{hashlib.sha256(str(part).encode()).hexdigest()[:16]}-r1.parquet"
        rows = _rows(part)
        for table in TABLES:
            folder = root / table / ("sub" if part == 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows[table], schema=SCHEMAS[table]), folder / name)
            files[table].append(str(folder / name))
    return files


def _sorted(table: pa.Table, name: str) -> list[dict[str, Any]]:
    keys = [("image_id", "ascending")] + ([("segment_id", "ascending")] if name == SEGMENTS_TABLE else [])
    return table.select(SCHEMAS[name].names).sort_by(keys).to_pylist()


def _expected(files: Mapping[str, Sequence[str]], table: str) -> list[dict[str, Any]]:
    """The rows of exactly these files, as pyarrow reads them."""
    return _sorted(pa.concat_tables(pq.read_table(p, schema=SCHEMAS[table]) for p in files[table]), table)


def _file_states(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("part-*.parquet"))}


@pytest.fixture()
def snapshots(tmp_path: Path) -> Iterator[tuple[Output, Files, Files]]:
    """An output with parts 0..2: snapshot A = parts 0 and 1, snapshot B = parts 0 and 2 (1 retracted)."""
    files = _write_parts(tmp_path / "out", [0, 1, 2])
    a = {table: paths[:2] for table, paths in files.items()}
    b = {table: [paths[0], paths[2]] for table, paths in files.items()}
    before = _file_states(tmp_path / "out")
    yield Output.of(str(tmp_path / "out")), a, b
    assert _file_states(tmp_path / "out") == before, "a data file was written"


def test_delta_tables_follow_the_snapshots_without_rewriting_a_file(snapshots: tuple[Output, Files, Files]) -> None:
    out, a, b = snapshots
    assert _expected(a, SEGMENTS_TABLE) != _expected(b, SEGMENTS_TABLE)  # the two snapshots differ

    first = register_delta(out, a, snapshot=1, run_id="run-1")
    assert register_delta(out, a, snapshot=1) == first  # the same snapshot again: no commit
    second = register_delta(out, b, snapshot=2, run_id="run-2")
    for table in TABLES:
        uri = delta_uri(out, table)
        assert uri == os.path.join(out.root, table)
        assert second[table] == first[table] + 1
        latest = deltalake.DeltaTable(uri)
        assert latest.version() == second[table]
        assert _sorted(latest.to_pyarrow_table(), table) == _expected(b, table)
        assert _sorted(pl.scan_delta(uri).collect().to_arrow(), table) == _expected(b, table)
        assert latest.transaction_version(DELTA_APP_ID) == 2
        assert latest.count() == sum(pq.read_metadata(p).num_rows for p in b[table])  # numRecords stats
        seq_of = {h["version"]: h.get(SNAPSHOT_KEY) for h in latest.history()}
        assert seq_of == {first[table]: 1, second[table]: 2}
        old = deltalake.DeltaTable(uri, version=first[table])
        assert _sorted(old.to_pyarrow_table(), table) == _expected(a, table)
        assert _sorted(pl.scan_delta(uri, version=first[table]).collect().to_arrow(), table) == _expected(a, table)
        assert sorted(old.file_uris()) == sorted(a[table])  # the parts in place, nested one included

    with pytest.raises(ValueError, match="already holds snapshot 2"):
        register_delta(out, a, snapshot=1)
    with pytest.raises(ValueError, match="with other files"):
        register_delta(out, a, snapshot=2)
    third = register_delta(out, b, snapshot=3)  # a newer seq, same files: a commit without file actions
    assert third == {table: v + 1 for table, v in second.items()}
    assert _sorted(deltalake.DeltaTable(delta_uri(out, SEGMENTS_TABLE)).to_pyarrow_table(), SEGMENTS_TABLE) == (
        _expected(b, SEGMENTS_TABLE)
    )


def test_iceberg_tables_follow_the_snapshots_without_rewriting_a_file(
    snapshots: tuple[Output, Files, Files], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLARS_ICEBERG_PLANNER", "pyiceberg")  # not the optional polars_iceberg plugin
    out, a, b = snapshots
    assert register_iceberg(out, a, snapshot=1, run_id="run-1") == {t: f"panoptic_flow.{t}" for t in TABLES}
    catalog = iceberg_catalog(out)
    heads = {t: catalog.load_table(f"panoptic_flow.{t}").current_snapshot().snapshot_id for t in TABLES}
    register_iceberg(out, a, snapshot=1)  # the same snapshot again: no new Iceberg snapshot
    register_iceberg(out, b, snapshot=2, run_id="run-2")
    assert os.path.exists(os.path.join(out.root, "_iceberg", "catalog.db"))
    for table in TABLES:
        iceberg = iceberg_catalog(out).load_table(f"panoptic_flow.{table}")
        assert iceberg.snapshots()[0].snapshot_id == heads[table]
        assert len(iceberg.snapshots()) == 2
        summaries = [s.summary.additional_properties for s in iceberg.snapshots()]  # type: ignore[union-attr]
        assert [s[SNAPSHOT_KEY] for s in summaries] == ["1", "2"]
        assert [s["panoptic_flow.run_id"] for s in summaries] == ["run-1", "run-2"]
        assert _sorted(iceberg.scan().to_arrow(), table) == _expected(b, table)
        assert _sorted(pl.scan_iceberg(iceberg).collect().to_arrow(), table) == _expected(b, table)
        assert _sorted(iceberg.scan(snapshot_id=heads[table]).to_arrow(), table) == _expected(a, table)
        old = pl.scan_iceberg(iceberg, snapshot_id=heads[table]).collect().to_arrow()
        assert _sorted(old, table) == _expected(a, table)
        located = sorted(task.file.file_path for task in iceberg.scan().plan_files())
        assert located == sorted(f"file://{p}" for p in b[table])  # the parts in place

    with pytest.raises(ValueError, match="already holds snapshot 2"):
        register_iceberg(out, a, snapshot=1)
    with pytest.raises(ValueError, match="with other files"):
        register_iceberg(out, a, snapshot=2)
    register_iceberg(out, b, snapshot=3)  # a newer seq, same files: a snapshot without data changes
    iceberg = catalog.load_table(f"panoptic_flow.{SEGMENTS_TABLE}")
    assert iceberg.current_snapshot().summary.additional_properties[SNAPSHOT_KEY] == "3"  # type: ignore[union-attr]
    assert _sorted(iceberg.scan().to_arrow(), SEGMENTS_TABLE) == _expected(b, SEGMENTS_TABLE)


def test_a_file_outside_its_table_folder_is_refused(snapshots: tuple[Output, Files, Files]) -> None:
    out, a, _ = snapshots
    swapped = {SEGMENTS_TABLE: a[IMAGES_TABLE]}
    with pytest.raises(ValueError, match="is not a Parquet file of 'segments'"):
        register_delta(out, swapped, snapshot=1)
    with pytest.raises(ValueError, match="table must be one of"):
        register_iceberg(out, {"masks": []}, snapshot=1)
    assert not os.path.exists(os.path.join(out.root, SEGMENTS_TABLE, "_delta_log"))


def test_iceberg_on_a_non_local_output_needs_a_catalog_name() -> None:
    out = Output.of("s3://some-bucket/out")
    with pytest.raises(ValueError) as error:
        register_iceberg(out, {SEGMENTS_TABLE: []}, snapshot=1)
    message = str(error.value)
    assert "\n" not in message
    assert "s3://some-bucket/out" in message
    assert "--catalog NAME" in message


@pytest.fixture(scope="module")
def moto_process() -> Iterator[str]:
    """A moto S3 server in a child process on 127.0.0.1: delta-rs holds the GIL while it waits on the store, so
    the session's in-process moto server (tests/conftest.py) would never answer it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_delta_over_s3(tmp_path: Path, moto_process: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # the session's S3 environment (tests/conftest.py's s3_env, once another test used it) names its in-process
    # server, which delta-rs reads from the environment too: point it at this test's server
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, moto_process)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_process})
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    local = _write_parts(tmp_path / "out", [0, 1, 2])
    remote: Files = {table: [] for table in TABLES}
    for table in TABLES:
        for path in local[table]:
            remote[table].append(f"{bucket}/out/{Path(path).relative_to(tmp_path / 'out').as_posix()}")
            fs.put_file(path, remote[table][-1])
    out = Output(f"s3://{bucket}/out", fs, f"{bucket}/out")  # the endpoint and keys only in this s3fs
    options = delta_storage_options(out)
    assert options == {
        "AWS_ENDPOINT_URL": moto_process,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ALLOW_HTTP": "true",
    }

    first = register_delta(out, {t: ps[:2] for t, ps in remote.items()}, snapshot=1)
    second = register_delta(out, {t: [ps[0], ps[2]] for t, ps in remote.items()}, snapshot=2)
    for table in TABLES:
        uri = delta_uri(out, table)
        assert uri == f"s3://{bucket}/out/{table}"
        latest = deltalake.DeltaTable(uri, storage_options=options)
        assert latest.version() == second[table] == first[table] + 1
        assert _sorted(latest.to_pyarrow_table(), table) == _expected(
            {table: [local[table][0], local[table][2]]}, table
        )
        old = deltalake.DeltaTable(uri, version=first[table], storage_options=options)
        assert _sorted(old.to_pyarrow_table(), table) == _expected({table: local[table][:2]}, table)
        assert _sorted(pl.scan_delta(uri, storage_options=options).collect().to_arrow(), table) == _sorted(
            latest.to_pyarrow_table(), table
        )

    # Another writer's commit at the next version is never overwritten: delta-rs commits with If-None-Match.
    planted = f"{bucket}/out/{IMAGES_TABLE}/_delta_log/{second[IMAGES_TABLE] + 1:020d}.json"
    fs.pipe(planted, b'{"commitInfo":{"operation":"planted"}}\n')
    third = register_delta(out, {IMAGES_TABLE: remote[IMAGES_TABLE]}, snapshot=3)
    assert third[IMAGES_TABLE] == second[IMAGES_TABLE] + 2
    assert fs.cat(planted) == b'{"commitInfo":{"operation":"planted"}}\n'
    latest = deltalake.DeltaTable(delta_uri(out, IMAGES_TABLE), storage_options=options)
    assert _sorted(latest.to_pyarrow_table(), IMAGES_TABLE) == _expected(local, IMAGES_TABLE)
    for path in local[IMAGES_TABLE]:  # the data files on S3 are the bytes put there
        assert fs.cat(f"{bucket}/out/{Path(path).relative_to(tmp_path / 'out').as_posix()}") == Path(path).read_bytes()
