"""What a tensor is, from its name: which decoder layer, which component, which expert.

One place for the naming rules of the architectures darwin-hydra merges (Llama/Qwen dense, Qwen3.5
GDN hybrids, Qwen-MoE with shared experts, Mixtral, Gemma 4 with its multimodal wrapper), so that
the MRI, the genome and the merge engine agree on what "layer 7 attention" means.

Names are the on-disk (canonical) names: per-expert keys like
``model.layers.3.mlp.experts.5.gate_proj.weight``, not the fused 3-D tensors transformers 5 keeps in
memory (see ``darwin_hydra.io.layout`` for the mapping).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

# Components a genome can address. "expert" is a routed expert's FFN, "shared_expert" the always-on one.
EMBED, ATTN, FFN, NORM, HEAD, ROUTER, EXPERT, SHARED_EXPERT, OTHER = (
    "embed",
    "attn",
    "ffn",
    "norm",
    "head",
    "router",
    "expert",
    "shared_expert",
    "other",
)
COMPONENTS = (EMBED, ATTN, FFN, NORM, HEAD, ROUTER, EXPERT, SHARED_EXPERT, OTHER)

# Text-decoder layers: "...layers.<i>." under the language model, never the vision/audio towers.
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NON_TEXT = re.compile(r"(vision|visual|audio|image|multi_modal_projector|embed_vision|embed_audio|mtp)")
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor sits in the model: decoder layer (None outside layers), component, expert index."""

    name: str
    layer: int | None
    component: str
    expert: int | None = None


def tensor_info(name: str) -> TensorInfo:
    """Classify one canonical tensor name.

    Rules (first match wins): non-text towers -> other; embeddings -> embed; lm_head -> head;
    inside a decoder layer: router gate (``mlp.gate.`` / ``block_sparse_moe.gate.``) -> router,
    ``shared_expert_gate`` -> router, ``shared_expert(s)`` -> shared_expert, ``experts.<e>.`` -> expert,
    attention (``self_attn``, ``linear_attn``, ``attention``) -> attn, ``mlp``/``feed_forward`` -> ffn,
    any norm -> norm, the rest of the layer (Gemma's per-layer inputs, layer scalars) -> ffn;
    outside layers: norms -> norm, the rest -> other.
    """
    if _NON_TEXT.search(name):
        return TensorInfo(name, None, OTHER)
    m = _LAYER_RE.search(name)
    if m is None:
        if "embed" in name or "wte" in name:
            return TensorInfo(name, None, EMBED)
        if name.startswith("lm_head") or name.endswith("output.weight"):
            return TensorInfo(name, None, HEAD)
        if "norm" in name:
            return TensorInfo(name, None, NORM)
        return TensorInfo(name, None, OTHER)
    layer = int(m.group(1))
    tail = name[m.end():]
    if re.search(r"(^|\.)(mlp|block_sparse_moe)\.gate\.", tail) or "shared_expert_gate" in tail or "router" in tail:
        return TensorInfo(name, layer, ROUTER)
    if "shared_expert" in tail:
        return TensorInfo(name, layer, SHARED_EXPERT)
    e = _EXPERT_RE.search("." + tail)
    if e is not None or ".experts." in "." + tail:
        return TensorInfo(name, layer, EXPERT, int(e.group(1)) if e else None)
    if "norm" in tail and "proj" not in tail.split("norm")[0][-6:]:
        # q_norm/k_norm live inside attention; keep them with it.
        if re.search(r"(self_attn|linear_attn|attention)\.", tail):
            return TensorInfo(name, layer, ATTN)
        return TensorInfo(name, layer, NORM)
    if re.search(r"(self_attn|linear_attn|attention|attn)\.", tail):
        return TensorInfo(name, layer, ATTN)
    return TensorInfo(name, layer, FFN)


def outside_decoder(name: str) -> bool:
    """True for tensors outside the text decoder: vision/audio towers, their projectors into the text
    model, multi-token-prediction heads (``mtp.*``). ``parents.outside_decoder`` decides where the
    child takes them from."""
    return bool(_NON_TEXT.search(name))


def text_config(config: Any) -> Any:
    """The text decoder's config of a (possibly multimodal) config object or dict."""
    if isinstance(config, dict):
        return config.get("text_config") or config
    return getattr(config, "text_config", None) or config


def num_layers(config: Any) -> int:
    """Number of text-decoder layers (``num_hidden_layers`` of the text config)."""
    tc = text_config(config)
    n = tc["num_hidden_layers"] if isinstance(tc, dict) else tc.num_hidden_layers
    return int(n)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layer list of a causal LM or a multimodal wrapper.

    Finds the longest ``nn.ModuleList`` named ``layers`` that is not inside a vision/audio tower,
    e.g. ``model.layers`` (Llama, Qwen) or ``model.language_model.layers`` (Gemma 4).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not name.endswith("layers"):
            continue
        if _NON_TEXT.search(name):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no text decoder layer list (a ModuleList named 'layers') found")
    return best[1]


def is_moe(config: Any) -> bool:
    """True when the text config declares routed experts."""
    tc = text_config(config)
    get = tc.get if isinstance(tc, dict) else (lambda k, d=None: getattr(tc, k, d))
    n = get("num_experts") or get("num_local_experts") or 0
    return int(n or 0) > 1
