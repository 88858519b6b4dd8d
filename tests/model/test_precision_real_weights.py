"""Reduced precision and device pre-processing against fp32 on a *trained* checkpoint.

The synthetic test weights cannot judge these switches: they amplify rounding chaotically (a ±1 grey-level
change of the input already moves 0-68 % of their panoptic map in fp32; see BENCHMARKS.md). A trained
DETR is far more stable, and that is what the switches must be faithful on. Point
``PANOPTIC_FLOW_TEST_WEIGHTS`` at an official panoptic checkpoint (local path, s3:// or https://) to run:

    PANOPTIC_FLOW_TEST_WEIGHTS=~/detr-r50-panoptic-00ce5173.pth pytest -m weights

On CUDA the same tests also run on the GPU (TF32 off for the fp32 reference).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import build_model, read_state_dict
from model.config import VARIANTS
from model.panoptic import PanopticResult
from model.predictor import InferenceConfig, PanopticPredictor
from pipeline.decode import check_for_device
from pipeline.device_decode import prepare_encoded

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "samples" / "images").glob("*.jpg"))
WEIGHTS = os.environ.get("PANOPTIC_FLOW_TEST_WEIGHTS", "")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

pytestmark = [
    pytest.mark.weights,
    pytest.mark.skipif(not WEIGHTS, reason="set PANOPTIC_FLOW_TEST_WEIGHTS to an official panoptic checkpoint"),
]


@pytest.fixture(scope="module")
def trained_model():
    variant = os.environ.get("PANOPTIC_FLOW_TEST_VARIANT", "detr-r50-panoptic")
    return build_model(VARIANTS[variant].config, read_state_dict(WEIGHTS))


def _categories(result: PanopticResult) -> np.ndarray:
    lookup = np.full(257, -1, dtype=np.int64)
    for s in result.segments:
        lookup[s.id] = s.category_id
    return lookup[result.id_map.astype(np.int64)] if result.segments else np.full(result.id_map.shape, -1)


def _agreement(a: list[PanopticResult], b: list[PanopticResult]) -> float:
    """Share of all pixels whose category is the same in both."""
    same = sum(int((_categories(x) == _categories(y)).sum()) for x, y in zip(a, b))
    return same / sum(x.id_map.size for x in a)


def _fp32_reference(model, device: str) -> list[PanopticResult]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = InferenceConfig()
    return PanopticPredictor(model, config, device).predict([Image.open(p) for p in SAMPLES])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.gpu)])
def test_reduced_precision_keeps_the_fp32_panoptic_map(trained_model, device: str, precision: str) -> None:
    reference = _fp32_reference(trained_model, device)
    reduced = PanopticPredictor(trained_model, InferenceConfig(precision=precision), device)
    assert _agreement(reference, reduced.predict([Image.open(p) for p in SAMPLES])) >= 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_device_preprocess_keeps_the_cpu_path_panoptic_map(trained_model, device: str) -> None:
    reference = _fp32_reference(trained_model, device)
    config = InferenceConfig(device_preprocess=True)
    files = [p.read_bytes() for p in SAMPLES]
    headers = [check_for_device(data, max_pixels=2**40, inference=config) for data in files]
    prepared = prepare_encoded(
        files, [h[0] if h else 1 for h in headers], inference=config, device=torch.device(device)
    )
    assert all(not isinstance(p, str) for p in prepared)
    results = PanopticPredictor(trained_model, config, device).predict_prepared(prepared)  # type: ignore[arg-type]
    assert _agreement(reference, results) >= 0.99
