"""RLE on the block call's threads (``encode_rle=False`` + `encode_results`) gives exactly the rows of RLE in the
model's call, and the tables between the stages are Arrow all the way (nothing pickled)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from model.predictor import InferenceConfig
from pipeline.inputs.decode import decode_batch
from pipeline.schema import PREDICTION_SCHEMA, RESULT_SCHEMA
from pipeline.segmenting.predict import PanopticSegmenter
from pipeline.segmenting.prediction_tables import encode_results, prediction_table
from pipeline.segmenting.prediction_tables import input_columns as input_columns_of
from pipeline.segmenting.rle import decode_rle
from tests.pipeline.images import input_columns, photo_bytes

INFERENCE = InferenceConfig(min_size=64, max_size=107)


def test_deferred_rle_rows_equal_the_actor_rows() -> None:
    named = [
        ("a.jpg", photo_bytes(72, 96, seed=1)),
        ("bad.jpg", b"not an image"),
        ("b.png", photo_bytes(64, 80, fmt="PNG", seed=2)),
    ]
    data = np.empty(len(named), dtype=object)
    data[:] = [payload for _, payload in named]
    rows = {**input_columns([name for name, _ in named]), "data": data, "error": np.array([""] * 3, dtype=object)}
    decoded = decode_batch(rows, max_pixels=10**8, inference=INFERENCE)
    segmenter = PanopticSegmenter(variant="detr-r50-panoptic", weights="synthetic", inference=INFERENCE, device="cpu")
    in_actor = segmenter(decoded)
    segmenter.encode_rle = False  # the same model, as built with encode_rle=False
    deferred = segmenter(decoded)
    assert deferred.schema == PREDICTION_SCHEMA and in_actor.schema == RESULT_SCHEMA
    assert len(deferred.column("id_map")[0].as_py()) == 72 * 96  # one byte per pixel
    assert deferred.column("id_map")[1].as_py() == b"" and deferred.column("error")[1].as_py()
    assert sum(len(r["segments"]) for r in in_actor.to_pylist()) > 0  # something to encode
    assert encode_results(deferred).equals(in_actor)
    for row in in_actor.to_pylist():  # every mask decodes to its area, in the image's frame
        for segment in row["segments"]:
            mask = decode_rle(segment["rle"]["size"], segment["rle"]["counts"])
            assert mask.shape == (row["height"], row["width"]) and int(mask.sum()) == segment["area"]


@pytest.mark.parametrize("threshold", [0.85, 0.999999])  # some images without segments; none with any
def test_jobs_with_other_batch_and_part_sizes_write_the_same_tables(
    ray_session: None, tmp_path, threshold: float
) -> None:
    """Through Ray: the block call's pipelining (RLE on its threads, parts of another size, shards of
    other sizes) changes no row, including batches whose images all have no segment."""
    import pyarrow.dataset as pads

    from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
    from pipeline.run import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        (folder / f"tiny{i}.jpg").write_bytes(photo_bytes(32, 32, seed=i))
    for i in range(2):
        (folder / f"photo{i}.png").write_bytes(photo_bytes(72, 96, fmt="PNG", seed=10 + i))
    tables = {}
    for shape, rows_per_file in {"small": 3, "large": 2048}.items():
        config = JobConfig(
            input=InputConfig((str(folder),)),
            output=str(tmp_path / shape),
            model=ModelSpec(weights="synthetic"),
            inference=InferenceConfig(min_size=32, max_size=64, threshold=threshold),
            resources=ResourceConfig(batch_size=2, device="cpu", rows_per_file=rows_per_file, max_actors=1),
        )
        assert run_job(config, show_progress=False).images_ok == 8
        keys = {"images": ["image_id"], "segments": ["image_id", "segment_id"]}
        tables[shape] = {
            name: pads.dataset(str(tmp_path / shape / name)).to_table().sort_by([(k, "ascending") for k in key])
            for name, key in keys.items()
        }
        tables[shape]["images"] = tables[shape]["images"].drop_columns(["run_id"])  # two runs, two ids
    import pyarrow.parquet as pq

    part_rows = [pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "small" / "images").iterdir()]
    assert sum(part_rows) == 8 and max(part_rows) <= 3  # parts of at most --rows-per-file images
    segments_per_image = tables["large"]["images"].column("num_segments").to_pylist()
    if threshold < 0.9:
        assert 0 in segments_per_image and max(segments_per_image) > 0  # both kinds of rows
    else:
        assert max(segments_per_image) == 0  # every block all-empty
    for name in ("images", "segments"):
        assert tables["small"][name].equals(tables["large"][name]), name


def _unencoded_block(with_segments: bool, offset: int) -> pa.Table:
    """Two rows as `PanopticSegmenter(encode_rle=False)` returns them, with or without segments."""
    from model.panoptic import PanopticResult, Segment

    id_map = np.zeros((3, 4), dtype=np.uint8)
    id_map[:, 2:] = 1
    segments = [Segment(0, 1, True, 0.9, 6, (0, 0, 2, 3)), Segment(1, 184, False, 0.95, 6, (2, 0, 2, 3))]
    results = {i: PanopticResult(id_map, segments if with_segments else []) for i in range(2)}
    batch = {
        **input_columns([f"img{offset + i}" for i in range(2)], source="s"),
        "width": np.array([4, 4], dtype=np.int32),
        "height": np.array([3, 3], dtype=np.int32),
    }
    return prediction_table(batch, results, errors=["", ""], retryable=[False, False])


def test_encode_stage_merges_blocks_with_and_without_segments(ray_session: None) -> None:
    """Blocks whose rows all lack segments, merged with others into one batch for the encode stage, are still
    encoded row by row."""
    import ray

    blocks = [_unencoded_block(False, 0), _unencoded_block(True, 2), _unencoded_block(False, 4)]
    ds = ray.data.from_arrow(blocks)
    out = ds.map_batches(encode_results, batch_size=6, batch_format="pyarrow").take_all()
    by_id = {row["image_id"]: row for row in out}
    expected = {row["image_id"]: row for block in blocks for row in encode_results(block).to_pylist()}
    assert sorted(by_id) == sorted(expected) == [f"img{i}" for i in range(6)]
    for image_id, row in expected.items():
        assert len(by_id[image_id]["segments"]) == len(row["segments"]) == (2 if image_id in ("img2", "img3") else 0)
        assert [s["rle"]["counts"] for s in by_id[image_id]["segments"]] == [
            s["rle"]["counts"] for s in row["segments"]
        ]
    left = decode_rle([3, 4], expected["img2"]["segments"][0]["rle"]["counts"])
    assert left.tolist() == [[True, True, False, False]] * 3  # segment 0 is the left half of the id map


def test_input_columns_come_back_typed_from_numpy_batches() -> None:
    """Ray hands an all-null string column to numpy stages as float32 NaN, and an integer column with nulls as
    floats: the Arrow tables the actor returns have them as nulls again."""
    batch = {
        "image_id": np.array(["a", "b"], dtype=object),
        "source": np.array(["a", "s.tar"], dtype=object),
        "member": np.array([np.nan, np.nan], dtype=np.float32),
        "input_size": np.array([5.0, np.nan]),
        "input_version": np.array([None, "v1"], dtype=object),
    }
    columns = input_columns_of(batch)
    assert columns["member"].to_pylist() == [None, None]
    assert columns["input_size"].to_pylist() == [5, None] and columns["input_size"].type == pa.int64()
    assert columns["input_version"].to_pylist() == [None, "v1"]
