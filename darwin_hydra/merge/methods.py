"""Merge methods as pure functions of one tensor of each parent.

Notation: A = father, B = mother, b = base (the father when no base is given), r = the mother's
share (``recipe.ratio``), dA = A - b, dB = B - b, s = ``recipe.scale``, w = (1 - r, r).
Maths in float32, the result cast to the father's dtype (or ``out_dtype``) once at the end.

    linear            child = (1 - r) A + r B
    slerp             child = sin((1-r) t)/sin t A + sin(r t)/sin t B,  t = angle(A, B) of the whole
                      tensors as vectors; linear where |cos t| > 1 - slerp_eps (nearly (anti)parallel)
    task_arithmetic   child = b + s ((1-r) dA + r dB)
    dare_linear       child = b + s ((1-r) DARE(dA, density_a) + r DARE(dB, density_b))
    dare_ties         child = b + s TIES((1-r) DARE(dA), r DARE(dB))              (Darwin's default)
    ties              child = b + s TIES((1-r) TRIM(dA, density_a), r TRIM(dB, density_b))
    breadcrumbs       child = b + s ((1-r) CRUMB(dA) + r CRUMB(dB))
    breadcrumbs_ties  child = b + s TIES((1-r) CRUMB(dA), r CRUMB(dB))
    della             child = b + s TIES((1-r) MAGPRUNE(dA), r MAGPRUNE(dB))
    della_linear      child = b + s ((1-r) MAGPRUNE(dA) + r MAGPRUNE(dB))
    model_stock       child = t (A + B)/2 + (1 - t) b,  t = 2c/(1 + c),  c = cos(dA, dB) over the
                      whole tensor (t = 0 when 1 + c ~ 0); r is not used; needs a real base

    DARE(d, p)        drop each entry with probability 1 - p, survivors times 1/p (masks: masks.py)
    TRIM(d, p)        keep the k = max(1, int(p n)) entries of largest |d|
    CRUMB(d, p)       drop the n_top = int(gamma n) largest and the n - int(p n) - n_top smallest |d|
                      (breadcrumbs; no-op at p = 1)
                      (TRIM and CRUMB order entries by |d|, ties by flat index: exactly k are kept)
    MAGPRUNE(d, p)    DELLA: per row, keep probability p_i = p - eps + 2 eps rank_i/(cols-1) by
                      magnitude rank (clipped to [1e-4, 1]), survivors times 1/p_i
    TIES(x, y)        sign election per entry, S = + where x + y >= 0 else -; keep the terms whose
                      sign is S: where S = +, max(x,0) + max(y,0), else min(x,0) + min(y,0)

With no base, dA = 0 and every TIES/DARE variant reduces to Darwin V5's rule child = A + r DARE(B - A).
``method_weight`` w blends: child = w method + (1 - w) blend_method (blend masks use another seed).
Differences from mergekit 0.1.5, all on purpose, are in docs/merge.md.

Everything is computed a chunk at a time (``chunks.CHUNK_CPU`` elements, whole rows where DELLA ranks
per row): memory is a few float32 chunks beside the inputs and the output, and chunks stay in cache.
The chunks are ``chunks.Parents``; each method's statistics and chunk function are in ``kernels``;
this module applies a recipe to one tensor (``merge_tensor``).
Whole-tensor statistics (TIES thresholds; slerp's and Model Stock's cosines) are exact order statistics
(select.py) or sums accumulated in chunk order, so the result never depends on thread count or on
the order tensors are merged in. Random masks are a function of (seed, element index) (masks.py).
"""

from __future__ import annotations

import torch

from darwin_hydra.merge.chunks import (
    NonFiniteTensorError,
    Parents,
    check_finite,
    check_finite_chunked,
    is_stored,
    thread_buffer,
)
from darwin_hydra.merge.kernels import linear, method_kernel

__all__ = ["BLEND_SALT", "NonFiniteTensorError", "check_finite", "merge_tensor", "streams"]

BLEND_SALT = 0x5BD1E9955BD1E995  # the blend method's masks differ from the main method's


def streams(recipe) -> bool:
    """Whether ``merge_tensor`` reads ``recipe``'s parents chunk by chunk, so that they can stay in
    their files (``StoredTensor``): every merge method does; a transplant (the parent's tensor
    itself) or copied router rows need the tensors whole."""
    return recipe.transplant_side() is None and not recipe.rows_from


# --------------------------------------------------------------------------------------------------
# one tensor


