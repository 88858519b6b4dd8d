"""Checkpoint loading: official layout strict, readable mismatches, no unpickling, every source kind."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, build_model, fetch, read_state_dict
from model.config import VARIANTS, get_variant

R50 = VARIANTS["detr-r50-panoptic"].config


def test_official_layout_loads_strictly(tmp_path: Path, r50_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "detr-r50-panoptic.pth"
    torch.save({"model": r50_state}, path)
    state = read_state_dict(str(path))
    assert len(state) == 490
    assert sum(v.numel() for v in state.values()) == pytest.approx(43.0e6, rel=0.01)
    model = build_model(R50, state)
    assert torch.equal(model.state_dict()["detr.class_embed.weight"], r50_state["detr.class_embed.weight"])


def test_training_checkpoint_with_argparse_namespace_loads(tmp_path: Path, r50_state) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": r50_state, "args": argparse.Namespace(lr=1e-4, backbone="resnet50"), "epoch": 3}, path)
    assert set(read_state_dict(str(path))) == set(r50_state)


def test_mismatch_names_missing_unexpected_and_misshaped_keys(r50_state) -> None:
    broken = dict(r50_state)
    del broken["detr.query_embed.weight"]
    broken["detr.extra.weight"] = torch.zeros(1)
    broken["detr.class_embed.bias"] = torch.zeros(92)
    with pytest.raises(CheckpointError) as info:
        build_model(R50, broken)
    message = str(info.value)
    assert "1 missing: detr.query_embed.weight" in message
    assert "1 unexpected: detr.extra.weight" in message
    assert "detr.class_embed.bias: checkpoint (92,) vs model (251,)" in message


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/panoptic-flow-pwned",))


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_pickle_payload_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force_unsafe_env: bool) -> None:
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "evil.pth"
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload()}, buffer, pickle_module=pickle)
    path.write_bytes(buffer.getvalue())
    marker = Path("/tmp/panoptic-flow-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(str(path))
    assert not marker.exists()


def test_safetensors_file_loads(tmp_path: Path, r50_state) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in r50_state.items()}, str(path))
    state = read_state_dict(str(path))
    assert set(state) == set(r50_state)
    assert all(torch.equal(state[k], r50_state[k]) for k in r50_state)


def test_sha256_prefix_in_file_name_is_checked(tmp_path: Path) -> None:
    data = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}}, data)
    digest = hashlib.sha256(data.getvalue()).hexdigest()
    good = tmp_path / f"weights-{digest[:8]}.pth"
    good.write_bytes(data.getvalue())
    assert set(read_state_dict(str(good))) == {"w"}
    bad = tmp_path / "weights-00000000.pth"
    bad.write_bytes(data.getvalue())
    with pytest.raises(CheckpointError, match="sha256"):
        read_state_dict(str(bad))


def test_missing_local_file_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="not found"):
        fetch("/nonexistent/weights.pth")


def test_fsspec_uri_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setenv("PANOPTIC_FLOW_CACHE", str(tmp_path / "cache"))
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.arange(3.0)}}, buffer)
    with fsspec.open("memory://bucket/w.pth", "wb") as f:
        f.write(buffer.getvalue())
    first = fetch("memory://bucket/w.pth")
    assert first.is_file() and str(first).startswith(str(tmp_path / "cache"))
    fsspec.filesystem("memory").rm("/bucket/w.pth")
    assert fetch("memory://bucket/w.pth") == first  # served from the cache
    assert torch.equal(read_state_dict("memory://bucket/w.pth")["w"], torch.arange(3.0))


def test_http_download_with_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The https:// code path (fsspec HTTP) against a loopback server."""
    monkeypatch.setenv("PANOPTIC_FLOW_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.full((2,), 7.0)}}, buffer)
    (served / "w.pth").write_bytes(buffer.getvalue())
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args) -> None:
            hits.append(args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/w.pth"
        assert torch.equal(read_state_dict(uri)["w"], torch.full((2,), 7.0))
        count = len(hits)
        read_state_dict(uri)
        assert len(hits) == count  # second read from the cache
    finally:
        server.shutdown()
        server.server_close()


def test_variants_and_official_urls() -> None:
    assert get_variant("detr-r50-dc5-panoptic").config.dilation
    assert get_variant("detr-r101-panoptic").config.backbone == "resnet101"
    assert get_variant("detr-r50-panoptic").url.endswith("detr-r50-panoptic-00ce5173.pth")
    with pytest.raises(ValueError, match="known variants"):
        get_variant("detr-r18")


def test_one_backbone_name_table_serves_both_directions() -> None:
    """`model.checkpoint_keys.RESNET_NAMES`: hand-written pairs, and every torchvision backbone key of the model
    through Hugging Face's names and back."""
    from model.checkpoint_keys import _hf_resnet_to_torchvision, _torchvision_to_hf_resnet

    pairs = {
        "conv1.weight": "embedder.embedder.convolution.weight",
        "bn1.running_mean": "embedder.embedder.normalization.running_mean",
        "layer1.0.downsample.0.weight": "encoder.stages.0.layers.0.shortcut.convolution.weight",
        "layer4.2.downsample.1.bias": "encoder.stages.3.layers.2.shortcut.normalization.bias",
        "layer2.3.conv1.weight": "encoder.stages.1.layers.3.layer.0.convolution.weight",
        "layer3.22.bn3.weight": "encoder.stages.2.layers.22.layer.2.normalization.weight",
    }
    for torchvision, hf in pairs.items():
        assert _torchvision_to_hf_resnet(torchvision) == hf
        assert _hf_resnet_to_torchvision(hf) == torchvision
    with torch.device("meta"):
        from model.config import get_variant
        from model.detr import DetrPanoptic

        keys = DetrPanoptic(get_variant("detr-r101-panoptic").config).state_dict()
    prefix = "detr.backbone.0.body."
    backbone = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    assert len(backbone) > 300
    assert [_hf_resnet_to_torchvision(_torchvision_to_hf_resnet(k)) for k in backbone] == backbone
    assert _hf_resnet_to_torchvision("layer1.0.conv1.weight") == "layer1.0.conv1.weight"  # timm names pass
