"""Loading DETR panoptic weights: official release files and Hugging Face layouts, from any URI, strictly.

`read_state_dict` composes the three steps, each a module of its own: where the bytes come from
(`model.checkpoint_source`: local paths, fsspec URIs and ``https://`` through a local cache, the sha256 in an
official file's name), the file's format (`model.checkpoint_format`: ``torch.save`` with ``weights_only``,
safetensors) and its key layout (`model.checkpoint_keys`: the official ``{'model': state_dict}`` with upstream
names, or Hugging Face's `DetrForSegmentation`, translated by one explicit key table). `build_model` loads
strictly: a mismatch names the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from model.checkpoint_format import ACCEPTED_FORMATS, read_tensors
from model.checkpoint_keys import StateDict, to_hf_layout, to_official_layout
from model.checkpoint_source import CheckpointError, CheckpointNotFound, cache_dir, check_sha256_prefix, fetch
from model.config import DetrConfig
from model.detr import DetrPanoptic

__all__ = [
    "ACCEPTED_FORMATS",
    "CheckpointError",
    "CheckpointNotFound",
    "StateDict",
    "build_model",
    "cache_dir",
    "check_state_dict",
    "fetch",
    "load_state_dict_strict",
    "read_state_dict",
    "to_hf_layout",
    "to_official_layout",
]


def read_state_dict(uri: str) -> StateDict:
    """The tensors of the file at ``uri``, in the official key layout."""
    path = fetch(uri)
    check_sha256_prefix(path, Path(uri.split("?")[0]).name)
    return to_official_layout(read_tensors(path))


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
