"""ResNet backbone with frozen batch norm; keeps the Res2..Res5 feature maps (DETR §3.2, Fig. 8).

Parameter names follow upstream `models/backbone.py` (`body.conv1`, `body.layer1`, ...) so the official
checkpoints load with ``strict=True``. Frozen batch norm (eps 1e-5) has no ``num_batches_tracked``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.config import DetrConfig


class BackboneFeatures(NamedTuple):
    """Feature maps of one batch. Strides 4, 8, 16, 32 (Res5 at 16 with DC5)."""

    res2: torch.Tensor  # [B, 256, H/4, W/4]
    res3: torch.Tensor  # [B, 512, H/8, W/8]
    res4: torch.Tensor  # [B, 1024, H/16, W/16]
    res5: torch.Tensor  # [B, 2048, h, w]
    res5_mask: torch.Tensor  # [B, h, w] bool, True on padding


class ResNetBody(nn.Module):
    """The convolutional trunk of a torchvision ResNet (no pooling head), under upstream's names."""

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # [B, 3, H, W] -> [B, 64, H/4, W/4]
        res2 = self.layer1(x)  # [B, 256, H/4, W/4]
        res3 = self.layer2(res2)  # [B, 512, H/8, W/8]
        res4 = self.layer3(res3)  # [B, 1024, H/16, W/16]
        res5 = self.layer4(res4)  # [B, 2048, h, w]
        return res2, res3, res4, res5


class Backbone(nn.Module):
    """ResNet-50/101 with frozen BN, returning Res2..Res5 and the padding mask at Res5's size."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, config.backbone)(
            weights=None,  # weights come from the DETR checkpoint, never from a hub download
            replace_stride_with_dilation=[False, False, config.dilation],
            norm_layer=partial(FrozenBatchNorm2d, eps=config.frozen_bn_eps),
        )
        self.body = ResNetBody(resnet)
        self.num_channels = 2048

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> BackboneFeatures:
        """images: [B, 3, H, W] normalised float; padding_mask: [B, H, W] bool, True on padding."""
        res2, res3, res4, res5 = self.body(images)
        # Upstream's legacy nearest interpolation (not "nearest-exact") of the mask to Res5's size.
        res5_mask = F.interpolate(padding_mask[None].float(), size=res5.shape[-2:]).to(torch.bool)[0]
        return BackboneFeatures(res2, res3, res4, res5, res5_mask)  # res5_mask: [B, h, w]
