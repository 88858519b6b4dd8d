"""Deterministic stand-in weights for tests, benchmarks and offline demos (NOT a trained model).

Plain random initialisation makes DETR useless as a test subject: with identity frozen batch norm the
ResNet activations explode, and an untrained class head never passes the 0.85 threshold, so no query
would reach the mask head. These weights are seeded, then conditioned:

- every frozen batch norm gets the mean/variance of its input on a fixed synthetic image (a data-dependent
  initialisation), so activations stay near unit scale through the backbone;
- the decoder's and the box attention's query/key projections are sharpened, so that queries attend to
  different places and differ from each other (otherwise all 100 queries collapse onto one answer and
  any rounding decides between them);
- the attention half of the mask head's first conv is scaled up so that each query's attention map, not
  the image features shared by all queries, decides its mask (softmax maps are ~1/(M·h·w) small);
- the class head is centred on the calibration image's mean box embedding and scaled so that a share of
  queries is confidently one class (stuff and things), the rest no-object.

The result is well conditioned (float64 and float32 give the same panoptic map almost everywhere), which
is the noise floor that the precision and oracle tests rest on. Its segments are meaningless.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from model.backbone import FrozenBatchNorm2d
from model.config import DetrConfig
from model.detr import DetrPanoptic
from model.tensor_preprocess import normalize

SYNTHETIC_CLASS_LOGIT_STD = 2.0
SYNTHETIC_NO_OBJECT_LOGIT = 12.0


def calibration_image(height: int = 160, width: int = 224) -> torch.Tensor:
    """A fixed, smooth synthetic photo-like image -> uint8 [3, height, width]."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    channels = [
        0.5 + 0.4 * torch.sin(6.0 * x + 3.0 * y) * torch.cos(4.0 * y),
        0.5 + 0.4 * torch.cos(9.0 * x * y + 1.0),
        0.5 + 0.4 * torch.sin(5.0 * (x - 0.3) ** 2 * 8 + 7.0 * y),
    ]
    return (torch.stack(channels) * 255).round().clamp(0, 255).to(torch.uint8)  # [3, H, W]


def synthetic_state_dict(
    config: DetrConfig,
    *,
    seed: int = 0,
    attention_sharpness: float = 4.0,
    class_logit_std: float = SYNTHETIC_CLASS_LOGIT_STD,
    no_object_logit: float = SYNTHETIC_NO_OBJECT_LOGIT,
    mask_query_share: float = 4.0,
) -> dict[str, torch.Tensor]:
    """Seeded, conditioned weights in the official key layout (see the module docstring).

    Computing them takes tens of seconds on a CPU (float64 calibration passes), so the result is kept in the
    weights cache (`model.checkpoint.cache_dir`) under a key of everything it depends on: this module's source,
    the arguments, the config and the torch version. Every model actor of a job would otherwise pay it."""
    from safetensors.torch import load_file, save_file

    from model.checkpoint import cache_dir

    arguments = (seed, attention_sharpness, class_logit_std, no_object_logit, mask_query_share)
    key = hashlib.sha256(
        "\n".join([Path(__file__).read_text(), repr(arguments), repr(config), torch.__version__]).encode()
    ).hexdigest()[:20]
    path = cache_dir() / "synthetic" / f"{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    state = _compute(config, seed=seed, attention_sharpness=attention_sharpness, class_logit_std=class_logit_std,
                     no_object_logit=no_object_logit, mask_query_share=mask_query_share)  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
        os.replace(partial, path)  # atomic: concurrent actors never read half a file
    except OSError:  # a read-only cache: compute every time
        pass
    return state