def merge_tensor(
    father: torch.Tensor,
    mother: torch.Tensor,
    base: torch.Tensor | None,
    recipe,
    seed: int,
    *,
    name: str = "tensor",
    device: torch.device | str | None = None,
    out_dtype: torch.dtype | None = None,
    sink=None,
) -> torch.Tensor | None:
    """The child's tensor under ``recipe`` (a ``TensorRecipe``); ``seed``: the tensor's mask seed
    (``recipe.tensor_seed(genome_hash, name)``); ``name`` only names the tensor in errors.

    ``sink``: instead of returning the tensor, hand it to ``sink(piece)`` a chunk at a time, in order
    (flat, in ``out_dtype``, valid until the next call), and return None: the export writes them
    straight to the file, holding no output tensor. Only for recipes that ``streams``.

    Returns a tensor of ``out_dtype`` (default: the father's dtype) on ``device`` (default: the
    father's). Transplanted tensors (``recipe.transplant_side()``) come back as the parent's tensor
    itself (a copy when ``rows_from`` replaces rows from the other parent); non-floating tensors
    (integer buffers) are the father's. NaN/Inf in an input raise
    ``NonFiniteTensorError`` naming the parent and the tensor.

    Parents may be ``StoredTensor``s (left in their files; ``device`` is then required): they are read
    chunk by chunk when the recipe ``streams`` (on a CUDA device each chunk is read on the CPU and
    copied to the device's chunk buffer), and loaded whole otherwise.
    """
    from darwin_hydra.merge.recipe import FATHER

    if sink is not None and not (streams(recipe) and father.is_floating_point()):
        raise ValueError(f"tensor {name!r}: a transplant, copied rows or an integer tensor cannot be merged into a sink")
    if any(is_stored(t) for t in (father, mother, base)):
        if device is None:
            raise ValueError(f"tensor {name!r}: stored (on-disk) parents need an explicit merge device")
        if not (streams(recipe) and father.is_floating_point()):
            father, mother, base = (t.load() if is_stored(t) else t for t in (father, mother, base))
    side = recipe.transplant_side()
    if side is not None:
        t = father if side == FATHER else mother
        check_finite_chunked(t, side, name)
        if out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype:
            t = t.to(out_dtype)
        t = t if device is None else t.to(device)
        rows = tuple((who, r) for who, r in (recipe.rows_from or ()) if who != side)  # its own rows: as they are
        if rows:
            t = _rows_from(t.clone(), rows, father, mother, name, recipe.rows_gain)
        return t
    if not father.is_floating_point():
        return father if device is None else father.to(device)
    for role, t in (("mother", mother), ("base", base)):
        if t is not None and tuple(t.shape) != tuple(father.shape):
            raise ValueError(f"tensor {name!r}: {role} shape {tuple(t.shape)} != father shape {tuple(father.shape)}")
    dev = torch.device(device) if device is not None else father.device
    P = Parents(father, mother, base, dev, name)
    w = recipe.method_weight
    if w >= 1.0:
        plan = [(recipe.method, seed)]
    elif w <= 0.0:
        plan = [(recipe.blend_method, seed ^ BLEND_SALT)]
    else:
        plan = [(recipe.method, seed), (recipe.blend_method, seed ^ BLEND_SALT)]
    kernels = [method_kernel(m, P, recipe, s) for m, s in plan]  # runs whole-tensor statistics
    unread = kernels[0][1]  # the first kernel's output is always in y: what it reads is checked there
    dtype = out_dtype or father.dtype
    out = torch.empty(P.n, dtype=dtype, device=dev) if sink is None else None
    for s, e in P.ranges():
        # each kernel's chunk in its own buffers (tag): the method's and the blend method's
        z = [kernel(P.load(s, e, tag=str(i), check=unread if i == 0 else ())) for i, (kernel, _) in enumerate(kernels)]
        y = z[0] if len(z) == 1 else linear(z[0], z[1], w, 1.0 - w, out=z[0], tmp=z[1])  # w method + (1-w) blend
        P.add_to_check(y)
        if sink is None:
            out[s:e].copy_(y)
        else:
            sink(thread_buffer("out", e - s, dtype, dev).copy_(y))
    P.check_finite()
    if sink is not None:
        return None
    out = out.view(P.shape)
    if recipe.rows_from:
        out = _rows_from(out, recipe.rows_from, father, mother, name, recipe.rows_gain)
    return out


def _rows_from(
    out: torch.Tensor, rows_from, father: torch.Tensor, mother: torch.Tensor, name: str, gain: float = 1.0
) -> torch.Tensor:
    """Rows ``rows`` of ``out`` (in place) from parent ``who``, scaled by gain * s, s = mean ||out_j||
    / mean ||src_j|| over the rows j that no entry replaces: a router row keeps its direction from
    the parent it comes from and competes at the scale of the child's router (a fine-tune's router
    can have rows 10x longer than the base's; an unscaled row from the other parent would then never
    win a top-k); ``gain`` (the genome's revive_gain) lets it compete harder."""
    from darwin_hydra.merge.recipe import FATHER

    n = out.shape[0]
    listed = sorted({int(r) for _, rows in rows_from for r in rows})
    bad = [r for r in listed if not 0 <= r < n]
    if bad:
        raise ValueError(f"tensor {name!r}: rows_from names rows {bad}, outside its {n} rows")
    rest = torch.ones(n, dtype=torch.bool)
    rest[listed] = False
    num = out[rest.to(out.device)].float().norm(dim=-1).mean() if bool(rest.any()) else None
    for who, rows in rows_from:
        src = father if who == FATHER else mother
        check_finite_chunked(src, who, name)
        idx = torch.tensor(sorted({int(r) for r in rows}), dtype=torch.long)
        s = 1.0
        if num is not None:
            den = src[rest.to(src.device)].float().norm(dim=-1).mean().to(num.device)
            s = float(num / den) if float(den) > 0 else 1.0
        s *= gain
        rows_src = src[idx.to(src.device)].to(device=out.device, dtype=torch.float32)
        out[idx.to(out.device)] = (rows_src if s == 1.0 else rows_src * s).to(out.dtype)
    return out
