"""The speed switches against fp32 on a *trained* checkpoint, judged by the gate of `bench.agreement`.

Each switch (bf16 / fp16 autocast, channels-last, bucketed batching, device pre-processing) must keep at least
99 % of pixels in matching segments (segments matched by overlap within a category) and be at least as close
to fp32, by that share and by the share of images with equal segment lists, as fp32 itself is under ±0.5 grey
level of seeded input noise on the same images. The failure message gives both numbers of the switch and of
the yardstick.

The synthetic test weights cannot judge these switches (they amplify rounding: ±0.5 grey level of input noise
alone moves a large part of their panoptic maps; see BENCHMARKS.md), a trained DETR is far more stable, and
that is what the switches must be faithful on. Point ``PANOPTIC_FLOW_TEST_WEIGHTS`` at an official panoptic
checkpoint (local path, s3:// or https://) to run:

    PANOPTIC_FLOW_TEST_WEIGHTS=~/detr-r50-panoptic-00ce5173.pth pytest -m weights

On CUDA the same tests also run on the GPU (TF32 off for the fp32 reference and every switch).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.agreement import TRAINED_FLOOR, agreement, input_noise, judge
from model.checkpoint import build_model, read_state_dict
from model.config import VARIANTS
from model.panoptic import PanopticResult
from model.predictor import InferenceConfig, PanopticPredictor
from pipeline.inputs.decode import check_for_device
from pipeline.inputs.device_decode import prepare_encoded

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "samples" / "images").glob("*.jpg"))
WEIGHTS = os.environ.get("PANOPTIC_FLOW_TEST_WEIGHTS", "")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FP32 = InferenceConfig(channels_last=False)  # the reference: exact batching, contiguous layout, fp32
SWITCHES = {
    "bf16": replace(FP32, precision="bf16"),
    "channels_last": replace(FP32, channels_last=True),
    "bucketed": replace(FP32, batch_mode="bucketed"),  # the sample photos have several sizes: padding shows
}

pytestmark = [
    pytest.mark.weights,
    pytest.mark.skipif(not WEIGHTS, reason="set PANOPTIC_FLOW_TEST_WEIGHTS to an official panoptic checkpoint"),
]


@pytest.fixture(scope="module")
def trained_model():
    variant = os.environ.get("PANOPTIC_FLOW_TEST_VARIANT", "detr-r50-panoptic")
    return build_model(VARIANTS[variant].config, read_state_dict(WEIGHTS))


_REFERENCES: dict[str, tuple[list[PanopticResult], list[PanopticResult]]] = {}


def _fp32_and_yardstick(model, device: str) -> tuple[list[PanopticResult], list[PanopticResult]]:
    """fp32 results on the sample photos, and the same under ±0.5 grey level of seeded input noise (cached)."""
    if device not in _REFERENCES:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        predictor = PanopticPredictor(model, FP32, device)
        reference = predictor.predict([Image.open(p) for p in SAMPLES])
        with input_noise(predictor.model, seed=0):
            noisy = predictor.predict([Image.open(p) for p in SAMPLES])
        _REFERENCES[device] = (reference, noisy)
    return _REFERENCES[device]


def _assert_gate(name: str, reference: list, yardstick: list, results: list) -> None:
    verdict = judge(name, agreement(reference, results), agreement(reference, yardstick), floor=TRAINED_FLOOR)
    assert verdict.passed, verdict.message


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("switch", [*SWITCHES, pytest.param("fp16", marks=pytest.mark.gpu)], ids=[*SWITCHES, "fp16"])
def test_switch_keeps_the_fp32_panoptic_map(trained_model, device: str, switch: str) -> None:
    reference, yardstick = _fp32_and_yardstick(trained_model, device)
    config = SWITCHES.get(switch) or replace(FP32, precision="fp16")
    results = PanopticPredictor(trained_model, config, device).predict([Image.open(p) for p in SAMPLES])
    _assert_gate(switch, reference, yardstick, results)


@pytest.mark.parametrize("device", DEVICES)
def test_device_preprocess_keeps_the_cpu_path_panoptic_map(trained_model, device: str) -> None:
    reference, yardstick = _fp32_and_yardstick(trained_model, device)
    config = replace(FP32, device_preprocess=True)
    files = [p.read_bytes() for p in SAMPLES]
    headers = [check_for_device(data, max_pixels=2**40, inference=config) for data in files]
    prepared = prepare_encoded(
        files, [h[0] if h else 1 for h in headers], inference=config, device=torch.device(device)
    )
    assert all(not isinstance(p, str) for p in prepared)
    results = PanopticPredictor(trained_model, config, device).predict_prepared(prepared)  # type: ignore[arg-type]
    _assert_gate("device_preprocess", reference, yardstick, results)
