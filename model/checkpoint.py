"""Loading DETR panoptic weights: official release files and Hugging Face layouts, from any URI.

Sources: a local path, any fsspec URI (``s3://...``, ``gs://...``) or ``https://`` — remote files are
copied once into a local cache (``$PANOPTIC_FLOW_CACHE`` or ``~/.cache/panoptic-flow``) keyed by URI.
Formats: ``torch.save`` files read with ``weights_only=True`` (never unpickled; upstream training
checkpoints also pickle an ``argparse.Namespace``, which is allow-listed), and safetensors files.
Layouts: the official ``{'model': state_dict}`` (upstream names, ``detr.`` prefix) and Hugging Face's
`DetrForSegmentation` (v4 hub files with a timm backbone, and transformers v5 names with either
backbone), translated by one explicit key table. Loading is strict: a mismatch names the missing,
unexpected and mis-shaped keys. An official file's name carries the start of its sha256; it is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import fsspec
import torch

from model.config import DetrConfig
from model.detr import DetrPanoptic

StateDict = dict[str, torch.Tensor]

_SHA_IN_NAME = re.compile(r"-([0-9a-f]{8})\.(?:pth|pt|bin|safetensors)$")
_SAFETENSORS_PREFIX_LEN = 8
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since torch 1.6
_PICKLE_PROTOCOL_2_PLUS = b"\x80"  # torch.save(_use_new_zipfile_serialization=False): a pickle


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


class CheckpointNotFound(CheckpointError):
    """The checkpoint's file or URI does not exist, or could not be reached (offline, DNS, refused)."""


ACCEPTED_FORMATS = (
    "torch.save state dicts read with weights_only (official DETR release files, upstream training checkpoints, "
    "Hugging Face pytorch_model.bin) and safetensors files"
)


# --------------------------------------------------------------------------------------------------------
# Reading bytes
# --------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where remote checkpoints are cached."""
    return Path(os.environ.get("PANOPTIC_FLOW_CACHE", Path.home() / ".cache" / "panoptic-flow"))


