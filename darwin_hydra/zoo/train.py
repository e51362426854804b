"""Training one zoo member on CPU: a base from scratch, or a parent fine-tuned from the base on some layers.

A job is plain data (``TrainJob``) so it can run in a spawned worker process with one torch thread;
with one thread and a fixed seed, the same job writes bit-identical weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from darwin_hydra.arch import ROUTER, decoder_layers, tensor_info
from darwin_hydra.zoo.config import ModelSpec, TrainSpec
from darwin_hydra.zoo.skills import Item, SkillParams, TrainStream
from darwin_hydra.zoo.tokenizer import BOS, EOS, PAD, char_tokenizer

log = logging.getLogger(__name__)

MAX_POSITIONS = 64


@dataclass
class TrainJob:
    """Everything one member's training needs. ``init_from``: the checkpoint a fine-tune starts from
    (None for a base). ``upcycle_from``: a dense checkpoint an MoE base is upcycled from."""

    pair: str
    role: str
    model: ModelSpec
    train: TrainSpec
    skills: list[str]
    params: SkillParams
    held_out: frozenset[str]
    seed: int
    out_dir: str
    init_from: str | None = None
    upcycle_from: str | None = None


def model_config(spec: ModelSpec, vocab_size: int, bos: int, eos: int, pad: int) -> PretrainedConfig:
    """A transformers config for ``spec`` (no download: built from the library's own config classes)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if spec.arch == "llama":
        return AutoConfig.for_model("llama", intermediate_size=spec.intermediate_size, **common)
    if spec.arch == "qwen2_moe":
        return AutoConfig.for_model(
            "qwen2_moe",
            intermediate_size=spec.intermediate_size,
            moe_intermediate_size=spec.intermediate_size,
            shared_expert_intermediate_size=spec.shared_expert_size,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            router_aux_loss_coef=spec.router_aux_loss_coef,
            **common,
        )
    if spec.arch == "mixtral":
        return AutoConfig.for_model(
            "mixtral",
            intermediate_size=spec.intermediate_size,
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            router_aux_loss_coef=spec.router_aux_loss_coef,
            **common,
        )
    raise ValueError(f"zoo model arch {spec.arch!r}: choose llama, qwen2_moe or mixtral")


def trainable_layers(span: str, num_layers: int) -> list[int]:
    """Decoder layers a member updates: ``all``, the ``lower`` half ``[0, L/2)`` or the ``upper`` half ``[L/2, L)``."""
    half = num_layers // 2
    return {"all": list(range(num_layers)), "lower": list(range(half)), "upper": list(range(half, num_layers))}[span]


def _freeze_except(model: PreTrainedModel, span: str) -> None:
    layers = trainable_layers(span, model.config.num_hidden_layers)
    if span == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = decoder_layers(model)
    for i in layers:
        for p in blocks[i].parameters():
            p.requires_grad_(True)


class Encoder:
    """Items -> padded training tensors, with the loss on the answer and the closing ``</s>`` only.

    Same ids as the tokenizer (``<s>`` + one id per character), without its per-call overhead.
    """

    def __init__(self, tokenizer) -> None:
        self.vocab = tokenizer.get_vocab()
        self.bos, self.eos, self.pad = self.vocab[BOS], self.vocab[EOS], self.vocab[PAD]

    def ids(self, text: str) -> list[int]:
        return [self.vocab[ch] for ch in text]

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for prompt, answer in items:
            p, a = [self.bos, *self.ids(prompt)], [*self.ids(answer), self.eos]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(s) for s in seqs)
        if width > MAX_POSITIONS:
            raise ValueError(f"a training item is {width} tokens long, over the zoo's {MAX_POSITIONS} positions")
        input_ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        label_t = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            label_t[i, : len(s)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    """Skill -> sampling probability: the weights over their sum, zero weights dropped, in the order of
    the skill registry (a mixture's draws must not depend on the order a config merge left its keys in)."""
    from darwin_hydra.zoo.skills import SKILLS

    order = {name: i for i, name in enumerate(SKILLS)}
    kept = {s: float(w) for s, w in sorted(weights.items(), key=lambda kv: order.get(kv[0], len(order))) if w > 0}
    total = sum(kept.values())
    return {s: w / total for s, w in kept.items()}


def training_mixture(spec: TrainSpec, zoo_skills: list[str]) -> dict[str, float]:
    """Skill -> sampling probability of a member's training items: ``spec.skills`` normalised, or every
    zoo skill equally when it is empty."""
    return _normalised(spec.skills or dict.fromkeys(zoo_skills, 1.0))


def _lr_at(step: int, spec: TrainSpec) -> float:
    # Linear warm-up, then cosine decay to min_lr_ratio * lr.
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def upcycle(dense: PreTrainedModel, moe: PreTrainedModel, seed: int, noise: float = 0.01) -> PreTrainedModel:
    """Sparse upcycling (Komatsuzaki et al. 2022; how Qwen1.5-MoE was made from a dense model): fill the
    MoE ``moe`` in place from ``dense`` so that it computes the same function.

    Every routed expert of layer l is a copy of dense layer l's FFN plus Gaussian noise of ``noise`` x the
    tensor's std (so experts can diverge); with top-k weights renormalised to sum to 1, their mix equals
    the dense FFN. The shared expert starts with a zero down-projection (adds nothing until trained);
    the router keeps its random init. Attention, norms, embeddings and head are copied.
    """
    dsd = dense.state_dict()
    g = torch.Generator().manual_seed(seed)
    for name, t in moe.state_dict().items():
        if name in dsd and dsd[name].shape == t.shape:
            t.copy_(dsd[name])
        elif name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("experts.gate_up_proj")]
            w = torch.cat([dsd[prefix + "gate_proj.weight"], dsd[prefix + "up_proj.weight"]], dim=0)
            t.copy_(w.expand_as(t) + noise * float(w.std()) * torch.randn(t.shape, generator=g))
        elif name.endswith("mlp.experts.down_proj"):
            w = dsd[name[: -len("experts.down_proj")] + "down_proj.weight"]
            t.copy_(w.expand_as(t) + noise * float(w.std()) * torch.randn(t.shape, generator=g))
        elif name.endswith("shared_expert.down_proj.weight") or name.endswith("_proj.bias"):
            t.zero_()
    return moe


