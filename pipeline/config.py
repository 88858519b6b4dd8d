"""The job's configuration tree: one frozen, validated dataclass per layer, built by `jobs/`.

It is recorded with the outputs (`_runs/<run_id>.json`) without secrets: credentials never appear in it, they come
from the standard AWS chain / environment.

Every option of `panoptic-flow segment` is one field here (or in `model.config.InferenceConfig`): its
type (a ``Literal`` gives the choices), its default, and its help text in ``metadata`` are the only
declaration; `jobs/options.py` generates the command line, the job file (``--config``) and the README's
option table from them, and `model.config.check_literal_fields` validates every ``Literal`` field. A field
without ``metadata["help"]`` is configuration but no option. Metadata keys: ``help``; ``option`` (the flag
without ``--`` when it is not the field name with ``-`` for ``_``); ``metavar``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from model.config import InferenceConfig, VariantName, check_literal_fields

InputFormat = Literal["auto", "files", "tar", "parquet", "manifest"]
Device = Literal["auto", "cpu", "cuda"]

ALLOWED_OUTPUT_SCHEMES = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class InputConfig:
    uris: tuple[str, ...] = field(
        metadata={
            "option": "input",
            "metavar": "URI",
            "help": "a folder/prefix/glob of images (jpg, png, webp, bmp, gif first frame, tiff), WebDataset `.tar` "
            "shards, Parquet files with an image-bytes column, or a manifest (`.txt`, one URI per line; or "
            "`--input-format manifest` for a Parquet file with a `uri` column); local, `s3://`, any fsspec URI",
        }
    )
    format: InputFormat = field(
        default="auto",
        metadata={"option": "input-format", "help": "`auto` tells the kind from the URI; the others force one"},
    )
    bytes_column: str = field(
        default="image", metadata={"help": "Parquet inputs: the column holding encoded image bytes"}
    )
    id_column: str | None = field(
        default=None, metadata={"help": "Parquet inputs: an optional column with a stable image id"}
    )
    max_pixels: int = field(
        default=89_478_485,  # Pillow's default decompression-bomb limit (≈ 9459²)
        metadata={"help": "larger images (checked on the header, before decoding) are error rows"},
    )
    max_bytes: int = field(
        default=1 << 30,  # `pipeline.inputs.storage.DEFAULT_MAX_BYTES`
        metadata={
            "help": "the most bytes read of one input object (an image file, or a whole tar / Parquet shard): a "
            "larger one is an error row, never read whole, so that no input can exhaust a worker's memory"
        },
    )

    def __post_init__(self) -> None:
        check_literal_fields(self)
        if not self.uris:
            raise ValueError("at least one --input is required")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")


@dataclass(frozen=True)
class ModelSpec:
    variant: VariantName = field(default="detr-r50-panoptic", metadata={"help": "the published model to run"})
    weights: str = field(
        default="auto",
        metadata={
            "help": "checkpoint URI (local path, `s3://…`, `https://…` cached in `~/.cache/panoptic-flow`); `auto` = "
            "the variant's official file; `synthetic` = deterministic demo weights (meaningless segments)"
        },
    )

    def __post_init__(self) -> None:
        check_literal_fields(self)


@dataclass(frozen=True)
class ResourceConfig:
    batch_size: int = field(default=8, metadata={"help": "images per model call"})
    num_gpus: float = field(default=1.0, metadata={"help": "GPUs per actor (fractions share a GPU)"})
    min_actors: int = field(
        default=1, metadata={"help": "smallest model actor pool (it autoscales between --min-actors and --max-actors)"}
    )
    max_actors: int | None = field(
        default=None,
        metadata={
            "help": "largest model actor pool; unset: 1 with GPUs (more actors: more GPUs), and on CPU one actor "
            "per CPU of half the cluster's (`pipeline.segmenting.resources.actor_layout`: the layout measured fastest)"
        },
    )
    device: Device = field(
        default="auto",
        metadata={
            "help": "`auto` uses GPUs when the cluster has some at start, else CPU; `cuda` always requests GPUs "
            "(use it on clusters whose GPU workers autoscale from zero: the request makes them appear); `cpu`"
        },
    )
    cpus_per_actor: float | None = field(
        default=None,
        metadata={
            "help": "CPUs each model actor reserves for its reading, decoding, RLE and commit threads (and, on "
            "CPU, its torch threads); unset: derived from the nodes "
            "(`pipeline.segmenting.resources.actor_layout`: a GPU actor its share of its node's CPUs, one kept free; "
            "a CPU actor 1, or with --max-actors its share of half the cluster's)"
        },
    )
    rows_per_file: int = field(
        default=2048,
        metadata={
            "help": "images per committed Parquet part (each model actor call reads, segments and commits one "
            "shard of up to this many images; a run's last parts hold the rest)"
        },
    )

    def __post_init__(self) -> None:
        check_literal_fields(self)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 < self.num_gpus <= 8:
            raise ValueError(f"num_gpus per actor must be in (0, 8], got {self.num_gpus}")
        if self.min_actors < 1 or (self.max_actors is not None and self.max_actors < self.min_actors):
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be positive, got {self.cpus_per_actor}")
        if self.rows_per_file <= 0:
            raise ValueError(f"rows_per_file must be positive, got {self.rows_per_file}")


@dataclass(frozen=True)
class FailureConfig:
    """What one bad input, one stalled read, one hung model batch or a systematic failure may cost a job: the
    README's "Failures" table states what each case gives."""

    read_timeout_s: float = field(
        default=60.0,
        metadata={
            "option": "read-timeout",
            "metavar": "SECONDS",
            "help": "a storage read that receives nothing for this long (connect or read) is given up: a retryable "
            "error row, and the work block goes on",
        },
    )
    hung_batch_s: float = field(
        default=300.0,
        metadata={
            "option": "hung-batch-timeout",
            "metavar": "SECONDS",
            "help": "a model batch running longer than this and 20x the actor's typical batch is a hung actor: it is "
            "killed, and the images in flight are redone one at a time",
        },
    )
    retry_poisoned: bool = field(
        default=False,
        metadata={
            "help": "redo the images that killed their model worker twice in an earlier run (their rows say "
            "`killed the model worker`); by default a re-run keeps those rows, since it would only be killed again",
        },
    )
    max_error_rate: float = field(
        default=0.5,
        metadata={
            "metavar": "FRACTION",
            "help": "stop the job (exit 1, all committed parts kept: a re-run resumes) when more than this fraction "
            "of the last --error-window images are error rows; 1 never stops",
        },
    )
    error_window: int = field(
        default=2000,
        metadata={"metavar": "IMAGES", "help": "how many of the latest images --max-error-rate looks at"},
    )

    def __post_init__(self) -> None:
        if self.read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be positive, got {self.read_timeout_s}")
        if self.hung_batch_s <= 0:
            raise ValueError(f"hung_batch_s must be positive, got {self.hung_batch_s}")
        if not 0 < self.max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be in (0, 1], got {self.max_error_rate}")
        if self.error_window < 1:
            raise ValueError(f"error_window must be positive, got {self.error_window}")


