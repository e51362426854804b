"""Phase-1 proxy fitness: how closely the child follows the stronger parent of each probe set.

Darwin's own phase-1 proxy was a heuristic on the genome alone. Ours looks at the child's outputs,
in memory, on the probe prompts:

    teacher(p)   = the parent that owns probe set p: the MRI's assignment (``teacher_of``; the
                   mother owns ``parents.mother_skill`` when given), else the parent with the
                   lower mean next-token NLL on the prompts
    answer(p)    = the teacher's own greedy continuation of each prompt (``answer_tokens`` tokens,
                   up to its end-of-sequence token), generated once
    proxy(child) = - mean_p  mean_answer_tokens  KL( P_teacher(p) || P_child )

so a child scores well when it answers like the father where the father is better and like the
mother where she is. The KL is taken where the skill is exercised, on the answer: on the prompt
tokens (``answer_tokens=0``, the first version) it mostly measures how each model predicts the
question's text, and the zoo's father and mother differ there in ways unrelated to their skills.
For large vocabularies the teacher distribution is truncated to its top-k tokens (renormalised):
the cost per trial is one forward pass of the child over prompts and answers.
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
    nll: dict[str, float]  # prompt NLL per parent, when the teacher was chosen by it


def _batch(tokenizer, texts: list[str], max_length: int) -> _Batch:
    # Left padding: every prompt ends at the last column, so answers are appended as whole columns.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    finally:
        tokenizer.padding_side = side
    return _Batch(enc["input_ids"], enc["attention_mask"])


@torch.no_grad()
def logprobs(model, batch: _Batch, keep: int = 0) -> torch.Tensor:
    """``(B, T-1, V)`` next-token log-probs of ``model`` on ``batch`` (positions from the attention mask,
    so left padding does not shift them); with ``keep`` > 0 only the last ``keep`` of those positions,
    ``(B, keep, V)``: the model computes logits for them alone (``logits_to_keep``), which for a
    262k-token vocabulary is the difference between a few MB and GBs a probe batch."""
    mask = batch.attention_mask.to(model.device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=batch.input_ids.to(model.device), attention_mask=mask, position_ids=positions)
    if keep > 0:
        try:
            logits = model(**inputs, logits_to_keep=keep + 1).logits
        except TypeError:  # a model class without logits_to_keep: compute all, keep the tail
            logits = model(**inputs).logits
        logits = logits[:, -(keep + 1):]
    else:
        logits = model(**inputs).logits
    return F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def greedy_answers(logprobs_fn, batch: _Batch, n_tokens: int, eos_id: int | None, pad_id: int) -> tuple[_Batch, torch.Tensor]:
    """Extend the left-padded ``batch`` by ``n_tokens`` greedy tokens of the model behind ``logprobs_fn``
    (called as ``logprobs_fn(batch, keep)``, see ``logprobs``).

    Returns the extended batch and a ``(B, T'-1)`` mask of the log-prob positions that predict an
    answer token (up to and including the end-of-sequence token; nothing after it)."""
    ids, mask = batch.input_ids, batch.attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    predicts_answer = torch.zeros_like(mask[:, 1:], dtype=torch.bool)
    for _ in range(n_tokens):
        # one padding column, masked: the log-probs at the last real position are the next token's
        probe = _Batch(torch.cat([ids, torch.full_like(ids[:, :1], pad_id)], 1), torch.cat([mask, torch.zeros_like(mask[:, :1])], 1))
        nxt = logprobs_fn(probe, 1)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        predicts_answer = torch.cat([predicts_answer, (~done).unsqueeze(1)], 1)
        ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
        mask = torch.cat([mask, (~done).long().unsqueeze(1).to(mask.dtype)], 1)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        if bool(done.all()):
            break
    return _Batch(ids, mask), predicts_answer


def _real_targets(batch: _Batch) -> torch.Tensor:
    """``(B, T-1)``: positions where a real token predicts a real token (not from or to padding)."""
    mask = batch.attention_mask.bool()
    return mask[:, :-1] & mask[:, 1:]


def _nll(logp: torch.Tensor, batch: _Batch) -> float:
    target = batch.input_ids[:, 1:]
    mask = _real_targets(batch)
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
        teacher_of: dict[str, str] | None = None,
        answer_tokens: int = 0,
    ):
        """``*_logprobs_fn(batch, keep=0) -> (B, T-1, V) log-probs`` (the last ``keep`` positions when
        > 0): run the parent on a batch (for the in-memory search: load the parent into the trial
        model, then call ``logprobs``).
        ``teacher_of``: probe set -> ``father``/``mother`` (sets not in it: the lower-NLL parent).
        ``answer_tokens``: > 0 scores the KL on that many greedy answer tokens of the teacher."""
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.batches = {p: _batch(tokenizer, texts, max_length) for p, texts in prompts.items() if texts}
        if not self.batches:
            raise ValueError("proxy fitness needs at least one probe set with prompts (probes.sets)")
        teacher_of = dict(teacher_of or {})
        if bad := {p: t for p, t in teacher_of.items() if t not in ("father", "mother")}:
            raise ValueError(f"proxy teachers must be 'father' or 'mother'; got {bad}")
        fns = {"father": father_logprobs_fn, "mother": mother_logprobs_fn}
        self.keep: dict[str, int] = {}  # probe set -> answer positions scored (0: every position)
        self.teachers: dict[str, _Teacher] = {}
        for p, b in self.batches.items():
            nll: dict[str, float] = {}
            logp = None
            if p in teacher_of:
                parent = teacher_of[p]
            else:  # only an unassigned set needs both parents' full log-probs, to compare their loss
                full = {"father": father_logprobs_fn(b), "mother": mother_logprobs_fn(b)}
                nll = {who: _nll(lp, b) for who, lp in full.items()}
                parent = "mother" if nll["mother"] < nll["father"] else "father"
                logp = full[parent]
            scored = _real_targets(b)
            if answer_tokens > 0:
                prompt_len = b.input_ids.shape[1]
                b, scored = greedy_answers(fns[parent], b, answer_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
                self.batches[p] = b
                # only the answer positions are scored: keep just those logits, now and every trial
                self.keep[p] = b.input_ids.shape[1] - prompt_len
                scored = scored[:, -self.keep[p]:]
                logp = fns[parent](b, self.keep[p])
            elif logp is None:
                logp = fns[parent](b)
            k = min(top_k, logp.shape[-1])
            vals, idx = logp.topk(k, dim=-1)
            vals = vals - torch.logsumexp(vals, dim=-1, keepdim=True)
            self.teachers[p] = _Teacher(parent, idx, vals, scored, nll)
            how = "the MRI" if p in teacher_of else f"lower prompt NLL: father {nll['father']:.3f}, mother {nll['mother']:.3f}"
            log.info("proxy: probe set %s follows the %s (%s)", p, parent, how)

    @property
    def teacher_of(self) -> dict[str, str]:
        return {p: t.parent for p, t in self.teachers.items()}

    @torch.no_grad()
    def score(self, model) -> float:
        """- mean over probe sets of the token-mean KL(teacher || child) on the teacher's top-k tokens."""
        kls = []
        for p, b in self.batches.items():
            t = self.teachers[p]
            child = logprobs(model, b, self.keep.get(p, 0)).gather(-1, t.topk_idx)
            kl = (t.topk_logp.exp() * (t.topk_logp - child)).sum(-1)
            kls.append(float(kl[t.mask].mean()))
        return -sum(kls) / len(kls)
