"""The two tensor layouts of transformers 5: canonical names on disk, fused tensors in memory.

On disk (and everywhere in darwin-hydra: MRI, genome, merge) a MoE layer's routed experts are
per-expert 2-D weights, ``...mlp.experts.{e}.gate_proj.weight`` (I, H), ``up_proj`` (I, H) and
``down_proj`` (H, I) (Mixtral: ``block_sparse_moe.experts.{e}.w1/w3/w2``). In memory transformers 5
fuses them while loading (``transformers/conversion_mapping.py``, entries "qwen2_moe" and
"mixtral": ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``)::

    experts.gate_up_proj  (E, 2I, H):  [e, :I] = experts.{e}.gate_proj.weight,  [e, I:] = up_proj
    experts.down_proj     (E, H, I):   [e]     = experts.{e}.down_proj.weight

``param_views(model)`` maps every canonical name to a view into the model's own parameter or
buffer storage, so that ``views[name].copy_(t)`` sets the model exactly as ``from_pretrained``
would with ``t`` stored under ``name``. Names and shapes come from transformers' own reverse
conversion (what ``save_pretrained`` would write, run on meta tensors: no copy), the views from
the converter's operations; the two are checked against each other. Tied weights (an ``lm_head``
tied to the embeddings) appear once, under the name save_pretrained keeps.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class LayoutError(NotImplementedError):
    """A model stores weights in a layout ``param_views`` cannot express as views."""


def _conversions(model: nn.Module) -> list:
    """The weight transforms ``save_pretrained`` reverses for ``model`` (as in transformers'
    ``revert_weight_conversion``): the ones recorded by ``from_pretrained``, else the registered
    mapping without prefix changes (a model built from a config)."""
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return list(conversions or [])


def saved_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The in-memory tensors ``save_pretrained`` would save (state dict less tied duplicates),
    sharing storage with the model."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(model.state_dict(), model)


def _find(pattern: str, key: str) -> re.Match | None:
    pattern = pattern.removeprefix("^")
    return re.search(re.escape(pattern).replace(r"\*", r"\d+"), key)


def _converter_views(key: str, t: torch.Tensor, converter) -> dict[str, torch.Tensor]:
    """Per-source views of one fused in-memory tensor, under pre-renaming canonical names."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", []) or [])
    targets = list(converter.target_patterns)
    sources = list(converter.source_patterns)
    match = next((m for tp in targets if (m := _find(tp, key)) is not None), None)
    if match is None or len(targets) != 1:
        raise LayoutError(f"{key}: converter {converter!r} has targets {targets} this layout cannot map")
    kinds = [type(op) for op in ops]
    if kinds == [MergeModulelist] and len(sources) == 1:
        d, cat_dim = ops[0].dim, None
    elif kinds == [MergeModulelist, Concatenate] and len(sources) >= 1 and ops[1].dim != ops[0].dim:
        d, cat_dim = ops[0].dim, ops[1].dim
    else:
        raise LayoutError(
            f"{key}: transformers converts it with {ops} from {sources}; darwin_hydra.io.layout maps only "
            "MergeModulelist [+ Concatenate] (the qwen2_moe / mixtral expert layouts) to views"
        )
    n = len(sources)
    if cat_dim is not None and t.shape[cat_dim] % n:
        raise LayoutError(f"{key}: dim {cat_dim} of shape {tuple(t.shape)} does not split into {n} equal parts")
    part = t.shape[cat_dim] // n if cat_dim is not None else None
    views: dict[str, torch.Tensor] = {}
    for j, src in enumerate(sources):
        block = t.narrow(cat_dim, j * part, part) if cat_dim is not None else t
        for e in range(t.shape[d]):
            name = key[: match.start()] + src.removeprefix("^").replace("*", str(e)) + key[match.end() :]
            views[name] = block.select(d, e)
    return views


