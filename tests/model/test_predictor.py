"""`PanopticPredictor`'s memory layout: channels-last converts a copy, never the caller's model; the default
layout per device type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.detr import DetrPanoptic
from model.predictor import InferenceConfig, PanopticPredictor, channels_last_default
from model.synthetic_weights import calibration_image

SMALL = InferenceConfig(min_size=128, max_size=200, channels_last=False)


def _photo() -> Image.Image:
    g = torch.Generator().manual_seed(11)
    pixels = (calibration_image(120, 150).int() + torch.randint(-20, 21, (3, 120, 150), generator=g)).clamp(0, 255)
    return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy())


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def test_a_channels_last_predictor_leaves_a_shared_model_as_it_was(r50_model: DetrPanoptic) -> None:
    image = _photo()
    fp32 = PanopticPredictor(r50_model, SMALL)
    before = fp32.predict([image])[0]
    channels_last = PanopticPredictor(r50_model, InferenceConfig(min_size=128, max_size=200, channels_last=True))

    assert fp32.model is r50_model and channels_last.model is not r50_model
    assert all(w.is_contiguous() for w in _conv_weights(r50_model)), "the caller's model changed layout"
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(channels_last.model))
    assert not any(w.is_contiguous() for w in _conv_weights(channels_last.model) if w.shape[-1] > 1)
    after = fp32.predict([image])[0]
    assert np.array_equal(before.id_map, after.id_map) and before.segments == after.segments
    converted = channels_last.predict([image])[0]  # same weights, other layout: the fp32 noise floor
    assert [s.category_id for s in converted.segments] == [s.category_id for s in before.segments]
    assert (converted.id_map == before.id_map).mean() >= 0.999


def test_the_default_layout_is_chosen_per_device_type(r50_model: DetrPanoptic) -> None:
    assert InferenceConfig().channels_last is None
    assert channels_last_default(torch.device("cpu")) is True  # measured faster on CPU (BENCHMARKS.md)
    assert channels_last_default(torch.device("cuda")) is False  # unmeasured on CUDA: contiguous until then
    auto = PanopticPredictor(r50_model, InferenceConfig(min_size=128, max_size=200))
    assert auto.channels_last is True
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(auto.model))
    assert PanopticPredictor(r50_model, SMALL).channels_last is False


def test_channels_last_must_be_a_bool_or_none() -> None:
    with pytest.raises(ValueError, match="channels_last"):
        InferenceConfig(channels_last="yes")  # type: ignore[arg-type]
