"""The merge engine: one per-tensor function (``merge_tensor``), two modes.

- export (``merge_to_disk``): tensors streamed from the parents' files through a thread pool into the
  sharded writer, in the father's tensor order; memory is bounded by the tensors in flight
  (``max_inflight_bytes``), never the model.
- in memory (``InMemoryMerger``): the child written into an already loaded model's parameters
  (through ``darwin_hydra.io.layout.param_views``, fused MoE experts included), for search trials.

Both call ``merge_tensor``, whose random masks come from a CPU generator seeded by
(genome_hash, tensor name): the same genome gives a bit-identical child whatever the thread
count, the tensor order or the device.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import torch

from darwin_hydra.merge.methods import combine
from darwin_hydra.merge.recipe import FATHER, RatioMap, TensorRecipe, tensor_seed

log = logging.getLogger(__name__)


class NonFiniteTensorError(ValueError):
    """A parent tensor holds NaN or Inf."""


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"merge.device={device!r} but torch sees no CUDA device; use merge.device=cpu")
    return torch.device(device)


def _check_finite(t: torch.Tensor, role: str, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteTensorError(
            f"{role} tensor {name!r} holds {n_nan} NaN and {n_inf} Inf values: fix or replace that checkpoint "
            "before merging"
        )


def merge_tensor(
    name: str,
    father: torch.Tensor,
    mother: torch.Tensor,
    base: torch.Tensor | None,
    recipe: TensorRecipe,
    genome_hash: str,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Merge one tensor under its recipe; returns a tensor of the father's dtype (on ``device``).

    Transplanted tensors come back as the parent's tensor itself (bit for bit). Non-float tensors
    (integer buffers) are the father's. NaN/Inf in an input raise ``NonFiniteTensorError`` naming it.
    """
    side = recipe.transplant_side()
    if side is not None:
        return father if side == FATHER else mother
    if not father.is_floating_point():
        return father
    device = torch.device(device)
    for role, t in (("father", father), ("mother", mother), ("base", base)):
        if t is not None:
            if t.shape != father.shape:
                raise ValueError(f"tensor {name!r}: {role} shape {tuple(t.shape)} != father shape {tuple(father.shape)}")
            _check_finite(t, role, name)
    a = father.to(device=device, dtype=torch.float32)
    b = mother.to(device=device, dtype=torch.float32)
    c = None if base is None else base.to(device=device, dtype=torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(genome_hash, name))
    kw = dict(
        density_a=recipe.density_a,
        density_b=recipe.density_b,
        scale=recipe.scale,
        gamma=recipe.gamma,
        epsilon=recipe.epsilon,
        slerp_eps=recipe.slerp_eps,
        gen=gen,
    )
    out = combine(recipe.method, a, b, c, recipe.ratio, **kw)
    w = recipe.method_weight
    if w < 1.0:
        other = combine(recipe.blend_method, a, b, c, recipe.ratio, **kw)
        out = out * w + other * (1.0 - w)
    if recipe.rows_from:
        for who, rows in recipe.rows_from:
            src = a if who == FATHER else b
            idx = torch.tensor(rows, dtype=torch.long, device=device)
            out[idx] = src[idx]
    return out.to(father.dtype)


def _workers(n: int) -> int:
    return n if n > 0 else max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _check_map(names: list[str], ratio_map: Mapping[str, TensorRecipe], others: dict) -> None:
    missing = [n for n in names if n not in ratio_map]
    if missing:
        raise KeyError(f"the ratio map has no recipe for {len(missing)} tensor(s), e.g. {missing[:5]}")
    for role, reader in others.items():
        if reader is None:
            continue
        absent = [n for n in names if n not in reader]
        if absent:
            raise KeyError(f"the {role} checkpoint {reader.path} lacks {len(absent)} tensor(s), e.g. {absent[:5]}")


