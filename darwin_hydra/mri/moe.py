"""MoE scan: how each layer's router spreads a calibration set over its experts.

Hooks on every router (``mlp.gate`` of Qwen-MoE / Qwen3.5-MoE, ``block_sparse_moe.gate`` of Mixtral,
``router`` of Gemma 4's MoE block) record its output for the calibration prompts; padding tokens are
dropped. With p_t the routing probabilities of token t (softmax of the router logits) and
S_t = top-k(p_t) the experts it is sent to, over N valid tokens, per layer and expert e::

    frequency f_e      = |{t : e in S_t}| / N                 (sums to k over experts)
    routing entropy H  = -sum_e q_e log2 q_e,  q_e = f_e / k   (bits; log2 E = perfectly balanced)
    token entropy      = mean_t -sum_e p_t,e log2 p_t,e        (bits; how sure the router is per token)
    similarity(e, e')  = Pearson correlation over tokens of p_.,e and p_.,e' (experts the router treats
                         alike; near 1 = interchangeable, near -1 = competitors)
    dead (relative)    : f_e < threshold * k / E   (k/E is the uniform share; default threshold 0.1)
    dead (absolute)    : f_e < abs_threshold       (Darwin's card: 0.05)
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from darwin_hydra.arch import decoder_layers, text_config
from darwin_hydra.mri.probes import tokenize_batch, text_decoder

log = logging.getLogger(__name__)

_ROUTER_NAME = re.compile(r"(^|\.)(gate|router)$")


@dataclass
class MoeScan:
    """Per MoE layer (``layers`` gives the decoder-layer index of row i) and expert."""

    layers: list[int]
    num_experts: int
    top_k: int
    tokens: int
    frequency: list[list[float]]
    routing_entropy: list[float]
    token_entropy: list[float]
    # per expert: its highest similarity to another expert; per layer: the mean over expert pairs
    similarity_max: list[list[float]]
    similarity_mean: list[float]
    dead_relative: list[list[bool]]
    dead_absolute: list[list[bool]]
    dead_rule: str = "relative"
    dead_threshold: float = 0.1
    dead_abs_threshold: float = 0.05
    seconds: float = 0.0

    @property
    def uniform_share(self) -> float:
        """k / E: every expert's frequency under perfectly balanced routing."""
        return self.top_k / self.num_experts

    @property
    def dead(self) -> list[list[bool]]:
        """Dead experts under the configured rule."""
        return self.dead_relative if self.dead_rule == "relative" else self.dead_absolute

    def dead_experts(self) -> dict[int, list[int]]:
        """Decoder layer -> indices of its dead experts (configured rule)."""
        return {l: [e for e, d in enumerate(row) if d] for l, row in zip(self.layers, self.dead)}

    def per_layer(self) -> dict[int, dict[str, float]]:
        """Decoder layer -> dead share, routing entropy (bits, and normalised by log2 E), token entropy,
        mean expert similarity: the numbers a prescription can use per layer."""
        out = {}
        for i, l in enumerate(self.layers):
            dead = self.dead[i]
            out[l] = {
                "dead_share": sum(dead) / self.num_experts,
                "routing_entropy": self.routing_entropy[i],
                "routing_entropy_norm": self.routing_entropy[i] / math.log2(self.num_experts),
                "token_entropy": self.token_entropy[i],
                "similarity_mean": self.similarity_mean[i],
            }
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "MoeScan":
        return cls(**dict(d))


