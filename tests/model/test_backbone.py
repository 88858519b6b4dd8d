"""`model.backbone.ResNetBody` is torchvision's ResNet trunk, written without importing torchvision: the same
parameter names in the same order, the same seeded initial weights (the RNG left where torchvision leaves it, so
`model.synthetic_weights` gives the same tensors), and bit-identical features with frozen batch norm, for R50,
R50-DC5 and R101. torchvision (a dependency for ``--device-preprocess``) is the peer implementation."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from model.backbone import RESNET_DEPTHS, FrozenBatchNorm2d, ResNetBody


def _torchvision_trunk(name: str, *, dilate_res5: bool) -> torch.nn.Module:
    norm = partial(TorchvisionFrozenBatchNorm2d, eps=1e-5)
    return getattr(torchvision.models, name)(
        weights=None, replace_stride_with_dilation=[False, False, dilate_res5], norm_layer=norm
    )


@pytest.mark.parametrize(("name", "dilate_res5"), [("resnet50", False), ("resnet50", True), ("resnet101", False)])
def test_seeded_weights_and_features_are_torchvisions(name: str, dilate_res5: bool) -> None:
    torch.manual_seed(0)
    peer = _torchvision_trunk(name, dilate_res5=dilate_res5)
    peer_next = torch.rand(4)
    torch.manual_seed(0)
    body = ResNetBody(RESNET_DEPTHS[name], dilate_res5=dilate_res5, bn_eps=1e-5)
    body_next = torch.rand(4)

    expected = {k: v for k, v in peer.state_dict().items() if not k.startswith("fc.")}  # the dropped classifier
    state = body.state_dict()
    assert list(state) == list(expected)
    assert [k for k in state if not torch.equal(state[k], expected[k])] == []
    assert torch.equal(body_next, peer_next)
    if name == "resnet101":
        return  # its features are R50's blocks, more of them

    generator = torch.Generator().manual_seed(1)
    for module in peer.modules():  # non-trivial statistics, then the same buffers in both
        if isinstance(module, TorchvisionFrozenBatchNorm2d):
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.weight.uniform_(0.8, 1.2, generator=generator)
    body.load_state_dict({**expected, **{k: v for k, v in peer.state_dict().items() if k in state}}, strict=True)
    images = torch.randn(2, 3, 96, 128, generator=generator)
    with torch.no_grad():
        x = peer.maxpool(peer.relu(peer.bn1(peer.conv1(images))))
        res2 = peer.layer1(x)
        res3 = peer.layer2(res2)
        res4 = peer.layer3(res3)
        res5 = peer.layer4(res4)
        assert all(torch.equal(a, b) for a, b in zip(body(images), (res2, res3, res4, res5)))
    assert res5.shape[-2:] == ((6, 8) if dilate_res5 else (3, 4))


def test_a_checkpoints_num_batches_tracked_is_dropped_on_load() -> None:
    bn = FrozenBatchNorm2d(3)
    state = {"weight": torch.full((3,), 2.0), "bias": torch.ones(3), "running_mean": torch.zeros(3),
             "running_var": torch.ones(3), "num_batches_tracked": torch.tensor(7)}  # fmt: skip
    bn.load_state_dict(state, strict=True)
    expected = torch.full((3,), 2.0 / (1 + 1e-5) ** 0.5 + 1.0)  # w / sqrt(var + eps) · x + b, x = 1
    assert torch.allclose(bn(torch.ones(1, 3, 1, 1)).flatten(), expected, rtol=1e-6, atol=0)
