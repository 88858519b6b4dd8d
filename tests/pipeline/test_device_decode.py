"""``device_preprocess``: JPEGs decoded, rotated and resized by the model actor (on CPU here, on CUDA under
the ``gpu`` marker), checked against the CPU path (Pillow) that every other test uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.predictor import InferenceConfig, PreparedImage
from pipeline.inputs.decode import decode_batch
from pipeline.inputs.device_decode import prepare_encoded
from pipeline.segmenting.predict import PanopticSegmenter
from tests.pipeline.images import input_columns, photo_bytes
from tests.pipeline.odd_inputs import corpus

CPU_PATH = InferenceConfig(min_size=64, max_size=107)
DEVICE_PATH = InferenceConfig(min_size=64, max_size=107, device_preprocess=True)
MAX_PIXELS = 89_478_485


def _rows(named: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    data = np.empty(len(named), dtype=object)
    data[:] = [payload for _, payload in named]
    errors = np.array([""] * len(named), dtype=object)
    return {**input_columns([name for name, _ in named]), "data": data, "error": errors}


def _finish_on_device(decoded: dict[str, np.ndarray], inference: InferenceConfig, device: str) -> list:
    """What the actor makes of each decoded row: a PreparedImage or an error message."""
    out: list = [str(e) or PreparedImage(p, (int(h), int(w))) for p, h, w, e in _columns(decoded)]
    on_device = [i for i, e in enumerate(decoded["encoded"]) if len(e)]
    images = prepare_encoded(
        [decoded["encoded"][i] for i in on_device],
        [int(decoded["orientation"][i]) for i in on_device],
        inference=inference,
        device=torch.device(device),
    )
    for i, image in zip(on_device, images):
        out[i] = image
    return out


def _columns(decoded: dict[str, np.ndarray]):
    return zip(decoded["pixels"], decoded["height"], decoded["width"], decoded["error"])


def _hwc(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)


def test_device_path_gives_every_odd_input_the_cpu_path_row() -> None:
    odd = corpus()
    rows = _rows([(o.name, o.build()) for o in odd])
    cpu = decode_batch(rows, max_pixels=MAX_PIXELS, inference=CPU_PATH)
    device = decode_batch(rows, max_pixels=MAX_PIXELS, inference=DEVICE_PATH)
    passed = {o.name for o, e in zip(odd, device["encoded"]) if len(e)}
    # plain JPEGs go to the device (the truncated one too: its header is fine); CMYK stays on the CPU
    assert passed == {"truncated.jpg", "exif6.jpg", "exif8.jpg", "exif_damaged.jpg", "exif_garbage.jpg", "grey.jpg"}
    finished = _finish_on_device(device, DEVICE_PATH, "cpu")
    for o, expected_error, expected_pixels, got in zip(odd, cpu["error"], cpu["pixels"], finished):
        if expected_error:  # the same message, whichever side found the problem
            assert got == expected_error, o.name
            continue
        assert isinstance(got, PreparedImage), (o.name, got)
        assert (got.original_size[1], got.original_size[0]) == o.size, o.name  # displayed frame
        pixels = _hwc(got.pixels)
        assert pixels.shape == expected_pixels.shape, o.name
        assert np.abs(pixels.astype(int) - expected_pixels.astype(int)).max() <= 1, o.name
    for o, width, height in zip(odd, device["width"], device["height"]):
        if o.size is not None:  # the stage reports the displayed frame before any pixel is decoded
            assert (width, height) == o.size, o.name


@pytest.fixture(scope="module")
def segmenters() -> tuple[PanopticSegmenter, PanopticSegmenter]:
    kwargs = {"variant": "detr-r50-panoptic", "weights": "synthetic", "device": "cpu"}
    return PanopticSegmenter(**kwargs, inference=CPU_PATH), PanopticSegmenter(**kwargs, inference=DEVICE_PATH)


def test_segmenter_runs_device_decoded_and_cpu_decoded_rows_in_one_batch(segmenters) -> None:
    cpu_segmenter, device_segmenter = segmenters
    named = [
        ("a.jpg", photo_bytes(72, 96, seed=1)),
        ("b.png", photo_bytes(64, 80, fmt="PNG", seed=2)),
        ("c.jpg", b"\xff\xd8\xff" + b"\x00" * 50),  # a JPEG signature and nothing usable
        ("d.jpg", photo_bytes(96, 64, seed=3)),
    ]
    decoded = decode_batch(_rows(named), max_pixels=MAX_PIXELS, inference=DEVICE_PATH)
    assert [bool(len(e)) for e in decoded["encoded"]] == [True, False, False, True]
    table = device_segmenter(decoded).to_pylist()
    assert [r["image_id"] for r in table] == ["a.jpg", "b.png", "c.jpg", "d.jpg"]
    assert [r["status"] for r in table] == ["ok", "ok", "error", "ok"]
    assert table[2]["error"].startswith("corrupt image header")
    # Each image's result is the predictor's on the very pixels the device path prepared ...
    prepared = _finish_on_device(decoded, DEVICE_PATH, "cpu")
    expected = device_segmenter.predictor.predict_prepared([prepared[i] for i in (0, 1, 3)])
    for row, result in zip([table[i] for i in (0, 1, 3)], expected):
        assert [s["category_id"] for s in row["segments"]] == [s.category_id for s in result.segments]
        assert [s["area"] for s in row["segments"]] == [s.area for s in result.segments]
    # ... and the PNG (CPU-decoded in both modes) gets exactly the CPU path's row.
    cpu_rows = cpu_segmenter(decode_batch(_rows(named[1:2]), max_pixels=MAX_PIXELS, inference=CPU_PATH))
    assert cpu_rows.to_pylist()[0]["segments"] == table[1]["segments"]


@pytest.mark.gpu
def test_nvjpeg_decode_is_close_to_pillow() -> None:
    odd = [o for o in corpus() if o.name in {"exif6.jpg", "exif8.jpg", "grey.jpg", "exif_garbage.jpg"}]
    rows = _rows([(o.name, o.build()) for o in odd] + [("photo.jpg", photo_bytes(480, 640, seed=5))])
    cpu = decode_batch(rows, max_pixels=MAX_PIXELS, inference=CPU_PATH)
    device = decode_batch(rows, max_pixels=MAX_PIXELS, inference=DEVICE_PATH)
    for expected, got in zip(cpu["pixels"], _finish_on_device(device, DEVICE_PATH, "cuda")):
        assert isinstance(got, PreparedImage) and got.pixels.device.type == "cuda"
        difference = np.abs(_hwc(got.pixels).astype(int) - expected.astype(int))
        assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 4


@pytest.mark.gpu
def test_cuda_fp32_matches_cpu(segmenters) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_segmenter, _ = segmenters
    cuda_segmenter = PanopticSegmenter(
        variant="detr-r50-panoptic", weights="synthetic", device="cuda", inference=CPU_PATH
    )
    named = [(f"{i}.jpg", photo_bytes(72 + 8 * i, 96, seed=i)) for i in range(4)]
    decoded = decode_batch(_rows(named), max_pixels=MAX_PIXELS, inference=CPU_PATH)
    on_cpu, on_cuda = cpu_segmenter(decoded).to_pylist(), cuda_segmenter(decoded).to_pylist()
    for a, b in zip(on_cpu, on_cuda):
        assert [s["category_id"] for s in a["segments"]] == [s["category_id"] for s in b["segments"]]
        areas_a, areas_b = np.array([s["area"] for s in a["segments"]]), np.array([s["area"] for s in b["segments"]])
        assert np.abs(areas_a - areas_b).sum() <= 0.001 * a["width"] * a["height"]


def test_job_with_device_preprocess_commits_every_image(ray_session: None, tmp_path) -> None:
    """Through Ray Data: the bytes column crosses the object store to the actors; JPEG, PNG and a bad file."""
    import pyarrow.dataset as pads

    from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
    from pipeline.run import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo_bytes(72, 96, seed=1))
    (folder / "b.png").write_bytes(photo_bytes(64, 80, fmt="PNG", seed=2))
    whole = photo_bytes(96, 64, seed=3)
    (folder / "c.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # header intact, data cut: fails in the actor
    config = JobConfig(
        input=InputConfig((str(folder),)),
        output=str(tmp_path / "out"),
        model=ModelSpec(weights="synthetic"),
        inference=DEVICE_PATH,
        resources=ResourceConfig(batch_size=3, device="cpu", max_actors=1),
    )
    summary = run_job(config, show_progress=False)
    images = pads.dataset(str(tmp_path / "out" / "images"), format="parquet").to_table().to_pylist()
    by_name = {row["image_id"].rsplit("/", 1)[-1]: row for row in images}
    assert sorted(by_name) == ["a.jpg", "b.png", "c.jpg"] and (summary.images_ok, summary.images_error) == (2, 1)
    assert (by_name["a.jpg"]["width"], by_name["a.jpg"]["height"]) == (96, 72)
    assert by_name["c.jpg"]["error"].startswith("corrupt or truncated JPEG image")