@dataclass(frozen=True)
class SnapshotConfig:
    """When a run writes snapshots of its output, and how many it keeps (README "Snapshots":
    `pipeline.exactly_once.snapshots`)."""

    snapshot_every_s: float = field(
        default=120.0,
        metadata={
            "option": "snapshot-every",
            "metavar": "SECONDS",
            "help": "while parts arrive, write a snapshot (what readers see) at most this often; one is also written "
            "at the start and the end of the run",
        },
    )
    keep_snapshots: int = field(
        default=100,
        metadata={
            "metavar": "N",
            "help": "at the end of a run, delete the snapshots older than the newest N, and the part files that only "
            "they list (the older versions of parts a re-run rewrote)",
        },
    )

    def __post_init__(self) -> None:
        if self.snapshot_every_s < 0:
            raise ValueError(f"snapshot_every_s must be >= 0, got {self.snapshot_every_s}")
        if self.keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be >= 1, got {self.keep_snapshots}")


@dataclass(frozen=True)
class JobConfig:
    input: InputConfig
    output: str = field(
        metadata={
            "metavar": "URI",
            "help": "local folder or `s3://`, `gs://`, … (no `..`, no credentials in the URI); re-running with the "
            "same output resumes",
        }
    )
    model: ModelSpec = field(default_factory=ModelSpec)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    failures: FailureConfig = field(default_factory=FailureConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)

    def __post_init__(self) -> None:
        check_output_uri(self.output)

    def to_dict(self) -> dict[str, object]:
        """The configuration for the run record, every string redacted (`redact_uri`: no secrets)."""
        return _redacted(asdict(self))


