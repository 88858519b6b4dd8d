"""The gate can tell, on the synthetic weights CI has: channels-last (fp32, another convolution layout) passes,
an injected fault (the model fed BGR instead of RGB) fails, and the failure message carries both numbers of
the switch and of the ±0.5 grey-level yardstick. (Trained weights: tests/model/test_precision_real_weights.py.)"""

from __future__ import annotations

import torch
from PIL import Image

from bench.agreement import agreement, input_noise, judge
from model.detr import DetrPanoptic
from model.predictor import InferenceConfig, PanopticPredictor
from model.synthetic_weights import calibration_image

FP32 = InferenceConfig(min_size=128, max_size=200, channels_last=False)


def _photos() -> list[Image.Image]:
    photos = []
    for i, (h, w) in enumerate([(120, 150), (150, 120), (128, 170), (140, 140)]):
        g = torch.Generator().manual_seed(20 + i)
        pixels = calibration_image(h, w).int() + torch.randint(-20, 21, (3, h, w), generator=g)
        photos.append(Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()))
    return photos


def test_the_gate_passes_channels_last_and_fails_a_colour_swap(r50_model: DetrPanoptic) -> None:
    photos = _photos()
    fp32 = PanopticPredictor(r50_model, FP32)
    reference = fp32.predict(photos)
    with input_noise(fp32.model, seed=0):
        yardstick = agreement(reference, fp32.predict(photos))
    assert yardstick.pixels < 1.0, "the noise should move these weights' maps somewhat"

    channels_last = PanopticPredictor(r50_model, InferenceConfig(min_size=128, max_size=200, channels_last=True))
    verdict = judge("channels_last", agreement(reference, channels_last.predict(photos)), yardstick)
    assert verdict.passed, verdict.message

    swap = fp32.model.register_forward_pre_hook(lambda _m, args: (args[0].flip(1), *args[1:]))  # RGB -> BGR
    try:
        swapped = agreement(reference, fp32.predict(photos))
    finally:
        swap.remove()
    verdict = judge("BGR input", swapped, yardstick)
    assert not verdict.passed, verdict.message
    assert f"{100 * swapped.pixels:.2f} %" in verdict.message and f"{100 * yardstick.pixels:.2f} %" in verdict.message
