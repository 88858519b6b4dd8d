"""Commits: model actors commit parts named by their content; the driver receives one small row per part.

Unit tests run `pipeline.exactly_once.commit.OutputCommitter.write_part` and `pipeline.exactly_once.parts` directly
on local folders and on S3 (moto on loopback); the Ray test runs the whole job on a multi-node cluster (a head without
CPUs, two worker nodes) with actors killed between a part's two files and after both, and mid-batch
(`tests.pipeline.fault_write_stage`, in its own process and cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease, LeaseLost
from pipeline.exactly_once.parts import COUNTS_KEY, PartGatherer, part_name, part_run, split_results
from pipeline.inputs.storage import TRANSIENT_ERRORS
from pipeline.schema import PART_ROW_SCHEMA, RESULT_SCHEMA
from pipeline.segmenting.rle import decode_rle
from tests.pipeline.fault_probes import assert_exactly_once, committed_parts
from tests.pipeline.images import photo_bytes

REPO = Path(__file__).resolve().parents[2]
RLE_2X3_LEFT = {"size": [2, 3], "counts": "042"}  # column-major: 0 zeros, 4 ones (two left columns), 2 zeros


def _result(image_id: str, *, segments: int = 0, error: str | None = None, retryable: bool = False) -> dict:
    segment = {"category_id": 1, "category": "person", "isthing": True, "score": 0.9, "area": 4,
               "bbox": [0, 0, 2, 2], "rle": RLE_2X3_LEFT}  # fmt: skip
    return {
        "image_id": image_id,
        "source": image_id.split("#")[0],
        "member": image_id.split("#")[1] if "#" in image_id else None,
        "input_size": 10,
        "input_version": "v1",
        "width": None if error else 3,
        "height": None if error else 2,
        "error": error,
        "retryable": retryable,
        "status": "error" if error else "ok",
        "segments": [{**segment, "segment_id": i} for i in range(segments)],
    }


def _results(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=RESULT_SCHEMA)


def test_split_results_flattens_segments_and_counts_them() -> None:
    results = _results(_result("a.jpg", segments=2), _result("b.jpg"), _result("c.jpg", error="corrupt"))
    images, segments = split_results(results, run_id="r1")
    assert images.column("num_segments").to_pylist() == [2, 0, 0]
    assert images.column("run_id").to_pylist() == ["r1"] * 3
    assert images.column("input_version").to_pylist() == ["v1"] * 3
    assert segments.column("image_id").to_pylist() == ["a.jpg", "a.jpg"]
    assert segments.column("segment_id").to_pylist() == [0, 1]
    rle = segments.column("rle")[0].as_py()
    assert decode_rle(rle["size"], rle["counts"]).tolist() == [[True, True, False], [True, True, False]]


def test_part_names_depend_on_the_set_of_ids_and_the_run_only() -> None:
    run = "20261208T015000Z-abc123"
    assert part_name(["b", "a", "c"], run) == part_name(["c", "b", "a"], run)
    assert part_name(["a", "b"], run) != part_name(["a", "b", "c"], run)
    assert part_name(["a", "b"], run) != part_name(["a", "b"], "20261208T015001Z-abc124")  # never another run's file
    assert part_name(["a"], run).startswith("part-") and part_name(["a"], run).endswith(f"-{run}.parquet")
    assert part_run(part_name(["a"], run)) == run and part_run("part-0123456789abcdef01234567.parquet") is None


def test_write_part_commits_segments_then_images_with_counts_in_the_footer(tmp_path: Path) -> None:
    output = tmp_path / "out"
    results = _results(_result("a.jpg", segments=3), _result("b.jpg", error="unreadable", retryable=True))
    with Lease.acquire(str(output), "r1"):
        row = OutputCommitter(str(output), "r1").write_part(results)
        again = OutputCommitter(str(output), "r1").write_part(results)  # a retry: same name
    assert row is not None and again is not None and row["part"] == again["part"] == part_name(["a.jpg", "b.jpg"], "r1")
    assert (row["images_ok"], row["images_error"], row["images_retryable"], row["segments"]) == (1, 1, 1, 3)
    assert [p.name for p in committed_parts(output)] == [row["part"]]
    assert [p.name for p in (output / "segments").iterdir()] == [row["part"]]
    footer = pq.ParquetFile(output / "images" / row["part"]).schema_arrow.metadata
    assert json.loads(footer[COUNTS_KEY]) == {"images_ok": 1, "images_error": 1, "images_retryable": 1, "segments": 3}
    images = pads.dataset(str(output / "images")).to_table().to_pylist()
    assert [(r["image_id"], r["status"], r["retryable"], r["num_segments"]) for r in images] == [
        ("a.jpg", "ok", False, 3),
        ("b.jpg", "error", True, 0),
    ]


def test_write_part_refuses_to_commit_without_the_lease(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with Lease.acquire(str(output), "someone-else"), pytest.raises(LeaseLost):
        OutputCommitter(str(output), "r1").write_part(_results(_result("a.jpg")))
    assert committed_parts(output) == [] and not (output / "segments").exists()


def test_an_id_repeated_across_shards_becomes_an_error_row_with_its_own_id(tmp_path: Path) -> None:
    """--id-column values can repeat across Parquet shards; in one part the second is an error row."""
    first, second = _result("s1.parquet#row=0", segments=1), _result("s2.parquet#row=4", segments=1)
    first["image_id"] = second["image_id"] = "cat-17"
    output = tmp_path / "out"
    with Lease.acquire(str(output), "r1"):
        OutputCommitter(str(output), "r1").write_part(_results(first, second))
    rows = pads.dataset(str(output / "images")).to_table().to_pylist()
    assert [(r["image_id"], r["status"]) for r in rows] == [("cat-17", "ok"), ("s2.parquet#row=4", "error")]
    assert rows[1]["error"] == "repeated image id 'cat-17' (also read from s1.parquet)"
    segments = pads.dataset(str(output / "segments")).to_table()
    assert segments.column("image_id").to_pylist() == ["cat-17"]


def test_the_gatherer_cuts_results_into_whole_parts_in_order() -> None:
    gatherer = PartGatherer(rows_per_file=3)
    batches = [_results(*[_result(f"{b}-{i}.jpg") for i in range(n)]) for b, n in enumerate((2, 2, 5, 1))]
    parts = [gatherer.add(batch) for batch in batches]
    rest = gatherer.rest()
    assert [[p.num_rows for p in full] for full in parts] == [[], [3], [3, 3], []]
    assert rest is not None and rest.num_rows == 1 and gatherer.rest() is None
    ids = [i for full in parts for p in full for i in p.column("image_id").to_pylist()]
    assert ids + rest.column("image_id").to_pylist() == [f"{b}-{i}.jpg" for b, n in enumerate((2, 2, 5, 1))
                                                         for i in range(n)]  # fmt: skip


def test_write_part_returns_one_small_row_and_nothing_for_no_rows(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with Lease.acquire(str(output), "r1"):
        row = OutputCommitter(str(output), "r1").write_part(_results(_result("a.jpg", segments=1)))
        empty = OutputCommitter(str(output), "r1").write_part(RESULT_SCHEMA.empty_table())
    added_by_the_call = {
        "stages",
        "committed_at",
    }  # the block call adds the actor's clock (`pipeline.segmenting.block_call`)
    assert row is not None and set(row) | added_by_the_call == set(PART_ROW_SCHEMA.names) and empty is None
    assert row["bytes"] == sum(p.stat().st_size for p in output.glob("*/part-*.parquet"))


# -- S3: an upload that fails midway publishes nothing --------------------------------------------------------


def test_an_interrupted_s3_upload_leaves_no_object(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection is reset while the images part goes up (every attempt): the write fails, and no object,
    whole or cut short, is under its name."""
    from tests.s3_server import FaultProxy

    bucket = "pf-write-fault"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    results = _results(*[_result(f"img{i}.jpg", segments=2) for i in range(40)])
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint_url)
        s3fs.S3FileSystem.clear_instance_cache()
        output = f"s3://{bucket}/out"
        with Lease.acquire(output, "r1"):
            proxy.set_fault("reset", count=1000, methods=["PUT"], paths=["/images/"])
            with pytest.raises(TRANSIENT_ERRORS):  # after the retries: botocore's EndpointConnectionError
                OutputCommitter(output, "r1").write_part(results)
            proxy.heal()
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
            assert not [k for k in keys if "/images/" in k], keys  # nothing committed
            assert [k for k in keys if "/segments/" in k]  # the segments file went up first: an orphan
            # What `publish` avoids: a file object opened for writing publishes what it holds when it is closed,
            # even when closed by an exception (a Ctrl-C in the middle of writing a part).
            fs = s3fs.S3FileSystem()
            with pytest.raises(KeyboardInterrupt), fs.open(f"{bucket}/naive/part.parquet", "wb") as f:
                f.write(b"PAR1" + b"x" * 18)
                raise KeyboardInterrupt
            assert client.get_object(Bucket=bucket, Key="naive/part.parquet")["Body"].read() == b"PAR1" + b"x" * 18
    s3fs.S3FileSystem.clear_instance_cache()


