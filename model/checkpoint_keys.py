"""The key table: official (upstream) state-dict names <-> Hugging Face `DetrForSegmentation` names.

One explicit table (`KEY_TABLE`) serves both directions, for transformers v5 names and, after `_V4_TO_V5`, the
v4 files on the Hugging Face hub; the backbone's names go through one table too (`RESNET_NAMES`: Hugging
Face's own ResNet vs torchvision's; timm's names are torchvision's). Attention projections are stacked
(``in_proj_*``: [q; k; v]) upstream and separate in Hugging Face's layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from model.checkpoint_source import CheckpointError

StateDict = dict[str, torch.Tensor]

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


# (Hugging Face ResNet, torchvision) backbone name templates. ``{stage}`` and ``{conv}`` count from 0 on the Hugging
# Face side and from 1 on torchvision's (``{stage+1}``, ``{conv+1}``); ``{block}`` is the same on both.
RESNET_NAMES: tuple[tuple[str, str], ...] = (
    ("embedder.embedder.convolution.", "conv1."),
    ("embedder.embedder.normalization.", "bn1."),
    ("encoder.stages.{stage}.layers.{block}.shortcut.convolution.", "layer{stage+1}.{block}.downsample.0."),
    ("encoder.stages.{stage}.layers.{block}.shortcut.normalization.", "layer{stage+1}.{block}.downsample.1."),
    ("encoder.stages.{stage}.layers.{block}.layer.{conv}.convolution.", "layer{stage+1}.{block}.conv{conv+1}."),
    ("encoder.stages.{stage}.layers.{block}.layer.{conv}.normalization.", "layer{stage+1}.{block}.bn{conv+1}."),
)
_FIELD = re.compile(r"\{(\w+)(\+1)?\}")


_ResnetRule = tuple[re.Pattern[str], str, frozenset[str]]


def _resnet_rule(source: str, target: str) -> _ResnetRule:
    """(``source`` as a pattern with a group per field, ``target``, the fields ``source`` counts from 1)."""
    parts, pos, one_based = [], 0, set()
    for field in _FIELD.finditer(source):
        parts += [re.escape(source[pos : field.start()]), f"(?P<{field[1]}>\\d+)"]
        if field[2]:
            one_based.add(field[1])
        pos = field.end()
    parts.append(re.escape(source[pos:]))
    return re.compile("^" + "".join(parts)), target, frozenset(one_based)


def _resnet_translate(name: str, rules: list[_ResnetRule]) -> str | None:
    """``name`` through the first rule whose source matches it (None when none does)."""
    for pattern, target, one_based in rules:
        match = pattern.match(name)
        if match is None:
            continue
        zero_based = {k: int(v) - (k in one_based) for k, v in match.groupdict().items()}
        filled = _FIELD.sub(lambda f, n=zero_based: str(n[f[1]] + bool(f[2])), target)
        return filled + name[match.end() :]
    return None


_HF_TO_TORCHVISION = [_resnet_rule(hf, tv) for hf, tv in RESNET_NAMES]
_TORCHVISION_TO_HF = [_resnet_rule(tv, hf) for hf, tv in RESNET_NAMES]


def _hf_resnet_to_torchvision(name: str) -> str:
    """Backbone names of HF's own ResNet (``use_timm_backbone=False``) -> torchvision's."""
    translated = _resnet_translate(name, _HF_TO_TORCHVISION)
    return name if translated is None else translated  # timm names are torchvision's names


def _torchvision_to_hf_resnet(name: str) -> str:
    translated = _resnet_translate(name, _TORCHVISION_TO_HF)
    if translated is None:
        raise KeyError(f"no Hugging Face ResNet name for backbone key {name!r}")
    return translated


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
