"""Probe scan: how much each decoder layer matters for each probe set.

For probe set p and layer l::

    I_p(l) = mean over prompts of  d( f(x), f_{-l}(x) ),   d(u, v) = 1 - cos(u, v)

where f(x) is the final hidden state (after the decoder's final norm) and f_{-l} the same with layer l
replaced by the identity (skipped). With ``reduce="mean"`` a prompt's distance is the mean over its
valid (non-padding) tokens, with ``reduce="last"`` the distance at its last valid token.

Prefix sharing. Skipping layer l changes nothing before it, so per prompt batch we run the model once,
caching every layer's input h_0..h_{L-1} and the keyword inputs it was called with (rotary
embeddings, masks, Gemma 4's per-layer inputs, the layer type's mask...); then for each l we replay
layers l+1..L-1 starting from h_l. Layer evaluations per batch::

    L  +  sum_{l=0}^{L-1} (L-1-l)  =  L + L(L-1)/2  =  L(L+1)/2

instead of L*L for the naive way (a reference pass plus one pass of L-1 layers per skipped layer):
e.g. L=8: 36 vs 64; L=40: 820 vs 1600; L=64: 2080 vs 4096.

The same pass gives ShortGPT's block influence for free: BI(l) = 1 - cos(h_l, h_{l+1}), reduced over
tokens the same way.

Delta probe (optional, ``reference=`` the checkpoint of another model of the same architecture: the
base both parents descend from, or the other parent when there is none)::

    D_p(l) = mean over prompts of  d( f(x), f_{l <- ref}(x) )

the distance when layer l is replaced by the reference's layer l (same inputs, same extra arguments):
how much this model's own version of layer l -- what its training changed there -- matters for p.
D is exactly 0 at layers whose weights equal the reference's. It rides on the same cached prefix:
L-l more layer evaluations for each l, L(L+1)/2 per batch. The reference is never loaded whole: its
layer l is read from its checkpoint into the model's own layer l in place (the model's weights of
that layer saved and put back after the call, ``ReferenceLayers``), so the scan holds one model and
one extra layer, on whatever devices the model is spread over. (A reference given as a loaded model
is used as it is.)

Side effects of a skipped layer: a layer that writes into a state shared with later layers (Gemma 4's
KV sharing dict) is treated as in the "output replaced by input" definition: the replay of layers
l+1.. starts from the shared state as it was after layer l ran in the full pass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import UserDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from darwin_hydra.arch import decoder_layers

log = logging.getLogger(__name__)

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_norm", "ln_f", "norm_f")
_DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class ProbeScan:
    """Per probe set and layer: importance I_p(l) and block influence BI_p(l); plus the work it took.

    ``layer_evals`` counts decoder-layer calls the skip probe made (the full pass included);
    ``naive_layer_evals`` what skipping each layer in its own full pass would have cost (L*L per
    batch); ``delta_layer_evals`` the delta probe's extra calls (L(L+1)/2 per batch).
    """

    sets: list[str]
    num_layers: int
    importance: dict[str, list[float]]
    block_influence: dict[str, list[float]]
    prompts: dict[str, int]
    tokens: dict[str, int]
    layer_evals: int
    naive_layer_evals: int
    batches: int
    seconds: float
    reduce: str = "mean"
    # D_p(l) of the delta probe (None when no reference model was given) and its layer evaluations
    delta: dict[str, list[float]] | None = None
    delta_layer_evals: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ProbeScan":
        return cls(**dict(d))

    def total(self, weights: Mapping[str, float] | None = None) -> list[float]:
        """sum_p w_p * I_p(l) per layer (w_p = 1 when not given)."""
        w = weights or {}
        return [sum(w.get(p, 1.0) * self.importance[p][l] for p in self.sets) for l in range(self.num_layers)]


# --------------------------------------------------------------------------------------------------
# model anatomy


def text_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """(text model, its decoder layers, its final norm) of a causal LM or a multimodal wrapper.

    The text model is the module that owns the layer list (``model.model`` for Llama/Qwen,
    ``model.model.language_model`` for Gemma 4); the final norm is its ``norm`` (or ``final_layernorm``,
    ``ln_f``...).
    """
    layers = decoder_layers(model)
    owner_name = next(n for n, m in model.named_modules() if m is layers).rsplit(".", 1)
    owner = model.get_submodule(owner_name[0]) if len(owner_name) == 2 else model
    for attr in _FINAL_NORM_NAMES:
        norm = getattr(owner, attr, None)
        if isinstance(norm, nn.Module):
            return owner, layers, norm
    raise ValueError(
        f"{type(model).__name__}: no final norm found on {type(owner).__name__} "
        f"(looked for attributes {_FINAL_NORM_NAMES}); the probe scan needs the decoder's final norm"
    )


def _is_mutable_state(v: Any) -> bool:
    return isinstance(v, (dict, UserDict)) and not isinstance(v, torch.Tensor)


@dataclass
class _LayerCall:
    args: tuple
    kwargs: dict
    # snapshots of mutable shared state (e.g. Gemma 4's shared KV dict) as they were before this call
    state: dict = field(default_factory=dict)


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _call_layer(layer: nn.Module, call: _LayerCall, h: torch.Tensor, state: dict) -> torch.Tensor:
    kwargs = dict(call.kwargs)
    kwargs.update(state)
    if call.args:
        return _hidden(layer(h, *call.args[1:], **kwargs))
    kwargs["hidden_states"] = h
    return _hidden(layer(**kwargs))


def _token_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """1 - cos per token, in float32: (B, S, H) x (B, S, H) -> (B, S)."""
    return 1.0 - F.cosine_similarity(u.float(), v.float(), dim=-1, eps=1e-8)


def _reduce(dist: torch.Tensor, mask: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-prompt distance (B,) from per-token distances (B, S) and the attention mask (B, S)."""
    m = mask.to(dist.dtype)
    if reduce == "mean":
        return (dist * m).sum(1) / m.sum(1).clamp_min(1.0)
    if reduce == "last":
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * (pos + 1)).argmax(1)  # last index where mask is 1 (left or right padding)
        return dist.gather(1, last[:, None])[:, 0]
    raise ValueError(f"probe reduce={reduce!r}: choose 'mean' or 'last'")


