"""Phase-1 proxy fitness: how closely the child follows the stronger parent of each probe set.

Darwin's own phase-1 proxy was a heuristic on the genome alone. Ours looks at the child's outputs,
in memory, on the probe prompts:

    teacher(p)  = the parent with the lower mean next-token NLL on probe set p
    proxy(child) = - mean_p  mean_tokens  KL( P_teacher(p) || P_child )

so a child scores well when it behaves like the father where the father is better and like the
mother where she is. For large vocabularies the teacher distribution is truncated to its top-k
tokens (renormalised): the cost per trial is one forward pass of the child over the probe prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class _Teacher:
    parent: str  # "father" | "mother"
    topk_idx: torch.Tensor  # (B, T-1, k) long
    topk_logp: torch.Tensor  # (B, T-1, k) float32, renormalised over the k tokens
    mask: torch.Tensor  # (B, T-1) bool, positions that predict a real token
    nll: dict[str, float]


def _batch(tokenizer, texts: list[str], max_length: int) -> _Batch:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return _Batch(enc["input_ids"], enc["attention_mask"])


@torch.no_grad()
def logprobs(model, batch: _Batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids.to(model.device), attention_mask=batch.attention_mask.to(model.device))
    return F.log_softmax(out.logits[:, :-1].float(), dim=-1).cpu()


def _nll(logp: torch.Tensor, batch: _Batch) -> float:
    target = batch.input_ids[:, 1:]
    mask = batch.attention_mask[:, 1:].bool()
    tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return float(-(tok[mask]).mean())


class TeacherKLProxy:
    """Proxy fitness over probe sets. Build once per search with both parents' log-probs, then call
    ``score(model)`` after each in-memory merge (higher is better, 0 is a perfect match)."""

    def __init__(
        self,
        tokenizer,
        prompts: dict[str, list[str]],
        father_logprobs_fn,
        mother_logprobs_fn,
        max_length: int = 64,
        top_k: int = 64,
    ):
        """``*_logprobs_fn(batch) -> (B, T-1, V) log-probs``: run the parent on a batch (for the
        in-memory search: load the parent into the trial model, then call ``logprobs``)."""
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.batches = {p: _batch(tokenizer, texts, max_length) for p, texts in prompts.items() if texts}
        if not self.batches:
            raise ValueError("proxy fitness needs at least one probe set with prompts (probes.sets)")
        self.teachers: dict[str, _Teacher] = {}
        for p, b in self.batches.items():
            lf, lm = father_logprobs_fn(b), mother_logprobs_fn(b)
            nll = {"father": _nll(lf, b), "mother": _nll(lm, b)}
            parent = "mother" if nll["mother"] < nll["father"] else "father"
            logp = lm if parent == "mother" else lf
            k = min(top_k, logp.shape[-1])
            vals, idx = logp.topk(k, dim=-1)
            vals = vals - torch.logsumexp(vals, dim=-1, keepdim=True)
            self.teachers[p] = _Teacher(parent, idx, vals, b.attention_mask[:, 1:].bool(), nll)
            log.info("proxy: probe set %s follows the %s (NLL father %.3f, mother %.3f)", p, parent, nll["father"], nll["mother"])

    @property
    def teacher_of(self) -> dict[str, str]:
        return {p: t.parent for p, t in self.teachers.items()}

    @torch.no_grad()
    def score(self, model) -> float:
        """- mean over probe sets of the token-mean KL(teacher || child) on the teacher's top-k tokens."""
        kls = []
        for p, b in self.batches.items():
            t = self.teachers[p]
            child = logprobs(model, b).gather(-1, t.topk_idx)
            kl = (t.topk_logp.exp() * (t.topk_logp - child)).sum(-1)
            kls.append(float(kl[t.mask].mean()))
        return -sum(kls) / len(kls)