def _config_top_k(model: nn.Module) -> int | None:
    tc = text_config(model.config)
    for key in ("num_experts_per_tok", "top_k_experts", "moe_topk", "num_selected_experts"):
        v = getattr(tc, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> its router module (a submodule named ``gate`` or ``router`` that is not a
    one-output gate such as Qwen's ``shared_expert_gate``). Layers without one (dense layers of a
    partly-sparse model) are left out."""
    routers = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if not name or not _ROUTER_NAME.search(name):
                continue
            if isinstance(mod, nn.Linear) and mod.out_features < 2:
                continue
            routers[i] = mod
            break
    return routers


def _probabilities(out: Any, num_tokens: int) -> torch.Tensor:
    """Routing probabilities (N, E) from a router's output: its logits (softmaxed here), or the
    probabilities some routers return in their place (Gemma 4)."""
    x = out[0] if isinstance(out, (tuple, list)) else out
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] != num_tokens:
        raise RuntimeError(f"router output has {x.shape[0]} rows for {num_tokens} tokens; cannot align with padding")
    looks_like_probs = bool((x >= 0).all()) and torch.allclose(x.sum(-1), torch.ones(x.shape[0]), atol=1e-3)
    return x if looks_like_probs else torch.softmax(x, dim=-1)


@torch.no_grad()
def moe_scan(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str] | Mapping[str, Sequence[str]],
    max_length: int = 64,
    batch_size: int = 16,
    dead_rule: str = "relative",
    dead_threshold: float = 0.1,
    dead_abs_threshold: float = 0.05,
    top_k: int | None = None,
    progress: bool = True,
) -> MoeScan | None:
    """Route the calibration ``prompts`` (a list, or probe sets whose prompts are pooled) through
    ``model`` and measure every router (module doc). None for a model without routers."""
    if dead_rule not in ("relative", "absolute"):
        raise ValueError(f"mri.moe_dead_rule={dead_rule!r}: choose 'relative' or 'absolute'")
    texts = [t for v in prompts.values() for t in v] if isinstance(prompts, Mapping) else list(prompts)
    routers = find_routers(model)
    if not routers:
        return None
    k = top_k or _config_top_k(model)
    if not k:
        raise ValueError(f"{type(model).__name__}: top-k not found in the config (num_experts_per_tok); pass top_k")
    model.eval()
    owner, _, _ = text_decoder(model)
    device = next(model.parameters()).device
    start = time.perf_counter()
    layers = sorted(routers)
    counts: dict[int, torch.Tensor] = {}
    gram: dict[int, torch.Tensor] = {}
    psum: dict[int, torch.Tensor] = {}
    ent: dict[int, float] = {l: 0.0 for l in layers}
    state: dict[str, torch.Tensor] = {}

    def hook(l: int):
        def fn(module, args, out):
            valid = state["valid"]
            p = _probabilities(out, valid.numel())[valid]
            E = p.shape[-1]
            if l not in counts:
                counts[l] = torch.zeros(E, dtype=torch.float64)
                gram[l] = torch.zeros(E, E, dtype=torch.float64)
                psum[l] = torch.zeros(E, dtype=torch.float64)
            top = torch.topk(p, k, dim=-1).indices
            counts[l] += torch.bincount(top.reshape(-1), minlength=E).double()
            gram[l] += p.T.double() @ p.double()
            psum[l] += p.double().sum(0)
            ent[l] += float(-(p * torch.log2(p.clamp_min(1e-30))).sum())

        return fn

    handles = [routers[l].register_forward_hook(hook(l)) for l in layers]
    n_tokens = 0
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc="MRI MoE scan", unit="batch", disable=not progress):
            batch = tokenize_batch(tokenizer, texts[i : i + batch_size], max_length, device)
            state["valid"] = batch["attention_mask"].reshape(-1).bool().cpu()
            n_tokens += int(state["valid"].sum())
            owner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if n_tokens == 0:
        raise ValueError("MoE scan: the calibration set has no tokens")
    E = counts[layers[0]].numel()
    uniform = k / E
    freq, r_ent, t_ent, s_max, s_mean, dead_rel, dead_abs = [], [], [], [], [], [], []
    for l in layers:
        f = counts[l] / n_tokens
        q = f / k
        qn = q[q > 0]
        mu = psum[l] / n_tokens
        cov = gram[l] / n_tokens - mu[:, None] * mu[None, :]
        sd = cov.diagonal().clamp_min(1e-30).sqrt()
        cos = (cov / (sd[:, None] * sd[None, :])).clamp(-1.0, 1.0)
        off = cos.clone()
        off.fill_diagonal_(float("-inf"))
        freq.append(f.tolist())
        r_ent.append(float(-(qn * torch.log2(qn)).sum()))
        t_ent.append(ent[l] / n_tokens)
        s_max.append(off.max(1).values.tolist())
        s_mean.append(float(cos[~torch.eye(E, dtype=torch.bool)].mean()) if E > 1 else 1.0)
        dead_rel.append((f < dead_threshold * uniform).tolist())
        dead_abs.append((f < dead_abs_threshold).tolist())
    return MoeScan(
        layers=layers,
        num_experts=E,
        top_k=k,
        tokens=n_tokens,
        frequency=freq,
        routing_entropy=r_ent,
        token_entropy=t_ent,
        similarity_max=s_max,
        similarity_mean=s_mean,
        dead_relative=dead_rel,
        dead_absolute=dead_abs,
        dead_rule=dead_rule,
        dead_threshold=dead_threshold,
        dead_abs_threshold=dead_abs_threshold,
        seconds=time.perf_counter() - start,
    )
