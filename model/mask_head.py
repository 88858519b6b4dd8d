"""The panoptic mask head of DETR (§4.4, Fig. 8): box-attention maps and the FPN-style conv head.

`BoxAttentionMap` (upstream `MHAttentionMap`, parameter name `bbox_attention`) gives, for each box
embedding, M attention maps over the encoded image; one softmax runs jointly over heads × h × w.
`MaskHead` (upstream `MaskHeadSmallConv`, name `mask_head`) concatenates those maps with the projected
Res5 features and upsamples through the adapted Res4, Res3, Res2 maps to mask logits at stride 4.

Both run on a flat list of N selected queries with an ``image_index`` [N] naming each query's image, so
only the queries kept by the class threshold pay for the head; everything that depends on the image alone
(the Res5 half of ``lay1``, the key projection, the three FPN adapters) runs once per image.
`MaskHead.forward_reference` is upstream's per-query formula, kept as the oracle for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BoxAttentionMap(nn.Module):
    """Multi-head attention weights of each box embedding over the encoder memory (no values)."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        padding_mask: torch.Tensor,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """queries: [N, D]; memory: [B, D, h, w]; padding_mask: [B, h, w]; image_index: [N] -> [N, M, h, w]."""
        m, c = self.num_heads, self.hidden_dim // self.num_heads
        q = self.q_linear(queries) * self.normalize_fact  # [N, D]
        # k_linear applied as a 1×1 conv over the memory, once per image.
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)  # [B, D, h, w]
        k = k.view(k.shape[0], m, c, k.shape[-2], k.shape[-1])[image_index]  # [N, M, C, h, w]
        weights = torch.einsum("nmc,nmchw->nmhw", q.view(-1, m, c), k)  # [N, M, h, w]
        weights = weights.masked_fill(padding_mask[image_index][:, None], float("-inf"))  # [N, M, h, w]
        return F.softmax(weights.flatten(1), dim=-1).view(weights.shape)  # joint over M·h·w


class MaskHead(nn.Module):
    """FPN-style head: 3×3 Conv–GroupNorm–ReLU, nearest upsample + adapted Res4/Res3/Res2, to 1 logit."""

    def __init__(self, dim: int, fpn_dims: tuple[int, int, int], context_dim: int) -> None:
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, inter[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, inter[1])
        self.lay3 = nn.Conv2d(inter[1], inter[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, inter[2])
        self.lay4 = nn.Conv2d(inter[2], inter[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, inter[3])
        self.lay5 = nn.Conv2d(inter[3], inter[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, inter[4])
        self.out_lay = nn.Conv2d(inter[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter[3], 1)
        self.context_dim = context_dim

    def forward(
        self,
        src_proj: torch.Tensor,
        attention: torch.Tensor,
        fpns: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """Mask logits of N selected queries.

        src_proj: [B, D, h, w] (input projection of Res5); attention: [N, M, h, w]; fpns: (Res4, Res3,
        Res2) of the B images; image_index: [N] -> mask logits [N, H/4, W/4].
        """
        # lay1 over concat(src_proj, attention) = the src_proj half (once per image) + the attention half.
        d = self.context_dim
        per_image = F.conv2d(src_proj, self.lay1.weight[:, :d], self.lay1.bias, padding=1)  # [B, D+M, h, w]
        per_query = F.conv2d(attention, self.lay1.weight[:, d:], None, padding=1)  # [N, D+M, h, w]
        x = F.relu(self.gn1(per_image[image_index] + per_query))  # [N, D+M, h, w]
        x = F.relu(self.gn2(self.lay2(x)))  # [N, 128, h, w]
        for adapter, lay, gn, fpn in (
            (self.adapter1, self.lay3, self.gn3, fpns[0]),
            (self.adapter2, self.lay4, self.gn4, fpns[1]),
            (self.adapter3, self.lay5, self.gn5, fpns[2]),
        ):
            adapted = adapter(fpn)[image_index]  # [N, C, 2h, 2w]: once per image, gathered per query
            x = adapted + F.interpolate(x, size=adapted.shape[-2:], mode="nearest")  # [N, C, 2h, 2w]
            x = F.relu(gn(lay(x)))  # [N, C/2, 2h, 2w]
        return self.out_lay(x)[:, 0]  # [N, H/4, W/4]

    def forward_reference(
        self, src_proj: torch.Tensor, attention: torch.Tensor, fpns: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """Upstream's formula for all queries: src_proj [B, D, h, w], attention [B, Q, M, h, w] -> [B, Q, H/4, W/4]."""
        b, q = attention.shape[:2]
        x = torch.cat([src_proj.repeat_interleave(q, 0), attention.flatten(0, 1)], 1)  # [B·Q, D+M, h, w]
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for adapter, lay, gn, fpn in (
            (self.adapter1, self.lay3, self.gn3, fpns[0]),
            (self.adapter2, self.lay4, self.gn4, fpns[1]),
            (self.adapter3, self.lay5, self.gn5, fpns[2]),
        ):
            adapted = adapter(fpn).repeat_interleave(q, 0)  # [B·Q, C, 2h, 2w]
            x = adapted + F.interpolate(x, size=adapted.shape[-2:], mode="nearest")
            x = F.relu(gn(lay(x)))
        out = self.out_lay(x)  # [B·Q, 1, H/4, W/4]
        return out.view(b, q, out.shape[-2], out.shape[-1])  # [B, Q, H/4, W/4]
