"""Raw outputs match Hugging Face `DetrForSegmentation` (an independent implementation) on the same weights.

The weights reach Hugging Face through our key table (`to_hf_layout`), so these tests also prove the
table. HF's panoptic *merge* is a different algorithm and is not used as an oracle here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import build_model, to_hf_layout, to_official_layout
from model.config import VARIANTS
from model.predictor import InferenceConfig, prepare
from model.synthetic_weights import calibration_image, synthetic_state_dict
from model.tensor_preprocess import normalize

transformers = pytest.importorskip("transformers")

MIN_SIZE, MAX_SIZE = 160, 240


def _hf_model(variant: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import DetrConfig, DetrForSegmentation, ResNetConfig

    depths = [3, 4, 23, 3] if "r101" in variant else [3, 4, 6, 3]
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=ResNetConfig(depths=depths, out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=250,
    )
    model = DetrForSegmentation(config).eval()
    hf_state = to_hf_layout(state)
    assert set(hf_state) == set(model.state_dict()), "key table does not produce HF's exact key set"
    model.load_state_dict(hf_state, strict=True)
    return model


def _photo(height: int, width: int) -> Image.Image:
    return Image.fromarray(calibration_image(height, width).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("variant", ["detr-r50-panoptic", "detr-r101-panoptic"])
def test_raw_outputs_match_hugging_face(variant: str) -> None:
    config = VARIANTS[variant].config
    state = synthetic_state_dict(config, seed=3)
    ours = build_model(config, state)
    theirs = _hf_model(variant, state)

    from transformers import DetrImageProcessorPil

    image = _photo(150, 190)
    processor = DetrImageProcessorPil(size={"shortest_edge": MIN_SIZE, "longest_edge": MAX_SIZE})
    encoded = processor(images=image, return_tensors="pt")
    prepared = prepare(image, InferenceConfig(min_size=MIN_SIZE, max_size=MAX_SIZE))
    pixels = normalize(torch.from_numpy(prepared.pixels.copy()).permute(2, 0, 1))[None]  # [1, 3, h, w]
    # Pre-processing: the same size rule and the same pixels as HF's PIL processor.
    assert tuple(encoded["pixel_values"].shape) == tuple(pixels.shape)
    torch.testing.assert_close(pixels, encoded["pixel_values"], atol=1e-6, rtol=0)

    mask = torch.zeros(1, *pixels.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        out = ours(pixels, mask, threshold=0.85)
        ref = theirs(pixel_values=encoded["pixel_values"], pixel_mask=encoded["pixel_mask"])

    assert 0 < int(out.keep.sum()) < config.num_queries, "weights must keep some, not all, queries"
    assert (out.class_logits - ref.logits).abs().max() <= 1e-4
    assert (out.boxes_cxcywh - ref.pred_boxes).abs().max() <= 1e-4
    hf_kept_masks = ref.pred_masks[out.image_index, out.query_index]  # [N, H/4, W/4]
    assert hf_kept_masks.shape == out.mask_logits.shape
    assert (out.mask_logits - hf_kept_masks).abs().max() <= 1e-4


def test_key_table_round_trip(r50_state: dict[str, torch.Tensor]) -> None:
    back = to_official_layout(to_hf_layout(r50_state))
    assert set(back) == set(r50_state)
    for key, value in r50_state.items():
        assert torch.equal(back[key], value), key


def test_hf_v4_hub_layout_is_translated(r50_state: dict[str, torch.Tensor]) -> None:
    """transformers v4 hub files: timm backbone under `conv_encoder.model`, `out_proj`, `fc1`, `q_linear`..."""
    v4 = {}
    for key, value in r50_state.items():
        if key.startswith("detr.backbone.0.body."):
            v4["detr.model.backbone.conv_encoder.model." + key[len("detr.backbone.0.body.") :]] = value
    for key, value in to_hf_layout(r50_state).items():
        if key.startswith("detr.model.backbone."):
            continue
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        key = key.replace("bbox_attention.q_proj", "bbox_attention.q_linear")
        key = key.replace("bbox_attention.k_proj", "bbox_attention.k_linear")
        v4[key] = value
    back = to_official_layout(v4)
    assert set(back) == set(r50_state)
    assert all(torch.equal(back[k], v) for k, v in r50_state.items())
    assert np.isfinite(sum(float(v.float().sum()) for v in back.values()))
