"""Inference pre-processing, the tensor half (`model.preprocess` is the PIL / numpy half): the same
orientation and resize on the model's device for images decoded there, ImageNet normalisation, and batches
zero-padded bottom/right to a canvas with a padding mask (True on padding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import InferenceConfig
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreparedImage, processed_size


def orient_tensor(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation tag (1..8) to an image tensor [C, H, W] as `to_rgb` does to PIL images."""
    if orientation in (5, 6, 7, 8):
        pixels = pixels.transpose(-2, -1)  # TRANSPOSE: (x, y) -> (y, x)
        # after a transpose, tags 6 and 7 need a horizontal flip, 8 a vertical one (7 = transverse: both)
        flips = {5: (), 6: (-1,), 7: (-1, -2), 8: (-2,)}[orientation]
    else:
        flips = {2: (-1,), 3: (-1, -2), 4: (-2,)}.get(orientation, ())
    return pixels.flip(flips) if flips else pixels


def resize_tensor(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 [3, h, w] to (height, width) on the tensor's device -> uint8.

    The float kernel of `F.interpolate` (the one CUDA has) with PIL's filter support: it differs from
    `resize_image` (PIL) by at most 1 grey level, on about a fifth of the pixels (rounding of the
    fixed-point weights PIL uses), i.e. well inside the noise of JPEG decoding.
    """
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    resized = F.interpolate(pixels[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)  # [3, height, width]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, h, w] -> float32 ImageNet-normalised [..., 3, h, w]."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def pad_batch(images: list[torch.Tensor], canvas: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad normalised images [3, h, w] bottom/right to ``canvas``.

    Returns (batch [B, 3, H, W], padding_mask [B, H, W] bool, True on padding).
    """
    height, width = canvas
    first = images[0]
    batch = first.new_zeros((len(images), 3, height, width))  # [B, 3, H, W]
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)  # [B, H, W]
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        if h > height or w > width:
            raise ValueError(f"image {h}x{w} does not fit the canvas {height}x{width}")
        batch[i, :, :h, :w] = img
        mask[i, :h, :w] = False
    return batch, mask


def prepare_tensor(pixels: torch.Tensor, orientation: int, config: InferenceConfig) -> PreparedImage:
    """`model.preprocess.prepare` for a decoded RGB tensor uint8 [3, H, W] on any device (resize with
    `resize_tensor`)."""
    oriented = orient_tensor(pixels, orientation)  # [3, H', W']
    original = (int(oriented.shape[-2]), int(oriented.shape[-1]))
    size = processed_size(*original, min_size=config.min_size, max_size=config.max_size)
    return PreparedImage(resize_tensor(oriented, size), original)