def merge_to_disk(
    father,
    mother,
    base,
    ratio_map: RatioMap,
    genome_hash: str,
    out_dir: str | Path,
    *,
    workers: int = 0,
    device: str = "cpu",
    max_shard_bytes: int = 2_000_000_000,
    extra_files: Mapping[str, str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_inflight_bytes: int = 768 * 2**20,
) -> Path:
    """Stream the child of ``father``/``mother`` (and ``base``) readers into ``out_dir``.

    Tensors are merged by ``workers`` threads (0 = one per core) and written in the father's order;
    at most ``max_inflight_bytes`` of float32 work is scheduled at once (one tensor always may).
    Everything lands in ``out_dir`` atomically, with ``checksums.json`` and ``extra_files``.
    """
    from tqdm.auto import tqdm

    from darwin_hydra.io.checkpoint import CheckpointWriter

    names = list(father.names)
    _check_map(names, ratio_map, {"mother": mother, "base": base})
    dev = resolve_device(device)
    n_workers = _workers(workers)

    def job(name: str) -> torch.Tensor:
        out = merge_tensor(
            name,
            father.get(name),
            mother.get(name),
            base.get(name) if base is not None else None,
            ratio_map[name],
            genome_hash,
            dev,
        )
        return out.cpu()

    def cost(name: str) -> int:
        return 6 * 4 * max(1, father.nbytes(name) // max(father.dtype(name).itemsize, 1))

    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, source_dir=father.path, overwrite=overwrite) as w:
        bar = tqdm(total=len(names), desc="merge", unit="tensor", disable=not progress, leave=False)
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="merge") as pool:
            queue: deque = deque()
            inflight = 0
            it = iter(names)
            pending = next(it, None)
            while pending is not None or queue:
                while pending is not None and (not queue or (len(queue) < 2 * n_workers and inflight + cost(pending) <= max_inflight_bytes)):
                    queue.append((pending, cost(pending), pool.submit(job, pending)))
                    inflight += cost(pending)
                    pending = next(it, None)
                name, c, fut = queue.popleft()
                w.add(name, fut.result())
                inflight -= c
                bar.update(1)
        bar.close()
        for rel, text in (extra_files or {}).items():
            w.write_text(rel, text)
    log.info("merged %d tensors into %s (%d worker(s), %s)", len(names), out_dir, n_workers, dev)
    return Path(out_dir)


class InMemoryMerger:
    """Writes children into one loaded model, trial after trial.

    ``father``/``mother``/``base``: name -> tensor (the canonical on-disk names), read once.
    ``apply`` re-merges only tensors whose recipe changed since the last call (or whose random
    masks changed with the genome hash) and copies them into the model's parameters in place.
    """

    def __init__(self, model, father: Mapping[str, torch.Tensor], mother: Mapping[str, torch.Tensor],
                 base: Mapping[str, torch.Tensor] | None = None, device: str = "cpu"):
        from darwin_hydra.io.layout import param_views

        self.model = model
        self.views = param_views(model)
        self.father, self.mother, self.base = dict(father), dict(mother), (dict(base) if base is not None else None)
        self.device = resolve_device(device)
        missing = sorted(set(self.views) - set(self.father))
        extra = sorted(set(self.father) - set(self.views))
        if missing or extra:
            raise KeyError(
                f"the loaded model and the parents' tensors differ: model-only {missing[:5]}, parents-only {extra[:5]}"
            )
        self._last: dict[str, tuple] = {}
        self.merged_last = 0

    @torch.no_grad()
    def apply(self, ratio_map: Mapping[str, TensorRecipe], genome_hash: str) -> int:
        """Write the child of ``ratio_map`` into the model; returns how many tensors were re-merged."""
        n = 0
        for name, view in self.views.items():
            recipe = ratio_map[name]
            key = (recipe, genome_hash if recipe.random else None)
            if self._last.get(name) == key:
                continue
            out = merge_tensor(
                name,
                self.father[name],
                self.mother[name],
                self.base[name] if self.base is not None else None,
                recipe,
                genome_hash,
                self.device,
            )
            view.copy_(out)
            self._last[name] = key
            n += 1
        self.merged_last = n
        return n
