"""The job's configuration tree: one frozen, validated dataclass per layer, built by `jobs/`.

It is written next to the outputs (`_run.json`) without secrets: credentials never appear in it, they come
from the standard AWS chain / environment.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from model.config import VARIANTS
from model.predictor import InferenceConfig

InputFormat = Literal["auto", "files", "tar", "parquet", "manifest"]
Device = Literal["auto", "cpu", "cuda"]

ALLOWED_OUTPUT_SCHEMES = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class InputConfig:
    uris: tuple[str, ...]
    format: InputFormat = "auto"
    bytes_column: str = "image"  # Parquet inputs: the column holding encoded image bytes
    id_column: str | None = None  # Parquet inputs: optional column with a stable image id
    max_pixels: int = 89_478_485  # Pillow's default decompression-bomb limit (≈ 9459²)

    def __post_init__(self) -> None:
        if not self.uris:
            raise ValueError("at least one --input is required")
        if self.format not in ("auto", "files", "tar", "parquet", "manifest"):
            raise ValueError(f"unknown input format {self.format!r}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class ModelSpec:
    variant: str = "detr-r50-panoptic"
    weights: str = "auto"  # a URI, "auto" (the variant's official URL) or "synthetic" (meaningless demo weights)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; known variants: {', '.join(VARIANTS)}")


@dataclass(frozen=True)
class ResourceConfig:
    batch_size: int = 8
    num_gpus: float = 1.0  # per actor; fractional values share a GPU between actors
    min_actors: int = 1
    max_actors: int = 1
    device: Device = "auto"
    num_cpus_per_actor: float = 1.0
    rows_per_file: int = 2048  # images per committed output part
    # "workers": the actor returns id maps and CPU tasks encode RLE (keeps the GPU fed); "actor": RLE in the actor
    rle_on: Literal["workers", "actor"] = "workers"

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 < self.num_gpus <= 8:
            raise ValueError(f"num_gpus per actor must be in (0, 8], got {self.num_gpus}")
        if self.min_actors < 1 or self.max_actors < self.min_actors:
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.rows_per_file <= 0:
            raise ValueError(f"rows_per_file must be positive, got {self.rows_per_file}")
        if self.rle_on not in ("workers", "actor"):
            raise ValueError(f"rle_on must be 'workers' or 'actor', got {self.rle_on!r}")


@dataclass(frozen=True)
class JobConfig:
    input: InputConfig
    output: str
    model: ModelSpec = field(default_factory=ModelSpec)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    def __post_init__(self) -> None:
        check_output_uri(self.output)

    def to_dict(self) -> dict[str, object]:
        """The configuration for `_run.json`, URIs stripped of query strings and user info (no secrets)."""
        record = asdict(self)
        record["input"]["uris"] = [redact_uri(u) for u in self.input.uris]
        record["output"] = redact_uri(self.output)
        record["model"]["weights"] = redact_uri(self.model.weights)
        return record


def redact_uri(uri: str) -> str:
    """``uri`` without ``user:password@`` and without a query string (e.g. a pre-signed URL's signature)."""
    uri = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri)
    return uri.split("?", 1)[0]


def check_output_uri(uri: str) -> None:
    """Output URIs: an allowed scheme, no credentials in the URI, no `..` segment escaping the prefix."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    scheme = match.group(1).lower() if match else "file"
    if scheme not in ALLOWED_OUTPUT_SCHEMES:
        raise ValueError(f"output scheme {scheme!r} is not allowed (allowed: {', '.join(ALLOWED_OUTPUT_SCHEMES)})")
    rest = uri[match.end() :] if match else uri
    if "@" in rest.split("/", 1)[0]:
        raise ValueError("credentials must not be part of the output URI; use the AWS credential chain")
    if ".." in rest.replace("\\", "/").split("/"):
        raise ValueError(f"output URI must not contain '..' segments: {uri!r}")
    if not rest.strip("/"):
        raise ValueError(f"output URI has no path: {uri!r}")