def tokenize_batch(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch (a prompt's hidden states then do not depend on what it is batched with)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


# --------------------------------------------------------------------------------------------------
# the delta probe's reference, a layer at a time


class ReferenceLayers:
    """The reference's decoder layers as the delta probe calls them: ``swapped(l)`` gives the model's
    own layer l holding the reference's weights, read from ``reader`` (the reference checkpoint: the
    same architecture and tensor names) into the layer's parameters in place; the model's own weights
    of that layer are saved first and put back when the block exits. Memory: one layer twice, never a
    second model. The weights arrive exactly as ``from_pretrained`` would place them (``io.layout``'s
    views: fused MoE experts included; cast to the parameter's dtype like a load)."""

    def __init__(self, model: nn.Module, reader):
        import bisect

        from darwin_hydra.io.layout import param_views

        _, self.layers, _ = text_decoder(model)
        views = param_views(model)
        # which layer a view's memory belongs to (parameters may share one storage, e.g. a mapped file)
        spans: dict[torch.device, list[tuple[int, int, int]]] = {}  # device -> (start, end, layer), sorted
        for i, layer in enumerate(self.layers):
            for t in list(layer.parameters()) + list(layer.buffers()):
                if t.device.type == "meta":
                    raise ValueError(f"delta probe: decoder layer {i} has weights offloaded (meta); the reference is "
                                     "swapped into the model's own layers, which must live on a device")
                if t.numel():
                    spans.setdefault(t.device, []).append((t.data_ptr(), t.data_ptr() + t.nbytes, i))
        starts = {}
        for dev, sp in spans.items():
            sp.sort()
            starts[dev] = [s[0] for s in sp]
        self.names: list[list[str]] = [[] for _ in self.layers]
        self.views = {}
        for name, v in views.items():
            if not v.numel() or v.device not in spans:
                continue
            j = bisect.bisect_right(starts[v.device], v.data_ptr()) - 1
            if j >= 0 and v.data_ptr() + v.numel() * v.element_size() <= spans[v.device][j][1]:
                self.names[spans[v.device][j][2]].append(name)
                self.views[name] = v
        absent = [n for names in self.names for n in names if n not in reader]
        if absent:
            raise KeyError(f"delta probe: the reference checkpoint {getattr(reader, 'path', reader)} lacks the model's "
                           f"layer tensor(s) {absent[:5]}")
        self.reader = reader

    def __len__(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def swapped(self, l: int):
        names = self.names[l]
        own = {n: self.views[n].clone() for n in names}
        try:
            for n in names:
                self.views[n].copy_(self.reader.get(n))
            yield self.layers[l]
        finally:
            for n, t in own.items():
                self.views[n].copy_(t)


class _LoadedLayers:
    """A loaded reference model's layers (or a list of layers) behind ``ReferenceLayers``'s interface."""

    def __init__(self, reference: nn.Module):
        reference.eval()
        self.layers = reference if isinstance(reference, nn.ModuleList) else text_decoder(reference)[1]

    def __len__(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def swapped(self, l: int):
        yield self.layers[l]


def as_reference(model: nn.Module, reference) -> ReferenceLayers | _LoadedLayers | None:
    """The delta probe's reference: None, a ``CheckpointReader`` (swapped in a layer at a time), or a
    loaded model or its decoder layers."""
    if reference is None:
        return None
    if isinstance(reference, nn.Module):
        return _LoadedLayers(reference)
    return ReferenceLayers(model, reference)


# --------------------------------------------------------------------------------------------------
# the scan


@torch.no_grad()
def skip_layer_distances(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    reduce: str = "mean",
    reference_layers: ReferenceLayers | _LoadedLayers | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
    """For one tokenized batch: (S, BI, D, layer evaluations) with S[l, b] = distance of prompt b's final
    hidden state when layer l is skipped, BI[l, b] = 1 - cos(h_l, h_{l+1}), D[l, b] the distance when
    layer l is replaced by the reference's layer l (``reference_layers``: ``as_reference``'s, or the
    reference's decoder layers; None without reference), and the layer evaluations of the skip and of
    the delta probe; prefix-shared (module doc)."""
    if isinstance(reference_layers, nn.ModuleList):
        reference_layers = _LoadedLayers(reference_layers)
    owner, layers, norm = text_decoder(model)
    L = len(layers)
    if reference_layers is not None and len(reference_layers) != L:
        raise ValueError(f"delta probe: the reference has {len(reference_layers)} decoder layers, the model {L}")
    calls: list[_LayerCall | None] = [None] * L
    inputs: list[torch.Tensor | None] = [None] * L
    final: dict[str, torch.Tensor] = {}

    def pre_hook(i: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            inputs[i] = h.clone()
            state = {k: copy.copy(v) for k, v in kwargs.items() if _is_mutable_state(v)}
            calls[i] = _LayerCall(args, dict(kwargs), state)

        return hook

    def norm_hook(module, args, out):
        # the last call of the final norm is the one after the layers
        final["in"], final["out"] = args[0], out

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(norm.register_forward_hook(norm_hook))
    try:
        owner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing or "out" not in final:
        raise RuntimeError(
            f"{type(model).__name__}: the forward pass did not call decoder layer(s) {missing} "
            "or the final norm; the probe scan cannot replay this architecture"
        )
    mask = batch["attention_mask"]
    full = final["out"]
    evals = L
    dist = torch.empty(L, mask.shape[0])
    bi = torch.empty(L, mask.shape[0])
    delta = torch.empty(L, mask.shape[0]) if reference_layers is not None else None
    delta_evals = 0
    for l in range(L):
        if delta is not None:
            # layer l replaced by the reference's, fed exactly what the model's own layer l got
            state = {k: copy.copy(v) for k, v in calls[l].state.items()}
            with reference_layers.swapped(l) as ref_layer:
                h = _call_layer(ref_layer, calls[l], inputs[l], state)
            for j in range(l + 1, L):
                h = _call_layer(layers[j], calls[j], h, state)
            delta_evals += L - l
            delta[l] = _reduce(_token_distance(full, norm(h)), mask, reduce).cpu()
        nxt = inputs[l + 1] if l + 1 < L else final["in"]
        bi[l] = _reduce(_token_distance(inputs[l], nxt), mask, reduce).cpu()
        h = inputs[l]
        if l + 1 < L:
            # fresh copies of the shared state as the full pass left it before layer l+1
            state = {k: copy.copy(v) for k, v in calls[l + 1].state.items()}
            for j in range(l + 1, L):
                h = _call_layer(layers[j], calls[j], h, state)
                evals += 1
        dist[l] = _reduce(_token_distance(full, norm(h)), mask, reduce).cpu()
    return dist, bi, delta, evals, delta_evals


@torch.no_grad()
def layer_importance(
    model: nn.Module,
    tokenizer,
    prompts: Mapping[str, list[str]],
    max_length: int = 64,
    batch_size: int = 16,
    reduce: str = "mean",
    progress: bool = True,
    reference=None,
) -> ProbeScan:
    """Importance of every decoder layer for every probe set (module doc for the formula and the
    prefix sharing). ``prompts`` maps a probe-set name to its prompts. Works on dense, MoE and hybrid
    (Gated DeltaNet) decoders and on multimodal wrappers (the text decoder's layers), whole on one
    device or spread over several by a device_map. With ``reference`` (the reference's
    ``CheckpointReader``, swapped in a layer at a time; or a loaded model of the same architecture on
    the same devices), also the delta probe D_p(l)."""
    if reduce not in ("mean", "last"):
        raise ValueError(f"probe reduce={reduce!r}: choose 'mean' or 'last'")
    model.eval()
    device = next(model.parameters()).device
    _, layers, _ = text_decoder(model)
    L = len(layers)
    ref_layers = as_reference(model, reference)
    start = time.perf_counter()
    importance, influence, deltas, n_prompts, n_tokens = {}, {}, {}, {}, {}
    evals = delta_evals = batches = 0
    total_batches = sum(math.ceil(len(v) / batch_size) for v in prompts.values())
    bar = tqdm(total=total_batches, desc="MRI probe scan", unit="batch", disable=not progress)
    for name, texts in prompts.items():
        if not texts:
            raise ValueError(f"probe set {name!r} has no prompts")
        d_sum = torch.zeros(L, dtype=torch.float64)
        b_sum = torch.zeros(L, dtype=torch.float64)
        x_sum = torch.zeros(L, dtype=torch.float64)
        tokens = 0
        for i in range(0, len(texts), batch_size):
            batch = tokenize_batch(tokenizer, texts[i : i + batch_size], max_length, device)
            d, b, x, e, xe = skip_layer_distances(model, batch, reduce, ref_layers)
            d_sum += d.double().sum(1)
            b_sum += b.double().sum(1)
            if x is not None:
                x_sum += x.double().sum(1)
            tokens += int(batch["attention_mask"].sum())
            evals += e
            delta_evals += xe
            batches += 1
            bar.update(1)
        importance[name] = (d_sum / len(texts)).tolist()
        influence[name] = (b_sum / len(texts)).tolist()
        deltas[name] = (x_sum / len(texts)).tolist()
        n_prompts[name] = len(texts)
        n_tokens[name] = tokens
    bar.close()
    return ProbeScan(
        sets=list(prompts),
        num_layers=L,
        importance=importance,
        block_influence=influence,
        prompts=n_prompts,
        tokens=n_tokens,
        layer_evals=evals,
        naive_layer_evals=batches * L * L,
        batches=batches,
        seconds=time.perf_counter() - start,
        reduce=reduce,
        delta=deltas if reference is not None else None,
        delta_layer_evals=delta_evals,
    )


# --------------------------------------------------------------------------------------------------
# probe prompts


def load_probe_prompts(probes_cfg, resolve: Callable[[str], str] | None = None) -> dict[str, list[str]]:
    """The prompts of every probe set of ``probes_cfg`` (a ``ProbesConfig``): the first ``n`` non-blank
    values of column ``field``.

    ``source`` goes through ``resolve`` first (maps ``zoo://`` URIs; other strings pass unchanged). An
    existing local json/jsonl/csv/parquet/txt file is read with ``datasets.load_dataset(<format>,
    data_files=...)``; anything else is taken as a Hub dataset id (``subset``, ``split``).
    """
    import datasets

    out: dict[str, list[str]] = {}
    for name, s in probes_cfg.sets.items():
        src = resolve(s.source) if resolve is not None else s.source
        where = f"probes.sets.{name}.source={s.source!r}" + (f" (resolved to {src!r})" if src != s.source else "")
        path = Path(str(src)).expanduser()
        fmt = _DATA_FORMATS.get(path.suffix.lower())
        try:
            if path.exists():
                if fmt is None:
                    raise ValueError(f"{where}: unsupported file type {path.suffix!r}; use {sorted(_DATA_FORMATS)}")
                ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
            elif fmt is not None or str(src).startswith(("/", ".", "~")) or "://" in str(src):
                raise FileNotFoundError(f"{where}: file not found")
            else:
                ds = datasets.load_dataset(str(src), s.subset, split=s.split)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:  # datasets raises many kinds; name the probe set and the source
            raise RuntimeError(f"{where}: could not load the dataset ({type(e).__name__}: {e})") from e
        if s.field not in ds.column_names:
            raise ValueError(f"{where}: no column {s.field!r}; columns are {ds.column_names}")
        texts = []
        for v in ds[s.field]:
            if isinstance(v, str) and v.strip():
                texts.append(v)
                if len(texts) >= s.n:
                    break
        if not texts:
            raise ValueError(f"{where}: column {s.field!r} has no non-blank text")
        if len(texts) < s.n:
            log.warning("probe set %s: %d prompts available, %d asked for", name, len(texts), s.n)
        out[name] = texts
    if not out:
        raise ValueError("probes.sets is empty: give at least one probe set")
    return out