def fetch(uri: str) -> Path:
    """A local path holding ``uri``'s bytes: the path itself when local, else a cached copy."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        path = Path(fsspec.core.strip_protocol(uri) if protocol else uri)
        if not path.is_file():
            raise CheckpointNotFound(f"weights file not found: {uri}")
        return path
    name = Path(uri.split("?")[0]).name or "weights"
    target = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        with fsspec.open(uri, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except (OSError, ValueError) as exc:  # fsspec raises FileNotFoundError, ClientConnectorError, PermissionError...
        partial.unlink(missing_ok=True)
        # the exception's own text may repeat the URI with its credentials: only its type is named
        if _unreachable(exc):
            raise CheckpointNotFound(f"{uri} could not be reached ({_root_cause(exc)}; offline?)") from exc
        if isinstance(exc, FileNotFoundError):
            raise CheckpointNotFound(f"weights not found at {uri}") from exc
        raise CheckpointError(f"cannot read weights from {uri}: {type(exc).__name__}") from exc
    os.replace(partial, target)  # atomic: concurrent actors never see a half-written file
    return target


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return chain


def _unreachable(exc: BaseException) -> bool:
    """The store could not be reached (refused, DNS, timeout): fsspec's HTTP reports even that as a
    FileNotFoundError, caused by the connection error."""
    return any(
        isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and "Connect" in type(e).__name__)
        for e in _causes(exc)
    )


def _root_cause(exc: BaseException) -> str:
    return type(_causes(exc)[-1]).__name__


def check_sha256_prefix(path: Path, name: str) -> None:
    """Official files carry the first 8 hex digits of their sha256 in their name: verify it."""
    match = _SHA_IN_NAME.search(name)
    if match is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise CheckpointError(
            f"{name}: sha256 {digest.hexdigest()[:8]}… does not match the {match.group(1)} in its name "
            "(corrupt or truncated download?)"
        )


def read_state_dict(uri: str) -> StateDict:
    """The tensors of the file at ``uri``, in the official key layout."""
    path = fetch(uri)
    check_sha256_prefix(path, Path(uri.split("?")[0]).name)
    raw = _read_tensors(path)
    return to_official_layout(raw)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SAFETENSORS_PREFIX_LEN + 1)
    if len(head) < _SAFETENSORS_PREFIX_LEN + 1:
        return False
    header_len = int.from_bytes(head[:_SAFETENSORS_PREFIX_LEN], "little")
    return 0 < header_len < path.stat().st_size and head[_SAFETENSORS_PREFIX_LEN:] == b"{"


def _read_tensors(path: Path) -> Mapping[str, object]:
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    data = path.read_bytes()
    if not data.startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL_2_PLUS)):  # neither torch.save format (zip, legacy pickle)
        raise CheckpointError(f"{path.name}: not a PyTorch/safetensors checkpoint; accepted: {ACCEPTED_FORMATS}")
    try:
        # weights_only=True explicitly: it also overrides TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path.name}: not a loadable weights file ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "pickled objects other than tensors are refused"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # official release / training checkpoint
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name}: expected a state dict, found {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------------------------
# The key table: official (upstream) names <-> Hugging Face DetrForSegmentation names
# --------------------------------------------------------------------------------------------------------

# (official, Hugging Face v5) name templates; {i} matches a layer number. Order matters: first match wins.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("detr.input_proj.", "detr.model.input_projection."),
    ("detr.query_embed.", "detr.model.query_position_embeddings."),
    ("detr.class_embed.", "detr.class_labels_classifier."),
    ("detr.bbox_embed.layers.{i}.", "detr.bbox_predictor.layers.{i}."),
    (
        "detr.transformer.encoder.layers.{i}.self_attn.out_proj.",
        "detr.model.encoder.layers.{i}.self_attn.o_proj.",
    ),
    ("detr.transformer.encoder.layers.{i}.norm1.", "detr.model.encoder.layers.{i}.self_attn_layer_norm."),
    ("detr.transformer.encoder.layers.{i}.linear1.", "detr.model.encoder.layers.{i}.mlp.fc1."),
    ("detr.transformer.encoder.layers.{i}.linear2.", "detr.model.encoder.layers.{i}.mlp.fc2."),
    ("detr.transformer.encoder.layers.{i}.norm2.", "detr.model.encoder.layers.{i}.final_layer_norm."),
    (
        "detr.transformer.decoder.layers.{i}.self_attn.out_proj.",
        "detr.model.decoder.layers.{i}.self_attn.o_proj.",
    ),
    ("detr.transformer.decoder.layers.{i}.norm1.", "detr.model.decoder.layers.{i}.self_attn_layer_norm."),
    (
        "detr.transformer.decoder.layers.{i}.multihead_attn.out_proj.",
        "detr.model.decoder.layers.{i}.encoder_attn.o_proj.",
    ),
    ("detr.transformer.decoder.layers.{i}.norm2.", "detr.model.decoder.layers.{i}.encoder_attn_layer_norm."),
    ("detr.transformer.decoder.layers.{i}.linear1.", "detr.model.decoder.layers.{i}.mlp.fc1."),
    ("detr.transformer.decoder.layers.{i}.linear2.", "detr.model.decoder.layers.{i}.mlp.fc2."),
    ("detr.transformer.decoder.layers.{i}.norm3.", "detr.model.decoder.layers.{i}.final_layer_norm."),
    ("detr.transformer.decoder.norm.", "detr.model.decoder.layernorm."),
    ("bbox_attention.q_linear.", "bbox_attention.q_proj."),
    ("bbox_attention.k_linear.", "bbox_attention.k_proj."),
    ("mask_head.lay1.", "mask_head.conv1.conv."),
    ("mask_head.gn1.", "mask_head.conv1.norm."),
    ("mask_head.lay2.", "mask_head.conv2.conv."),
    ("mask_head.gn2.", "mask_head.conv2.norm."),
    ("mask_head.adapter1.", "mask_head.fpn_stages.0.fpn_adapter."),
    ("mask_head.lay3.", "mask_head.fpn_stages.0.refine.conv."),
    ("mask_head.gn3.", "mask_head.fpn_stages.0.refine.norm."),
    ("mask_head.adapter2.", "mask_head.fpn_stages.1.fpn_adapter."),
    ("mask_head.lay4.", "mask_head.fpn_stages.1.refine.conv."),
    ("mask_head.gn4.", "mask_head.fpn_stages.1.refine.norm."),
    ("mask_head.adapter3.", "mask_head.fpn_stages.2.fpn_adapter."),
    ("mask_head.lay5.", "mask_head.fpn_stages.2.refine.conv."),
    ("mask_head.gn5.", "mask_head.fpn_stages.2.refine.norm."),
    ("mask_head.out_lay.", "mask_head.output_conv."),
)

# transformers v4 names (the files on the Hugging Face hub) -> v5 names, applied before KEY_TABLE.
_V4_TO_V5 = (
    (re.compile(r"^detr\.model\.backbone\.conv_encoder\.model\."), "detr.model.backbone.model."),
    (re.compile(r"\.(self_attn|encoder_attn)\.out_proj\."), r".\1.o_proj."),
    (re.compile(r"\.layers\.(\d+)\.fc([12])\."), r".layers.\1.mlp.fc\2."),
    (re.compile(r"^bbox_attention\.(q|k)_linear\."), r"bbox_attention.\1_proj."),
)

_BACKBONE_OFFICIAL = "detr.backbone.0.body."
_BACKBONE_HF = "detr.model.backbone.model."


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_OFFICIAL_TO_HF = [(_template_regex(o), h) for o, h in KEY_TABLE]
_HF_TO_OFFICIAL = [(_template_regex(h), o) for o, h in KEY_TABLE]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            head = template.replace("{i}", match.groupdict().get("i") or "")
            return head + key[match.end() :]
    return None


def _hf_resnet_to_torchvision(name: str) -> str:
    """Backbone names of HF's own ResNet (``use_timm_backbone=False``) -> torchvision's."""
    rules: tuple[tuple[str, Callable[[re.Match[str]], str]], ...] = (
        (r"^embedder\.embedder\.convolution\.", lambda m: "conv1."),
        (r"^embedder\.embedder\.normalization\.", lambda m: "bn1."),
        (
            r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.",
        ),
        (
            r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.",
        ),
        (
            r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.",
        ),
        (
            r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.",
        ),
    )
    for pattern, replace in rules:
        match = re.match(pattern, name)
        if match:
            return replace(match) + name[match.end() :]
    return name  # timm names are torchvision's names


def _torchvision_to_hf_resnet(name: str) -> str:
    rules: tuple[tuple[str, Callable[[re.Match[str]], str]], ...] = (
        (r"^conv1\.", lambda m: "embedder.embedder.convolution."),
        (r"^bn1\.", lambda m: "embedder.embedder.normalization."),
        (
            r"^layer(\d)\.(\d+)\.downsample\.0\.",
            lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.",
        ),
        (
            r"^layer(\d)\.(\d+)\.downsample\.1\.",
            lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.",
        ),
        (
            r"^layer(\d)\.(\d+)\.conv(\d)\.",
            lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.",
        ),
        (
            r"^layer(\d)\.(\d+)\.bn(\d)\.",
            lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.",
        ),
    )
    for pattern, replace in rules:
        match = re.match(pattern, name)
        if match:
            return replace(match) + name[match.end() :]
    raise KeyError(f"no Hugging Face ResNet name for backbone key {name!r}")


def is_hf_layout(keys: object) -> bool:
    return any(str(k).startswith("detr.model.") for k in keys)  # type: ignore[attr-defined]


def to_official_layout(tensors: Mapping[str, object]) -> StateDict:
    """Translate a Hugging Face layout to upstream names (official layouts pass through unchanged)."""
    state = {str(k): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if not is_hf_layout(state):
        return state
    v5: StateDict = {}
    for key, value in state.items():
        for pattern, repl in _V4_TO_V5:
            key = pattern.sub(repl, key)
        v5[key] = value
    official: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in v5.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(_BACKBONE_HF):
            official[_BACKBONE_OFFICIAL + _hf_resnet_to_torchvision(key[len(_BACKBONE_HF) :])] = value
            continue
        attn = re.match(
            r"^detr\.model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)$",
            key,
        )
        if attn:
            stack, layer, kind, part, param = attn.groups()
            module = "self_attn" if kind == "self_attn" else "multihead_attn"
            qkv.setdefault(f"detr.transformer.{stack}.layers.{layer}.{module}.in_proj_{param}", {})[part] = value
            continue
        renamed = _rename(key, _HF_TO_OFFICIAL)
        official[renamed if renamed is not None else key] = value  # unknown keys surface as "unexpected"
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"attention {name} lacks its {sorted({'q', 'k', 'v'} - set(parts))} projection")
        official[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # stacked [q; k; v]
    return official


def to_hf_layout(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Upstream names -> transformers v5 `DetrForSegmentation` names (HF ResNet backbone)."""
    hf: StateDict = {}
    for key, value in state.items():
        if key.startswith(_BACKBONE_OFFICIAL):
            hf[_BACKBONE_HF + _torchvision_to_hf_resnet(key[len(_BACKBONE_OFFICIAL) :])] = value
            continue
        attn = re.match(
            r"^detr\.transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|multihead_attn)\.in_proj_(weight|bias)$",
            key,
        )
        if attn:
            stack, layer, module, param = attn.groups()
            kind = "self_attn" if module == "self_attn" else "encoder_attn"
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                hf[f"detr.model.{stack}.layers.{layer}.{kind}.{part}_proj.{param}"] = chunk
            continue
        renamed = _rename(key, _OFFICIAL_TO_HF)
        if renamed is None:
            raise KeyError(f"no Hugging Face name for {key!r}")
        hf[renamed] = value
    return hf


# --------------------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------------------


def load_state_dict_strict(model: DetrPanoptic, state: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with one readable error naming every mismatch."""
    problems = _mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError("\n  ".join(["checkpoint does not fit the model:", *problems]))
    model.load_state_dict(state, strict=True)


def _mismatches(expected: Mapping[str, torch.Tensor], state: Mapping[str, object]) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` is: missing, unexpected, mis-shaped keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(getattr(state[k], 'shape', ()))} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", … ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {title}: {shown}")
    return problems


def check_state_dict(config: DetrConfig, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise `CheckpointError` (one line, naming ``what``) unless ``state`` loads strictly into a model of
    ``config``; the model is built on the meta device, so this costs no memory for its weights."""
    with torch.device("meta"):
        expected = DetrPanoptic(config).state_dict()
    problems = _mismatches(expected, state)
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))


def build_model(config: DetrConfig, state: Mapping[str, torch.Tensor]) -> DetrPanoptic:
    """A `DetrPanoptic` in eval mode with ``state`` loaded strictly."""
    model = DetrPanoptic(config).eval()
    load_state_dict_strict(model, state)
    return model
