"""Many small tensors merged as one: the in-memory mode's fast path for search trials.

A trial on a small model re-merges every tensor; per tensor, the chunked kernels of ``methods``
cost ~40 torch calls (~150 us) whatever the size, so a 150-tensor model spends ~20 ms of pure
overhead a trial. Here the parents of all tensors are concatenated once (float32, flat) and the
per-tensor recipe parameters are spread over the elements, so a whole trial is ~30 torch calls.

Only methods without whole-tensor statistics qualify: dare_ties, dare_linear, task_arithmetic
(optionally blended with linear: Darwin's merge_method_weight), with 0 < ratio < 1 and no
transplant or copied rows; everything else goes through ``methods.merge_tensor``. Both paths run
the same functions (``masks.lowbias32_`` and ``masks.dare_mask``, ``kernels.ties`` and
``kernels.linear``), here with one float32 weight per element where ``methods`` has a scalar (the
same float32 value), so both give bit-identical children.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from darwin_hydra.merge.kernels import FAMILY, delta_weights, linear, ties
from darwin_hydra.merge.masks import dare_mask, keep_threshold, lowbias32_, seed_key
from darwin_hydra.merge.recipe import TensorRecipe, tensor_seed

# the methods without whole-tensor statistics (no sparsification, or DARE) -> their consensus
BATCHABLE = {m: consensus for m, (kind, consensus) in FAMILY.items() if kind in (None, "dare")}


def batchable(recipe: TensorRecipe) -> tuple | None:
    """The batch group of ``recipe`` ((method, blend or None)), or None when it needs merge_tensor."""
    if recipe.method not in BATCHABLE or recipe.transplant_side() is not None or recipe.rows_from:
        return None
    if not 0.0 < recipe.ratio < 1.0 or recipe.method_weight <= 0.0 or recipe.scale == 0.0:
        return None
    if recipe.method_weight < 1.0:
        return (recipe.method, "linear") if recipe.blend_method == "linear" else None
    return (recipe.method, None)


class BatchedParents:
    """Father, mother (and base) of the float tensors ``names``, concatenated as float32 on ``device``.
    Each parent's tensors are taken once (``father[name]``: a tensor, or read from its file)."""

    def __init__(self, names: Sequence[str], father: Mapping, mother: Mapping, base: Mapping | None, device):
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.device = torch.device(device)
        fathers = [father[n] for n in self.names]
        self.sizes = [t.numel() for t in fathers]
        self.dtypes = [t.dtype for t in fathers]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)

        def flat(tensors):
            return torch.cat([t.reshape(-1).to(self.device, torch.float32) for t in tensors])

        self.a = flat(fathers)
        del fathers
        self.b = flat(mother[n] for n in self.names)
        self.c = None if base is None else flat(base[n] for n in self.names)
        self.db = self.b - (self.a if self.c is None else self.c)
        self.da = None if self.c is None else self.a - self.c
        self.idx = torch.cat([torch.arange(s, dtype=torch.int32) for s in self.sizes]).to(self.device)
        self._sizes_t = torch.tensor(self.sizes, device=self.device)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held: the float32 parents and deltas, and the int32 element indices."""
        held = [t for t in (self.a, self.b, self.c, self.da, self.db, self.idx) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def _spread(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """One value per tensor -> one per element (``float32(value)``, as torch rounds a scalar)."""
        return torch.repeat_interleave(torch.tensor(values, dtype=dtype, device=self.device), self._sizes_t)

    def merge(self, recipes: Mapping[str, TensorRecipe], genome_hash: str) -> dict[str, torch.Tensor]:
        """The child of every tensor in ``recipes`` (all of one ``batchable`` group), each in its
        father's dtype. Tensors of the batch not in ``recipes`` are computed with neutral weights
        and not returned."""
        group = {batchable(r) for r in recipes.values()}
        if len(group) != 1 or None in group:
            raise ValueError(f"recipes of one batch must share one batchable group, got {group}")
        method, blend = group.pop()
        n = len(self.names)
        wa, wb, fa, fb, qa, qb, mult, add, w, omw, r, omr = ([0.0] * n for _ in range(12))
        dense = FAMILY[method][0] is None  # task_arithmetic: no masks
        for name, rec in recipes.items():
            i = self.index[name]
            wa[i], wb[i] = delta_weights(rec)
            fa[i] = wa[i] if dense else wa[i] / rec.density_a
            fb[i] = wb[i] if dense else wb[i] / rec.density_b
            qa[i] = 65536 if dense else keep_threshold(rec.density_a)
            qb[i] = 65536 if dense else keep_threshold(rec.density_b)
            mult[i], add[i] = seed_key(tensor_seed(genome_hash, name))
            w[i], omw[i], r[i], omr[i] = rec.method_weight, 1.0 - rec.method_weight, rec.ratio, 1.0 - rec.ratio
        # DARE masks: u(i) = lowbias32(i * m + k), the father's bits high, the mother's low (masks.py)
        u = self.idx * self._spread(mult, torch.int32)
        u.add_(self._spread(add, torch.int32))
        lowbias32_(u)
        y = self.db * dare_mask(u, False, self._spread(qb, torch.int32))
        y.mul_(self._spread(fb, torch.float32))
        base = self.a if self.c is None else self.c
        if self.da is None:  # the father is the base: dA = 0 contributes nothing
            delta = y
        else:
            x = self.da * dare_mask(u, True, self._spread(qa, torch.int32))
            x.mul_(self._spread(fa, torch.float32))
            delta = ties(x, y) if BATCHABLE[method] == "ties" else x.add_(y)
        out = delta.add_(base)
        if blend == "linear":  # w method + (1 - w) linear, as methods.merge_tensor blends
            lin = linear(self.a, self.b, self._spread(omr, torch.float32), self._spread(r, torch.float32))
            out = linear(out, lin, self._spread(w, torch.float32), self._spread(omw, torch.float32), out=out, tmp=lin)
        res = {}
        for name in recipes:
            i = self.index[name]
            seg = out[self.offsets[i] : self.offsets[i + 1]]
            res[name] = seg if self.dtypes[i] == torch.float32 else seg.to(self.dtypes[i])
        return res
