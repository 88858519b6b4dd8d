"""Sine positional encoding of the Res5 grid (DETR §3.2, "spatial positional encoding").

Computed from the cumulative sum of the *valid* (unpadded) mask, normalised by its last value, so
padding does not shift the positions of real pixels. 128 channels for y, then 128 for x, sin/cos
interleaved, temperature 10000, scale 2π — as upstream `PositionEmbeddingSine(normalize=True)`.
"""

from __future__ import annotations

import math

import torch


def sine_position_encoding(
    padding_mask: torch.Tensor,
    *,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> torch.Tensor:
    """padding_mask: [B, h, w] bool (True on padding) -> encodings [B, 2·num_pos_feats, h, w] float32."""
    not_mask = ~padding_mask  # [B, h, w]
    y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, h, w]
    x_embed = not_mask.cumsum(2, dtype=torch.float32)  # [B, h, w]
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale  # [B, h, w]
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale  # [B, h, w]

    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=padding_mask.device)  # [F]
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)  # [F]

    pos_x = x_embed[:, :, :, None] / dim_t  # [B, h, w, F]
    pos_y = y_embed[:, :, :, None] / dim_t  # [B, h, w, F]
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)  # [B, h, w, F]
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)  # [B, h, w, F]
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, h, w]
