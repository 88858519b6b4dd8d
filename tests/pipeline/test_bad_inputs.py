"""One job over every kind of bad or odd input: each distinct input gets exactly one row, and the job completes.

The corpus (`tests.pipeline.odd_inputs`) sits in a folder; a ``.txt`` manifest beside it lists one more
photo three times and a file that does not exist. Masks of EXIF-rotated photos are in the displayed frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
from pycocotools import mask as mask_utils

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from tests.pipeline.images import photo_bytes
from tests.pipeline.odd_inputs import corpus

INFERENCE = InferenceConfig(min_size=64, max_size=107)  # the corpus's expectations hold at these sizes


def test_every_odd_input_gets_exactly_one_row(ray_session: None, tmp_path: Path) -> None:
    from pipeline.run import run_job

    folder = tmp_path / "corpus"
    folder.mkdir()
    odds = {str(folder / odd.name): odd for odd in corpus()}
    for path, odd in odds.items():
        Path(path).write_bytes(odd.build())
    listed = tmp_path / "listed"
    listed.mkdir()
    repeated, missing = listed / "listed_3x.jpg", listed / "missing.jpg"
    repeated.write_bytes(photo_bytes(50, 70, seed=21))
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"{repeated}\n{repeated}\n\n{missing}\n{repeated}\n")

    config = JobConfig(
        input=InputConfig((str(folder), str(manifest))),
        output=str(tmp_path / "out"),
        model=ModelSpec(weights="synthetic"),
        inference=INFERENCE,
        resources=ResourceConfig(batch_size=8, device="cpu", rows_per_file=8, max_actors=1),
    )
    summary = run_job(config, show_progress=False)

    images = pads.dataset(str(tmp_path / "out" / "images"), format="parquet").to_table().to_pylist()
    ids = [row["image_id"] for row in images]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)  # exactly one row each
    assert set(ids) == {*odds, str(repeated), str(missing)}
    by_id = {row["image_id"]: row for row in images}
    expected_ok = sum(odd.error is None for odd in odds.values()) + 1  # + the photo listed three times
    assert (summary.images_ok, summary.images_error) == (expected_ok, len(ids) - expected_ok)
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert (success["this_run"]["images_ok"], success["this_run"]["images_error"]) == (
        summary.images_ok,
        summary.images_error,
    )
    assert success["output"]["images"] == len(ids)

    for path, odd in odds.items():
        row = by_id[path]
        if odd.error is not None:
            assert row["status"] == "error" and odd.error in row["error"], (odd.name, row)
            assert row["width"] is None and row["num_segments"] == 0
        else:
            assert row["status"] == "ok" and row["error"] is None, (odd.name, row)
            assert (row["width"], row["height"]) == odd.size, odd.name
    assert by_id[str(repeated)]["status"] == "ok"
    gone = by_id[str(missing)]
    assert gone["status"] == "error" and gone["error"].startswith("not found:") and not gone["retryable"]
    assert str(missing) in gone["error"]

    segments = pads.dataset(str(tmp_path / "out" / "segments"), format="parquet").to_table().to_pylist()
    for seg in segments:
        row = by_id[seg["image_id"]]
        assert row["status"] == "ok"
        assert seg["rle"]["size"] == [row["height"], row["width"]]  # the displayed frame
        mask = mask_utils.decode({"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode()})
        assert mask.shape == (row["height"], row["width"]) and int(mask.sum()) == seg["area"]
    counts = {image_id: sum(s["image_id"] == image_id for s in segments) for image_id in by_id}
    assert all(counts[image_id] == row["num_segments"] for image_id, row in by_id.items())
    for name in ("exif6.jpg", "exif8.jpg", "exif_damaged.jpg"):  # rotated: stored landscape, displayed portrait
        row = by_id[str(folder / name)]
        assert row["height"] > row["width"] and row["num_segments"] > 0