def param_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every canonical (on-disk) tensor name of ``model`` -> a view into its parameter/buffer storage.

    Order: the order ``save_pretrained`` writes (transformers' natural sort of names). Writing
    ``views[name].copy_(t)`` sets the model as loading a checkpoint with ``t`` under ``name`` would.
    Raises ``LayoutError`` for a conversion that is not a pure view (none of the seeds' architectures).
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings, revert_weight_conversion

    state = saved_state_dict(model)
    conversions = _conversions(model)
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    key_of = {id(t): k for k, t in meta.items()}
    canonical = revert_weight_conversion(model, dict(meta)) if conversions else meta
    views: dict[str, torch.Tensor] = {}
    fused_names: dict[str, tuple[int, ...]] = {}
    passed = set()
    for name, mt in canonical.items():
        k = key_of.get(id(mt))
        if k is not None:
            views[name] = state[k]
            passed.add(k)
        else:
            views[name] = None  # type: ignore[assignment]  # filled below, keeps the order
            fused_names[name] = tuple(mt.shape)
    if not fused_names:
        return views
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    mine: dict[str, torch.Tensor] = {}
    for key in state:
        if key in passed:
            continue
        conv = next((c for c in converters if any(_find(tp, key) for tp in c.target_patterns)), None)
        if conv is None:
            raise LayoutError(f"{key}: transformers saves it under other names, through no converter this layout knows")
        for name, view in _converter_views(key, state[key], conv).items():
            mine[apply_renamings(name, renamings) if renamings else name] = view
    if set(mine) != set(fused_names) or any(tuple(mine[n].shape) != s for n, s in fused_names.items()):
        extra, missing = sorted(set(mine) - set(fused_names)), sorted(set(fused_names) - set(mine))
        shapes = [n for n in fused_names if n in mine and tuple(mine[n].shape) != fused_names[n]]
        raise LayoutError(
            f"{type(model).__name__}: the expert views disagree with transformers' save_pretrained names: "
            f"unexpected {extra[:3]}, missing {missing[:3]}, wrong shape {shapes[:3]}"
        )
    for name in fused_names:
        views[name] = mine[name]
    return views


def load_from(model: nn.Module, tensors, strict: bool = True) -> list[str]:
    """Copy canonical tensors (a ``CheckpointReader``, a mapping, or ``(name, tensor)`` pairs) into
    ``model`` through ``param_views``; returns the names of the model left unset. ``strict``: also
    raise when a tensor has no place in the model or the model has names left unset."""
    views = param_views(model)
    if hasattr(tensors, "iter_tensors"):
        items = tensors.iter_tensors()
    elif isinstance(tensors, Mapping):
        items = tensors.items()
    else:
        items = tensors
    seen: set[str] = set()
    with torch.no_grad():
        for name, t in items:
            view = views.get(name)
            if view is None:
                if strict:
                    raise KeyError(f"{name}: no such tensor in {type(model).__name__} (canonical names: see param_views)")
                continue
            if tuple(view.shape) != tuple(t.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit the model's {tuple(view.shape)}")
            view.copy_(t)
            seen.add(name)
    unset = [n for n in views if n not in seen]
    if strict and unset:
        raise KeyError(f"{len(unset)} tensor(s) of {type(model).__name__} were not given, e.g. {unset[:3]}")
    return unset


def split_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per-expert views ``{"gate_proj", "up_proj", "down_proj"}`` (nn.Linear weight orientation) of the
    fused layout: ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)."""
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3 or gate_up_proj.shape[0] != down_proj.shape[0]:
        raise ValueError(f"expected (E, 2I, H) and (E, H, I), got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    inter = gate_up_proj.shape[1] // 2
    return [
        {"gate_proj": gate_up_proj[e, :inter], "up_proj": gate_up_proj[e, inter:], "down_proj": down_proj[e]}
        for e in range(gate_up_proj.shape[0])
    ]


def fuse_experts(experts: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused ``(gate_up_proj (E, 2I, H), down_proj (E, H, I))`` of per-expert weights; inverse of ``split_experts``."""
    gate_up = torch.stack([torch.cat([e["gate_proj"], e["up_proj"]], dim=0) for e in experts])
    down = torch.stack([e["down_proj"] for e in experts])
    return gate_up, down