@torch.no_grad()
def _compute(
    config: DetrConfig,
    *,
    seed: int,
    attention_sharpness: float,
    class_logit_std: float,
    no_object_logit: float,
    mask_query_share: float,
) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DetrPanoptic(config).eval().double()  # calibrated in float64: same weights on any thread count
    d = config.hidden_dim
    for layer in model.detr.transformer.decoder.layers:
        for attention in (layer.self_attn, layer.multihead_attn):
            attention.in_proj_weight[: 2 * d] *= attention_sharpness  # q and k rows of [q; k; v]
    model.bbox_attention.q_linear.weight *= attention_sharpness
    _calibrate_frozen_batch_norm(model)
    _calibrate_class_head(model, class_logit_std=class_logit_std, no_object_logit=no_object_logit)
    _calibrate_mask_head(model, query_share=mask_query_share)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _calibrate_class_head(model: DetrPanoptic, *, class_logit_std: float, no_object_logit: float) -> None:
    """Class head reading what distinguishes queries within an image, not what distinguishes images.

    Box embeddings of a few varied calibration images are centred; the directions along which whole
    images move (their mean embeddings) are projected out of the object rows, so an image's overall look
    cannot push every query to one class; then the object logits get the requested spread.
    """
    embeddings = torch.stack([model.detr(image, mask).box_embeddings[0] for image, mask in _calibration_set()])
    centre = embeddings.mean((0, 1))  # [D]
    image_shifts = embeddings.mean(1) - centre  # [I, D]
    basis = torch.linalg.svd(image_shifts, full_matrices=False).Vh  # [I, D] orthonormal rows
    head = model.detr.class_embed
    objects = head.weight[:-1]  # [K-1, D]
    objects = objects - (objects @ basis.T) @ basis  # remove the image-shift directions
    within = embeddings - embeddings.mean(1, keepdim=True)  # [I, Q, D] query deviations per image
    spread = (within.reshape(-1, within.shape[-1]) @ objects.T).std()
    head.weight[:-1] = objects * (class_logit_std / spread)
    head.bias[:-1] = -head.weight[:-1] @ centre
    head.weight[-1] = 0.0
    head.bias[-1] = no_object_logit


def _calibrate_mask_head(model: DetrPanoptic, *, query_share: float) -> None:
    """Scale lay1's attention input channels so the per-query part has ``query_share``× the image part's std."""
    image, mask = _calibration_batch()
    out = model.detr(image, mask)
    q = out.box_embeddings.shape[1]
    index = torch.zeros(q, dtype=torch.long)
    attention = model.bbox_attention(out.box_embeddings[0], out.memory, out.features.res5_mask, index)
    lay1, d = model.mask_head.lay1, model.mask_head.context_dim
    image_part = F.conv2d(out.src_proj, lay1.weight[:, :d], None, padding=1)  # [1, D+M, h, w]
    query_part = F.conv2d(attention, lay1.weight[:, d:], None, padding=1)  # [Q, D+M, h, w]
    query_part = query_part - query_part.mean(0)  # what differs between queries
    lay1.weight[:, d:] *= query_share * image_part.std() / query_part.std()


def _calibration_batch(image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = normalize(calibration_image() if image is None else image)[None].double()  # [1, 3, H, W]
    return pixels, torch.zeros(1, *pixels.shape[-2:], dtype=torch.bool)  # [1, H, W]


def _calibration_set() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few deterministic, varied images (sizes, flips, noise, brightness) as (pixels, mask) pairs."""
    generator = torch.Generator().manual_seed(1234)
    images = []
    for i, (h, w) in enumerate([(160, 224), (224, 160), (192, 192), (128, 256), (256, 192), (176, 208)]):
        base = calibration_image(h, w).int()
        if i % 2:
            base = base.flip(2)
        if i % 3 == 1:
            base = base.flip(1)
        noise = torch.randint(-30, 31, base.shape, generator=generator)
        gain = 0.6 + 0.15 * i
        images.append((base * gain + noise).clamp(0, 255).to(torch.uint8))
    return [_calibration_batch(image) for image in images]


def _calibrate_frozen_batch_norm(model: DetrPanoptic) -> None:
    """Set each FrozenBatchNorm2d's statistics to those of its input on the calibration image."""

    def set_stats(module: FrozenBatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        model.detr.backbone[0](*_calibration_batch())
    finally:
        for hook in hooks:
            hook.remove()
    assert all(math.isfinite(float(p.abs().max())) for p in model.state_dict().values())
