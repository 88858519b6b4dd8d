"""Model configuration: the three published DETR panoptic variants and their official weights.

Values follow Carion et al. 2020 and `hubconf.py` of facebookresearch/detr: 250 class slots plus one
"no object" slot, 100 object queries, d = 256, 8 heads, 6 encoder and 6 decoder layers, FFN 2048.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BackboneName = Literal["resnet50", "resnet101"]
VariantName = Literal["detr-r50-panoptic", "detr-r50-dc5-panoptic", "detr-r101-panoptic"]


@dataclass(frozen=True)
class DetrConfig:
    """Architecture of one DETR panoptic model (inference only: no dropout, no losses)."""

    backbone: BackboneName = "resnet50"
    dilation: bool = False  # DC5: dilate the last stage (stride 16 instead of 32)
    num_classes: int = 250  # class slots; the class head has num_classes + 1 outputs (last = no-object)
    num_queries: int = 100
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    frozen_bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet50", "resnet101"):
            raise ValueError(f"backbone must be 'resnet50' or 'resnet101', got {self.backbone!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("num_classes", "num_queries", "hidden_dim", "num_heads", "dim_feedforward"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def no_object_class(self) -> int:
        """Index of the "no object" column of the class logits."""
        return self.num_classes


@dataclass(frozen=True)
class Variant:
    """A published model: its architecture and where its official weights live."""

    name: VariantName
    config: DetrConfig
    url: str  # official release file; the hex in its name is the start of the file's sha256
    hf_repo: str | None  # Hugging Face hub layout of the same weights, when one exists


_RELEASES = "https://dl.fbaipublicfiles.com/detr"

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "detr-r50-panoptic",
            DetrConfig(backbone="resnet50"),
            f"{_RELEASES}/detr-r50-panoptic-00ce5173.pth",
            "facebook/detr-resnet-50-panoptic",
        ),
        Variant(
            "detr-r50-dc5-panoptic",
            DetrConfig(backbone="resnet50", dilation=True),
            f"{_RELEASES}/detr-r50-dc5-panoptic-da08f1b1.pth",
            None,
        ),
        Variant(
            "detr-r101-panoptic",
            DetrConfig(backbone="resnet101"),
            f"{_RELEASES}/detr-r101-panoptic-40021d53.pth",
            "facebook/detr-resnet-101-panoptic",
        ),
    )
}


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a ValueError lists the known names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}") from None
