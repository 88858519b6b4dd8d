"""Batched panoptic inference on plain PyTorch: prepared images in, panoptic results out.

`prepare` is the CPU half (EXIF orientation, RGB, reference resize) and can run on other workers;
`PanopticPredictor.predict_prepared` groups images by canvas (see `model.preprocess`), pads, runs the
model — mask head on kept queries only —, crops the padding at stride 4 before any upsampling, and
merges each image on its own. An image's result therefore never depends on its batch companions.
`InferenceConfig` lives in `model.config` (no torch there) and is re-exported here.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from model.config import InferenceConfig
from model.detr import DetrPanoptic
from model.panoptic import PanopticResult, merge_panoptic
from model.preprocess import PreparedImage, canvas_size, prepare
from model.tensor_preprocess import normalize, pad_batch, prepare_tensor

__all__ = ["InferenceConfig", "PanopticPredictor", "PreparedImage", "prepare", "prepare_tensor"]


# Where channels-last measured at least as fast as the default layout (fp32, same output at the fp32 noise
# floor): CPU, see BENCHMARKS.md. CUDA keeps the contiguous layout until `python -m bench.gpu` has measured it.
CHANNELS_LAST_BY_DEVICE_TYPE = {"cpu": True}


def channels_last_default(device: torch.device) -> bool:
    """The layout used when `InferenceConfig.channels_last` is None: measured per device type."""
    return CHANNELS_LAST_BY_DEVICE_TYPE.get(device.type, False)


class PanopticPredictor:
    """Runs `DetrPanoptic` on batches of prepared images on one device.

    The caller's ``model`` is put in eval mode and moved to ``device`` in place (as `nn.Module.to` does).
    With channels-last (``config.channels_last``, or the device's default when None) the predictor converts
    a *copy* and keeps that: the caller's model keeps its memory layout, so one model can serve predictors
    with either layout; the copy costs one more set of weights (~170 MB for R50) while the caller keeps its
    own.
    """

    def __init__(self, model: DetrPanoptic, config: InferenceConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.channels_last = (
            channels_last_default(self.device) if config.channels_last is None else config.channels_last
        )
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model = copy.deepcopy(self.model).to(memory_format=torch.channels_last)

    def predict(self, images: list[Image.Image]) -> list[PanopticResult]:
        """Decoded PIL images in, one result per image (same order) out."""
        return self.predict_prepared([prepare(image, self.config) for image in images])

    @torch.inference_mode()
    def predict_prepared(self, images: list[PreparedImage]) -> list[PanopticResult]:
        """One result per prepared image, in input order; images sharing a canvas run as one batch."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[canvas_size(image.processed_size, mode=self.config.batch_mode, bucket=self.config.bucket)].append(i)
        results: list[PanopticResult | None] = [None] * len(images)
        for canvas, indices in groups.items():
            for i, result in zip(indices, self._predict_group([images[i] for i in indices], canvas)):
                results[i] = result
        return results  # type: ignore[return-value]

    def _predict_group(self, images: list[PreparedImage], canvas: tuple[int, int]) -> list[PanopticResult]:
        pixels = [self._on_device(im.pixels) for im in images]  # each [3, h, w] uint8
        batch, padding_mask = pad_batch([normalize(p) for p in pixels], canvas)  # [B, 3, H, W], [B, H, W]
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.config.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.model(batch, padding_mask, threshold=self.config.threshold)
        results = []
        for b, image in enumerate(images):
            selected = out.image_index == b  # [N]
            kept = out.query_index[selected]  # [k] query slots, in query order
            h, w = image.processed_size
            stride4 = (-(-h // 4), -(-w // 4))  # valid region of the stride-4 mask logits
            mask_logits = out.mask_logits[selected][:, : stride4[0], : stride4[1]].float()  # crop padding
            results.append(
                merge_panoptic(
                    out.scores[b, kept],
                    out.labels[b, kept],
                    mask_logits,
                    processed_size=(h, w),
                    original_size=image.original_size,
                )
            )
        return results

    def _on_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [h, w, 3] numpy or [3, h, w] tensor -> [3, h, w] on the device (via pinned memory to CUDA)."""
        if isinstance(pixels, torch.Tensor):
            return pixels.to(self.device)
        if self.device.type == "cuda":
            staging = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)  # [h, w, 3]
            staging.numpy()[...] = pixels
            return staging.to(self.device, non_blocking=True).permute(2, 0, 1)
        return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)  # copy: Ray's arrays are read-only