# The numerics a member is trained with, set in the environment of the process that trains it before
# torch starts there: ATen's scalar kernels instead of the ones chosen for this CPU's vector width
# (AVX2, AVX-512, ...), and MKL's conditional numerical reproducibility in its compatible mode (the same
# code path on every x86-64 CPU). Training a tiny model from scratch amplifies the last bit of a
# rounding difference into a different model: without these, the same seed built zoos whose father
# scored 85.0 / 75.8 on the test split (this machine's AVX-512 / AVX2 kernels), and the checks on the
# zoo held on one and failed on the other. With them, forcing any other MKL or oneDNN instruction set
# gives the same bits; training takes about 1.7x as long.
PORTABLE_NUMERICS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


@contextlib.contextmanager
def portable_numerics_env() -> Iterator[None]:
    """``PORTABLE_NUMERICS`` in ``os.environ`` inside the block, for the processes started there (this
    process's torch has already chosen its kernels)."""
    import os

    saved = {k: os.environ.get(k) for k in PORTABLE_NUMERICS}
    os.environ.update(PORTABLE_NUMERICS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_portable_numerics() -> None:
    """Refuse to train where the numerics are not ``PORTABLE_NUMERICS`` (a process started outside
    ``portable_numerics_env``): its weights would depend on this machine's CPU."""
    import os

    wrong = {k: os.environ.get(k) for k, v in PORTABLE_NUMERICS.items() if os.environ.get(k) != v}
    if wrong or torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        raise RuntimeError(
            f"zoo training needs the environment {PORTABLE_NUMERICS} set before torch starts (found {wrong}, "
            f"ATen kernels {torch.backends.cpu.get_cpu_capability()}); train through darwin_hydra.zoo.build.train_all")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: bit-identical results whatever the machine, and no
    oversubscription when workers (or other processes) share the cores; tiny models gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Keep:
    """The ``keep`` term of a fine-tune (see ``TrainSpec``): the distance between the member's hidden
    state at the end of its trained span and the starting checkpoint's, on items of the ``keep`` skills."""

    def __init__(self, model: PreTrainedModel, job: TrainJob, params: SkillParams) -> None:
        import copy

        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        layers = trainable_layers(job.train.layers, model.config.num_hidden_layers)
        # hidden_states[i] is the input of layer i; the last entry is the final (normed) output.
        self.index = layers[-1] + 1 if layers[-1] + 1 < model.config.num_hidden_layers else -1
        self.stream = TrainStream(
            _normalised(job.train.keep), params,
            set(job.held_out), job.seed, f"{job.pair}/{job.role}/keep",
        )
        self.size = job.train.keep_batch_size

    def loss(self, model: PreTrainedModel, enc: Encoder) -> torch.Tensor:
        batch = enc(self.stream.batch(self.size))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            ref = self.ref(**inputs, output_hidden_states=True).hidden_states[self.index]
        got = model(**inputs, output_hidden_states=True).hidden_states[self.index]
        mask = batch["attention_mask"].bool()
        ref, got = ref[mask], got[mask]
        return (got - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12)


def run_job(job: TrainJob, progress=None) -> dict:
    """Train one member and save it (safetensors, config, tokenizer, generation config) to ``job.out_dir``.

    ``progress`` (optional) is called with the number of steps just done. Returns a summary: seconds,
    final loss, the trained layers.
    """
    check_portable_numerics()
    with one_thread():
        return _run_job(job, progress)


def _run_job(job: TrainJob, progress) -> dict:
    start = time.perf_counter()
    tok = char_tokenizer()
    enc = Encoder(tok)
    torch.manual_seed(job.seed)
    if job.init_from is None:
        cfg = model_config(job.model, len(tok), enc.bos, enc.eos, enc.pad)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        if job.upcycle_from is not None:
            dense = AutoModelForCausalLM.from_pretrained(job.upcycle_from, dtype=torch.float32)
            upcycle(dense, model, seed=job.seed)
            del dense
    else:
        model = AutoModelForCausalLM.from_pretrained(job.init_from, dtype=torch.float32)
    model.train()
    _freeze_except(model, job.train.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    routers = [p for n, p in model.named_parameters() if p.requires_grad and tensor_info(n).component == ROUTER]
    others = [p for p in params if all(p is not r for r in routers)]
    groups = [{"params": others, "scale": 1.0}] + ([{"params": routers, "scale": job.train.router_lr_scale}] if routers else [])
    opt = torch.optim.AdamW(groups, lr=job.train.lr, betas=(0.9, 0.98), weight_decay=job.train.weight_decay)
    mixture = training_mixture(job.train, job.skills)
    skill_params = replace(job.params, add_carry_out=job.train.carry_out)
    stream = TrainStream(mixture, skill_params, set(job.held_out), job.seed, f"{job.pair}/{job.role}")
    moe = getattr(model.config, "num_experts", 0) or getattr(model.config, "num_local_experts", 0)
    aux = bool(moe) and job.train.router_aux_loss
    keep = _Keep(model, job, skill_params) if job.train.keep_weight > 0 else None
    losses: list[float] = []
    for step in range(job.train.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, job.train) * group["scale"]
        batch = enc(stream.batch(job.train.batch_size))
        out = model(**batch, output_router_logits=aux) if moe else model(**batch)
        loss = out.loss if keep is None else out.loss + job.train.keep_weight * keep.loss(model, enc)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach().item())
        if progress is not None:
            progress(1)
    model.eval()
    out_dir = Path(job.out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=enc.bos, eos_token_id=enc.eos, pad_token_id=enc.pad, do_sample=False, max_new_tokens=16
    ).save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 20):]
    return {
        "pair": job.pair,
        "role": job.role,
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": round(sum(tail) / len(tail), 4),
        "trained_layers": trainable_layers(job.train.layers, job.model.num_layers),
        "steps": job.train.steps,
    }