def _redacted(value: object) -> object:
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


REDACTED = "***"
_SCHEME = r"[a-zA-Z][a-zA-Z0-9+.-]*://"
_TOKEN_CHAR = r"[^\s'\"<>]"  # a URI inside a text ends at white space or a quote
# ``scheme://user:password@``, the password holding any of ``/ @ :`` (AWS secret keys hold ``/``): from the
# first ``:`` of the first segment to the token's last ``@``; or ``scheme://token@`` without a ``/`` before it.
_USERINFO = re.compile(rf"({_SCHEME})(?:[^\s/@:'\"<>]*:{_TOKEN_CHAR}*@|[^\s/@'\"<>]*@)")
_QUERY = re.compile(rf"({_SCHEME}[^\s?'\"<>]*)\?{_TOKEN_CHAR}*")  # a URI's query string (pre-signed URLs)
# key=value pairs of credentials anywhere (also outside a URI): X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token, X-Goog-Signature, sig (Azure SAS), Signature, token, password, secret, ...
_SECRET_PARAMETER = re.compile(
    r"(?i)(?<![A-Za-z0-9_])((?:x-amz-[\w-]+|x-goog-[\w-]+|sig|signature|[\w-]*token|password|passwd|secret"
    r"|[\w-]*secret[\w-]*|credential|awsaccesskeyid|api[_-]?key)=)[^&\s'\"<>]+"
)


def redact_uri(text: str) -> str:
    """``text`` (a URI, an argument such as ``--weights=URI``, a log line, an error message) with every secret
    taken out: a URI's ``user:password@`` or ``token@`` (a password may hold ``/``, ``@`` and ``:``), a URI's
    query string (a pre-signed URL's signature), and credential parameters anywhere (``X-Amz-*=``,
    ``X-Goog-*=``, ``sig=``, ``Signature=``, ``token=``, ``password=``, ...: their values become ``***``).
    The one redaction for everything printed, logged or recorded."""
    text = _USERINFO.sub(r"\1", text)
    text = _QUERY.sub(r"\1", text)
    return _SECRET_PARAMETER.sub(rf"\1{REDACTED}", text)


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries credentials that `redact_uri` would take out."""
    return redact_uri(uri) != uri


def check_output_uri(uri: str) -> None:
    """Output URIs: an allowed scheme, no credentials in the URI, no `..` segment escaping the prefix. Messages
    never repeat a secret."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    scheme = match.group(1).lower() if match else "file"
    if scheme not in ALLOWED_OUTPUT_SCHEMES:
        raise ValueError(f"output scheme {scheme!r} is not allowed (allowed: {', '.join(ALLOWED_OUTPUT_SCHEMES)})")
    rest = uri[match.end() :] if match else uri
    if "@" in rest.split("/", 1)[0] or has_credentials(uri):
        raise ValueError(
            "credentials must not be part of the output URI (nor a signed query string); use the AWS credential chain"
        )
    if ".." in rest.replace("\\", "/").split("/"):
        raise ValueError(f"output URI must not contain '..' segments: {uri!r}")
    if not rest.strip("/"):
        raise ValueError(f"output URI has no path: {uri!r}")
