"""Model-tier fixtures: deterministic synthetic weights, built once per session."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import build_model
from model.config import VARIANTS
from model.detr import DetrPanoptic
from model.synthetic_weights import synthetic_state_dict


@pytest.fixture(scope="session")
def r50_state() -> dict[str, torch.Tensor]:
    return synthetic_state_dict(VARIANTS["detr-r50-panoptic"].config, seed=0)


@pytest.fixture(scope="session")
def r50_model(r50_state: dict[str, torch.Tensor]) -> DetrPanoptic:
    return build_model(VARIANTS["detr-r50-panoptic"].config, r50_state)
