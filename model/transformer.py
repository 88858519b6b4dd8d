"""The encoder–decoder transformer of DETR (§3.2, Fig. 10), post-norm, inference only.

Encoder: q = k = src + pos, v = src, with the key-padding mask. Decoder: starts from zeros; self-attention
q = k = tgt + query_pos; cross-attention q = tgt + query_pos, k = memory + pos, v = memory, with the
key-padding mask; the decoder's final LayerNorm is applied to its last output. Only the last decoder
layer's output is returned (the five intermediate outputs feed training losses only).
Parameter names follow upstream `models/transformer.py`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class EncoderLayer(nn.Module):
    """Self-attention + FFN, each followed by residual add and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """src, pos: [L, B, D]; key_padding_mask: [B, L] -> [L, B, D]."""
        q = k = src + pos  # [L, B, D]
        attended = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + attended)  # [L, B, D]
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))  # [L, B, D]


class DecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the memory, FFN; post-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        *,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_key_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """tgt, query_pos: [Q, B, D]; memory, pos: [L, B, D]; mask: [B, L] -> [Q, B, D]."""
        q = k = tgt + query_pos  # [Q, B, D]
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt, need_weights=False)[0])  # [Q, B, D]
        attended = self.multihead_attn(
            query=tgt + query_pos,
            key=memory + pos,
            value=memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]  # [Q, B, D]
        tgt = self.norm2(tgt + attended)  # [Q, B, D]
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))  # [Q, B, D]


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)  # [L, B, D]
        return src


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        *,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_key_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        for layer in self.layers:
            tgt = layer(
                tgt, memory, pos=pos, query_pos=query_pos, memory_key_padding_mask=memory_key_padding_mask
            )  # [Q, B, D]
        return self.norm(tgt)  # [Q, B, D]


class Transformer(nn.Module):
    """DETR's transformer: Res5 tokens in, one embedding per object query out."""

    def __init__(
        self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int, dim_feedforward: int
    ) -> None:
        super().__init__()
        self.encoder = Encoder(EncoderLayer(d_model, nhead, dim_feedforward), num_encoder_layers)
        self.decoder = Decoder(DecoderLayer(d_model, nhead, dim_feedforward), num_decoder_layers, d_model)
        self.d_model = d_model

    def forward(
        self, src: torch.Tensor, padding_mask: torch.Tensor, query_embed: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run encoder and decoder.

        src: [B, D, h, w] projected Res5; padding_mask: [B, h, w] bool; query_embed: [Q, D];
        pos: [B, D, h, w]. Returns (box_embeddings [B, Q, D], memory [B, D, h, w]).
        """
        b, d, h, w = src.shape
        tokens = src.flatten(2).permute(2, 0, 1)  # [B, D, h, w] -> [L, B, D]
        pos_tokens = pos.flatten(2).permute(2, 0, 1)  # [B, D, h, w] -> [L, B, D]
        key_padding_mask = padding_mask.flatten(1)  # [B, h, w] -> [B, L]
        query_pos = query_embed.unsqueeze(1).repeat(1, b, 1)  # [Q, D] -> [Q, B, D]
        tgt = torch.zeros_like(query_pos)  # [Q, B, D]

        memory = self.encoder(tokens, pos_tokens, key_padding_mask)  # [L, B, D]
        hs = self.decoder(
            tgt, memory, pos=pos_tokens, query_pos=query_pos, memory_key_padding_mask=key_padding_mask
        )  # [Q, B, D]
        return hs.transpose(0, 1), memory.permute(1, 2, 0).reshape(b, d, h, w)  # [B, Q, D], [B, D, h, w]
