"""Model configuration: the three published DETR panoptic variants, their official weights, and how
images are sized, batched and thresholded for inference (`InferenceConfig`).

Values follow Carion et al. 2020 and `hubconf.py` of facebookresearch/detr: 250 class slots plus one
"no object" slot, 100 object queries, d = 256, 8 heads, 6 encoder and 6 decoder layers, FFN 2048.

Plain dataclasses, no torch: the job's command line is generated from these fields (see
`jobs/options.py`; a field's ``metadata["help"]`` makes it an option), so ``--help`` needs no torch.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Literal

BackboneName = Literal["resnet50", "resnet101"]
VariantName = Literal["detr-r50-panoptic", "detr-r50-dc5-panoptic", "detr-r101-panoptic"]
BatchMode = Literal["exact", "bucketed"]
Precision = Literal["fp32", "bf16", "fp16"]


def literal_choices(annotation: object) -> tuple[str, ...] | None:
    """The values of a ``Literal[...]`` annotation (also inside ``Literal[...] | None``); None for other types."""
    if typing.get_origin(annotation) is Literal:
        return tuple(typing.get_args(annotation))
    for member in typing.get_args(annotation):  # Optional / union
        if typing.get_origin(member) is Literal:
            return tuple(typing.get_args(member))
    return None


def check_literal_fields(instance: object) -> None:
    """Raise ValueError naming the field and the allowed values when a ``Literal``-typed field of the dataclass
    ``instance`` holds another value (the one check of every string option, wherever the value came from)."""
    hints = typing.get_type_hints(type(instance))
    for f in fields(instance):  # type: ignore[arg-type]
        choices = literal_choices(hints[f.name])
        value = getattr(instance, f.name)
        if choices is not None and value not in choices and value is not None:
            raise ValueError(f"unknown {f.name.replace('_', ' ')} {value!r}; choose one of: {', '.join(choices)}")


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


@dataclass(frozen=True)
class InferenceConfig:
    """How images are sized, batched and thresholded. Defaults reproduce the reference."""

    min_size: int = field(default=800, metadata={"help": "shorter side after resizing (the reference resize rule)"})
    max_size: int = field(
        default=1333, metadata={"help": "cap on the longer side after resizing (the reference resize rule)"}
    )
    threshold: float = field(
        default=0.85, metadata={"help": "class-probability threshold of the panoptic merge, in [0, 1)"}
    )
    batch_mode: BatchMode = field(
        default="exact",
        metadata={
            "help": "`exact`: only images of equal processed size share a batch (results equal the reference's "
            "single-image run); `bucketed`: pad to 128-px buckets (bigger batches when sizes are mixed; each result "
            "still independent of its batch companions, but the padding reaches the convolutions and the "
            "transformer and changes results well inside the image: measured on non-chaotic deterministic weights, "
            "a 341×256 image padded to 384×256 kept only 42 % of its pixel categories). Unmeasured on trained "
            "weights (`pytest -m weights` gates it), so `exact` stays the default"
        },
    )
    bucket: int = 128  # canvas multiple in "bucketed" mode
    precision: Precision = field(
        default="fp32",
        metadata={
            "help": "`fp32` reproduces the reference; `bf16` / `fp16` autocast (faster on GPUs and on CPUs with "
            "AVX-512 BF16, slower on CPUs without it). Check it on your data with `pytest -m weights`: a switch "
            "passes when ≥ 99 % of pixels stay in matching segments (segments matched by overlap within a "
            "category) and it is at least as close to fp32 as ±0.5 grey level of input noise is "
            "(`bench/agreement.py`, BENCHMARKS.md)"
        },
    )
    channels_last: bool | None = field(
        default=None,
        metadata={
            "help": "channels-last memory format for the convolutions (fp32 either way); unset: the device's measured "
            "default (`model.predictor.CHANNELS_LAST_BY_DEVICE_TYPE`: on for CPU, 1.16-1.20x faster there; off for "
            "CUDA until `make gpu-check` has measured it; `--no-channels-last` forces it off)"
        },
    )
    # JPEG decode (nvJPEG on CUDA), EXIF orientation and resize on the model's device instead of CPU workers
    device_preprocess: bool = field(
        default=False,
        metadata={
            "help": "JPEGs are decoded (nvJPEG on CUDA), rotated and resized by the model actor on its device; the "
            "CPU workers only check headers and the object store carries compressed bytes. Other formats, CMYK "
            "JPEGs and anything the device decoder refuses go through Pillow as usual. Pixels differ from "
            "Pillow's by about one grey level. Uses torchvision's `decode_jpeg` (deprecated in torchvision 0.29 "
            "in favour of TorchCodec; it still works)"
        },
    )

    def __post_init__(self) -> None:
        check_literal_fields(self)
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.min_size <= 0 or self.max_size < self.min_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.bucket <= 0 or self.bucket % 32:
            raise ValueError(f"bucket must be a positive multiple of 32, got {self.bucket}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be true, false or unset (None), got {self.channels_last!r}")
