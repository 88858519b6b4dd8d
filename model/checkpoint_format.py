"""Checkpoint file formats: ``torch.save`` files read with ``weights_only=True``, and safetensors files.

A ``torch.save`` file is never unpickled beyond tensors (upstream training checkpoints also pickle an
``argparse.Namespace``, which is allow-listed); the official ``{'model': state_dict}`` and a ``state_dict``
wrapper are unwrapped. Anything else is a `CheckpointError` that names the accepted formats.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Mapping
from pathlib import Path

import torch

from model.checkpoint_source import CheckpointError

_SAFETENSORS_PREFIX_LEN = 8
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since torch 1.6
_PICKLE_PROTOCOL_2_PLUS = b"\x80"  # torch.save(_use_new_zipfile_serialization=False): a pickle

ACCEPTED_FORMATS = (
    "torch.save state dicts read with weights_only (official DETR release files, upstream training checkpoints, "
    "Hugging Face pytorch_model.bin) and safetensors files"
)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SAFETENSORS_PREFIX_LEN + 1)
    if len(head) < _SAFETENSORS_PREFIX_LEN + 1:
        return False
    header_len = int.from_bytes(head[:_SAFETENSORS_PREFIX_LEN], "little")
    return 0 < header_len < path.stat().st_size and head[_SAFETENSORS_PREFIX_LEN:] == b"{"


def read_tensors(path: Path) -> Mapping[str, object]:
    """The tensors (by name) of the checkpoint file at ``path``, in whatever key layout it has."""
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
