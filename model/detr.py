"""DETR and its panoptic extension (Carion et al. 2020, §3.2 and §4.4), inference only.

`Detr` is the detector: backbone → input projection of Res5 → transformer → class and box heads.
`DetrPanoptic` wraps it (upstream `DETRsegm`, hence the ``detr.`` key prefix of the official panoptic
checkpoints) and adds the box-attention map and the mask head, run only for the queries whose best
class is an object with probability above the threshold.

Shape legend: B batch, Q queries, K classes incl. no-object, D hidden, M heads, H×W input canvas,
h×w Res5 grid, L = h·w, N selected queries over the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import Backbone, BackboneFeatures
from model.config import DetrConfig
from model.mask_head import BoxAttentionMap, MaskHead
from model.position_encoding import sine_position_encoding
from model.transformer import Transformer


class DetrOutput(NamedTuple):
    class_logits: torch.Tensor  # [B, Q, K]
    boxes_cxcywh: torch.Tensor  # [B, Q, 4], normalised to the canvas, in [0, 1]
    box_embeddings: torch.Tensor  # [B, Q, D], last decoder layer after the final norm
    memory: torch.Tensor  # [B, D, h, w], encoder output
    src_proj: torch.Tensor  # [B, D, h, w], input projection of Res5
    features: BackboneFeatures


class PanopticOutput(NamedTuple):
    class_logits: torch.Tensor  # [B, Q, K]
    boxes_cxcywh: torch.Tensor  # [B, Q, 4]
    scores: torch.Tensor  # [B, Q], max class probability (no-object included in the softmax)
    labels: torch.Tensor  # [B, Q], argmax class (K-1 = no-object)
    keep: torch.Tensor  # [B, Q] bool: label is an object and score > threshold
    image_index: torch.Tensor  # [N] image of each kept query (kept queries in (image, query) order)
    query_index: torch.Tensor  # [N] query slot of each kept query
    mask_logits: torch.Tensor  # [N, H/4, W/4], at stride 4 of the canvas (padding not cropped)


class PositionEncoding(nn.Module):
    """Parameter-free module in upstream's ``backbone.1`` slot (the sine encoding)."""

    def forward(self, padding_mask: torch.Tensor) -> torch.Tensor:
        return sine_position_encoding(padding_mask)  # [B, h, w] -> [B, D, h, w]


class MLP(nn.Module):
    """Box head: Linear–ReLU repeated, upstream names ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, [*dims[1:], output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Detr(nn.Module):
    """The DETR detector; ``backbone`` is a Sequential(Backbone, PositionEncoding) like upstream's Joiner."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        d = config.hidden_dim
        self.backbone = nn.Sequential(Backbone(config), PositionEncoding())
        self.input_proj = nn.Conv2d(2048, d, kernel_size=1)
        self.transformer = Transformer(
            d, config.num_heads, config.num_encoder_layers, config.num_decoder_layers, config.dim_feedforward
        )
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.class_embed = nn.Linear(d, config.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> DetrOutput:
        """images: [B, 3, H, W] normalised; padding_mask: [B, H, W] bool, True on padding."""
        features = self.backbone[0](images, padding_mask)
        pos = self.backbone[1](features.res5_mask).to(features.res5.dtype)  # [B, D, h, w]
        src_proj = self.input_proj(features.res5)  # [B, 2048, h, w] -> [B, D, h, w]
        box_embeddings, memory = self.transformer(
            src_proj, features.res5_mask, self.query_embed.weight, pos
        )  # [B, Q, D], [B, D, h, w]
        class_logits = self.class_embed(box_embeddings)  # [B, Q, K]
        boxes = self.bbox_embed(box_embeddings).sigmoid()  # [B, Q, 4]
        return DetrOutput(class_logits, boxes, box_embeddings, memory, src_proj, features)


class DetrPanoptic(nn.Module):
    """DETR with the panoptic mask head (upstream `DETRsegm`)."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        d, m = config.hidden_dim, config.num_heads
        self.config = config
        self.detr = Detr(config)
        self.bbox_attention = BoxAttentionMap(d, d, m)
        self.mask_head = MaskHead(d + m, (1024, 512, 256), d)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor, *, threshold: float) -> PanopticOutput:
        """Class logits and boxes for every query; mask logits for the kept queries only.

        images: [B, 3, H, W] normalised float; padding_mask: [B, H, W] bool. A query is kept when its
        most probable class (softmax over all K columns) is not no-object and its probability > threshold.
        """
        out = self.detr(images, padding_mask)
        probs = out.class_logits.float().softmax(-1)  # [B, Q, K]
        scores, labels = probs.max(-1)  # [B, Q], [B, Q]
        keep = labels.ne(self.config.no_object_class) & (scores > threshold)  # [B, Q]
        image_index, query_index = keep.nonzero(as_tuple=True)  # [N], [N]
        mask_logits = self._mask_logits(out, image_index, query_index)  # [N, H/4, W/4]
        return PanopticOutput(
            out.class_logits, out.boxes_cxcywh, scores, labels, keep, image_index, query_index, mask_logits
        )

    def _mask_logits(self, out: DetrOutput, image_index: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        f = out.features
        if image_index.numel() == 0:
            return f.res2.new_zeros((0, *f.res2.shape[-2:]))  # [0, H/4, W/4]
        queries = out.box_embeddings[image_index, query_index]  # [N, D]
        attention = self.bbox_attention(queries, out.memory, f.res5_mask, image_index)  # [N, M, h, w]
        return self.mask_head(out.src_proj, attention, (f.res4, f.res3, f.res2), image_index)

    def forward_all_queries(self, images: torch.Tensor, padding_mask: torch.Tensor) -> tuple[DetrOutput, torch.Tensor]:
        """Upstream's path: mask logits of every query. Returns (DetrOutput, mask logits [B, Q, H/4, W/4])."""
        out = self.detr(images, padding_mask)
        b, q, _ = out.box_embeddings.shape
        image_index = torch.arange(b, device=images.device).repeat_interleave(q)  # [B·Q]
        attention = self.bbox_attention(
            out.box_embeddings.flatten(0, 1), out.memory, out.features.res5_mask, image_index
        )  # [B·Q, M, h, w]
        f = out.features
        masks = self.mask_head.forward_reference(
            out.src_proj, attention.view(b, q, *attention.shape[1:]), (f.res4, f.res3, f.res2)
        )  # [B, Q, H/4, W/4]
        return out, masks
