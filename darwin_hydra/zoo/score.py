"""Fast in-memory measurements the builder records in metadata.json: greedy exact-match accuracy per
skill, and MoE expert routing shares (dead experts).

``greedy_correct`` computes what lm-eval's ``acc`` computes for a ``loglikelihood`` task (``is_greedy``:
every answer token is the argmax given the prompt and the answer so far), with one batched forward
pass and no lm-eval machinery; tests check the two agree. Reports use lm-eval
(``darwin_hydra.evaluate``); the builder uses this to stay fast.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel

from darwin_hydra.arch import decoder_layers
from darwin_hydra.zoo.skills import Item
from darwin_hydra.zoo.train import Encoder


@torch.no_grad()
def greedy_correct(model: PreTrainedModel, enc: Encoder, items: list[Item], batch_size: int = 256) -> np.ndarray:
    """0/1 per item: 1 when greedy decoding from ``<s>prompt`` reproduces ``answer`` exactly (no stop token needed)."""
    model.eval()
    out = np.zeros(len(items), dtype=np.int8)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        seqs = [([enc.bos, *enc.ids(p)], enc.ids(a)) for p, a in chunk]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(chunk), width), enc.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, a) in enumerate(seqs):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for i, (p, a) in enumerate(seqs):
            # Position t predicts token t+1: the answer's tokens are predicted at len(p)-1 .. len(p)+len(a)-2.
            got = pred[i, len(p) - 1 : len(p) + len(a) - 1]
            out[start + i] = int(torch.equal(got, torch.tensor(a)))
    return out


@torch.no_grad()
def expert_shares(model: PreTrainedModel, enc: Encoder, items: list[Item], batch_size: int = 256) -> np.ndarray:
    """Routing share per (layer, expert) over the prompt tokens of ``items``: the fraction of tokens whose
    top-k includes the expert. Shape ``[layers, experts]``; a row sums to k (experts per token)."""
    cfg = model.config
    k = int(getattr(cfg, "num_experts_per_tok"))
    n_exp = int(getattr(cfg, "num_experts", 0) or getattr(cfg, "num_local_experts", 0))
    counts = np.zeros((len(decoder_layers(model)), n_exp))
    tokens = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        seqs = [[enc.bos, *enc.ids(p)] for p, _ in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(chunk), width), enc.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        keep = mask.reshape(-1).bool()
        tokens += int(keep.sum())
        for layer, logits in enumerate(out.router_logits):
            top = logits.reshape(-1, n_exp)[keep].topk(k, dim=-1).indices
            counts[layer] += np.bincount(top.reshape(-1).numpy(), minlength=n_exp)
    return counts / max(tokens, 1)


def dead_experts(shares: np.ndarray, k: int, threshold: float) -> list[list[int]]:
    """Per layer, the experts whose share is below ``threshold * k / E`` (the uniform share under top-k routing)."""
    n_exp = shares.shape[1]
    cut = threshold * k / n_exp
    return [[int(e) for e in np.flatnonzero(row < cut)] for row in shares]
