"""ResNet backbone with frozen batch norm; keeps the Res2..Res5 feature maps (DETR §3.2, Fig. 8).

Parameter names follow upstream `models/backbone.py` (`body.conv1`, `body.layer1`, ...) so the official
checkpoints load with ``strict=True``. Frozen batch norm (eps 1e-5) has no ``num_batches_tracked``.

The trunk is torchvision's ResNet (v1.5: the stride in each bottleneck's 3×3 conv; DC5 dilates Res5 instead of
striding), written here with the same modules, names, order and initialisation (so seeded weights are the same
tensors), because importing torchvision costs every model actor ~2.5 s (its ops pull in ``torch._dynamo``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DetrConfig

RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}  # bottlenecks per stage (Res2..Res5)


class BackboneFeatures(NamedTuple):
    """Feature maps of one batch. Strides 4, 8, 16, 32 (Res5 at 16 with DC5)."""

    res2: torch.Tensor  # [B, 256, H/4, W/4]
    res3: torch.Tensor  # [B, 512, H/8, W/8]
    res4: torch.Tensor  # [B, 1024, H/16, W/16]
    res5: torch.Tensor  # [B, 2048, h, w]
    res5_mask: torch.Tensor  # [B, h, w] bool, True on padding


class ResNetBody(nn.Module):
    """The convolutional trunk of a ResNet (no pooling head), under upstream's (torchvision's) names: ``conv1``,
    ``bn1``, ``layer1`` .. ``layer4`` of `Bottleneck` blocks, each first block with its ``downsample``."""

    def __init__(self, depths: tuple[int, int, int, int], *, dilate_res5: bool, bn_eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._channels, self._dilation, self._bn_eps = 64, 1, bn_eps
        self.layer1 = self._layer(64, depths[0], stride=1)
        self.layer2 = self._layer(128, depths[1], stride=2)
        self.layer3 = self._layer(256, depths[2], stride=2)
        self.layer4 = self._layer(512, depths[3], stride=2, dilate=dilate_res5)
        # torchvision's ResNet also builds a classifier (dropped here) before it initialises its convolutions:
        # drawing the same random numbers in the same order keeps seeded weights identical to its.
        nn.Linear(512 * Bottleneck.expansion, 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, width: int, blocks: int, *, stride: int, dilate: bool = False) -> nn.Sequential:
        """torchvision's ``_make_layer``: the first block strides (or, dilated, keeps the resolution) and projects."""
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._channels, out_channels, kernel_size=1, stride=stride, bias=False),
                FrozenBatchNorm2d(out_channels, eps=self._bn_eps),
            )
        layers = [Bottleneck(self._channels, width, stride, downsample, previous_dilation, self._bn_eps)]
        self._channels = out_channels
        layers += [Bottleneck(out_channels, width, 1, None, self._dilation, self._bn_eps) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # [B, 3, H, W] -> [B, 64, H/4, W/4]
        res2 = self.layer1(x)  # [B, 256, H/4, W/4]
        res3 = self.layer2(res2)  # [B, 512, H/8, W/8]
        res4 = self.layer3(res3)  # [B, 1024, H/16, W/16]
        res5 = self.layer4(res4)  # [B, 2048, h, w]
        return res2, res3, res4, res5


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: 1×1 reduce, 3×3 (strided or dilated), 1×1 expand (×4), plus the
    identity or its ``downsample`` projection."""

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int, downsample: nn.Module | None, dilation: int, bn_eps: float
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width, eps=bn_eps)
        self.conv2 = nn.Conv2d(
            width, width, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = FrozenBatchNorm2d(width, eps=bn_eps)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # [B, width, H, W]
        out = self.relu(self.bn2(self.conv2(out)))  # [B, width, H/s, W/s]
        out = self.bn3(self.conv3(out))  # [B, 4·width, H/s, W/s]
        identity = x if self.downsample is None else self.downsample(x)  # [B, 4·width, H/s, W/s]
        return self.relu(out + identity)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers (torchvision's and upstream DETR's):
    ``x · w / sqrt(var + eps) + (b - mean · w / sqrt(var + eps))``. A checkpoint's ``num_batches_tracked`` is
    dropped on load."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias  # [B, C, H, W]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Backbone(nn.Module):
    """ResNet-50/101 with frozen BN, returning Res2..Res5 and the padding mask at Res5's size."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.body = ResNetBody(  # weights come from the DETR checkpoint, never from a hub download
            RESNET_DEPTHS[config.backbone], dilate_res5=config.dilation, bn_eps=config.frozen_bn_eps
        )
        self.num_channels = 2048

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> BackboneFeatures:
        """images: [B, 3, H, W] normalised float; padding_mask: [B, H, W] bool, True on padding."""
        res2, res3, res4, res5 = self.body(images)
        # Upstream's legacy nearest interpolation (not "nearest-exact") of the mask to Res5's size.
        res5_mask = F.interpolate(padding_mask[None].float(), size=res5.shape[-2:]).to(torch.bool)[0]
        return BackboneFeatures(res2, res3, res4, res5, res5_mask)  # res5_mask: [B, h, w]