# -- Through Ray: many nodes, killed write tasks -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray clusters in a subprocess")
def test_parts_are_written_by_worker_nodes_and_killed_workers_commit_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        (folder / f"img{i:02d}.jpg").write_bytes(photo_bytes(48, 64, seed=i))
    expected = {str(p) for p in folder.glob("*.jpg")}
    ray_tmp = tempfile.mkdtemp(prefix="pf-w-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    command = [sys.executable, "-m", "tests.pipeline.fault_write_stage", "--input", str(folder),
               "--output-root", str(tmp_path / "out")]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    workers = set(report["worker_nodes"])
    for scenario in ("between", "after", "actor"):
        result = report[scenario]
        assert "error" not in result, (scenario, result)
        assert result["images_ok"] == len(expected) and result["totals_images"] == len(expected), result
        assert set(result["parts_by_node"]) <= workers and report["head_node"] not in result["parts_by_node"]
        # 12 images, --rows-per-file 4, one actor: 4 shards of 3 (`pipeline.run.BLOCKS_PER_ACTOR`), a part each
        assert sum(result["parts_by_node"].values()) == result["parts"] == 4
        output = tmp_path / "out" / scenario
        assert_exactly_once(output, expected)
        struck = result["struck"]
        if scenario == "actor":  # killed mid-batch: restarted, the batch redone, every image once (above)
            assert struck is not None and struck.startswith("actor pid") and struck.endswith("batch of 3"), struck
            continue
        table = "segments" if scenario == "between" else "images"
        assert struck is not None and f"/{table}/part-" in struck, struck
        assert Path(struck).name in {p.name for p in committed_parts(output)}  # the retry wrote the same part
