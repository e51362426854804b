"""The merge methods' kernels: each method's whole-tensor statistics, then a function of one chunk.

Formulas in ``methods`` (and docs/merge.md). ``method_kernel(method, parents, recipe, seed)`` runs a
method's statistics over ``chunks.Parents`` (TIES thresholds, slerp's and Model Stock's cosines)
and returns the function that merges one ``chunks.Chunk``, in place in its buffers. ``ties`` and
``linear`` are the two combinations the batched in-memory path (``batched``) shares with them.
"""

from __future__ import annotations

import math

import torch

from darwin_hydra.merge.chunks import Chunk, Parents
from darwin_hydra.merge.config import METHODS
from darwin_hydra.merge.masks import dare_mask, father_bits, keep_threshold, mother_bits, uniform_bits
from darwin_hydra.merge.select import SMALL, RankBoundary, RankSelector

__all__ = ["FAMILY", "delta_weights", "linear", "method_kernel", "ties"]

# method -> (sparsification, consensus) for the task-arithmetic family
FAMILY = {
    "task_arithmetic": (None, None),
    "dare_linear": ("dare", None),
    "dare_ties": ("dare", "ties"),
    "ties": ("trim", "ties"),
    "breadcrumbs": ("crumbs", None),
    "breadcrumbs_ties": ("crumbs", "ties"),
    "della": ("della", "ties"),
    "della_linear": ("della", None),
}


def delta_weights(recipe) -> tuple[float, float]:
    """(wA, wB) = s (1 - r, r): the weights of the father's and the mother's deltas."""
    return recipe.scale * (1.0 - recipe.ratio), recipe.scale * recipe.ratio


def ties(x: torch.Tensor | None, y: torch.Tensor | None, scratch=(None, None, None)) -> torch.Tensor | None:
    """TIES sign election of two weighted deltas: S = + where x + y >= 0 (mergekit's rule at 0),
    keep the terms of sign S: max(x,0) + max(y,0) where S = +, else min(x,0) + min(y,0). In x's
    buffer (y is overwritten); ``scratch``: three float32 tensors of x's size (else allocated)."""
    if x is None or y is None:
        return y if x is None else x
    up = torch.add(x, y, out=scratch[0])
    torch.ge(up, 0.0, out=up)
    pos = torch.clamp_min(x, 0.0, out=scratch[1]).add_(torch.clamp_min(y, 0.0, out=scratch[2]))
    neg = x.clamp_max_(0.0).add_(y.clamp_max_(0.0))
    # lerp(a, b, w) is exactly a at w = 0 and exactly b at w = 1 (torch evaluates b - (b-a)(1-w) for w >= 0.5)
    return torch.lerp(neg, pos, up, out=neg)


def linear(a: torch.Tensor, b: torch.Tensor, wa, wb, out: torch.Tensor | None = None,
           tmp: torch.Tensor | None = None) -> torch.Tensor:
    """wa a + wb b, computed as (wa a) + (wb b) in float32 (the linear method with (1 - r, r),
    slerp's last step, the blend of two methods). ``wa``/``wb``: numbers, or tensors of one weight
    per element. ``out``/``tmp``: where wa a / wb b go (may be ``a``/``b`` themselves); else allocated."""
    return torch.mul(a, wa, out=out).add_(torch.mul(b, wb, out=tmp))


# --------------------------------------------------------------------------------------------------
# per-delta sparsification, in place on the delta's buffer
#
# Masks are float tensors (1.0 keep / 0.0 drop) written with ``out=``: on the CPU, comparisons and
# selects that produce or consume bool tensors cost 3-20x more than float arithmetic.


def _select(P: Parents, ranks: dict[str, list[int]]) -> dict[str, list[tuple[float, int]]]:
    """(k-th smallest, count below it) of |dA| ("a") / |dB| ("b") for the wanted 1-based ranks:
    one streamed pass over the tensor (two when a sample bracket misses), see select.py."""
    samples = P.samples(list(ranks)) if P.n > SMALL else {}
    sels = {w: RankSelector(P.n, ks, samples.get(w)) for w, ks in ranks.items()}

    def feed(sels: dict, full: bool) -> None:
        for ch in P.chunks():
            for w, sel in sels.items():
                d = ch.da() if w == "a" else ch.db()
                v = torch.abs(d, out=ch.scratch(0))
                sel.update_full(v) if full else sel.update(v)

    feed(sels, False)
    results = {w: sel.result() for w, sel in sels.items()}
    missing = {w: sel for w, sel in sels.items() if results[w] is None}
    if missing:
        feed(missing, True)
        for w, sel in missing.items():
            results[w] = sel.result_full()
    return results


def _crumb_bounds(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs keeps ascending-magnitude ranks [n_bot, n_bot + target) (0-based)."""
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return n_bot, n_bot + target


def _sparsifier(kind: str | None, P: Parents, recipe, roles: tuple[str, ...]):
    """A function (chunk, which, d, w) -> w * sparsified d, in d's buffer, after any statistics."""
    dens = {"a": recipe.density_a, "b": recipe.density_b}
    if kind is None:
        return lambda ch, which, d, w: d.mul_(w)
    if kind == "dare":

        def dare(ch, which, d, w):
            q = keep_threshold(dens[which])
            if q >= 65536:
                return d.mul_(w)
            mask = dare_mask(ch.bits, which == "a", q, out=ch.scratch(0), tmp=ch.scratch(8, torch.int32))
            return d.mul_(mask).mul_(w / dens[which])

        return dare
    if kind == "trim":
        # keep the k = max(1, int(density n)) largest: the entries of rank >= n - k
        rank = {w: P.n - max(1, int(dens[w] * P.n)) for w in roles if dens[w] < 1.0}
        found = _select(P, {w: [r + 1] for w, r in rank.items()}) if rank else {}
        bound = {w: RankBoundary(rank[w], *found[w][0]) for w in found}

        def trim(ch, which, d, w):
            if which in bound:
                a = torch.abs(d, out=ch.scratch(0))
                d.mul_(bound[which].mask(a, ch.scratch(1), ch.scratch(2)))
            return d.mul_(w)

        return trim
    if kind == "crumbs":
        # keep the ranks [lo, hi): drop the lo smallest and the n - hi largest
        window, ranks = {}, {}
        for which in roles:
            if dens[which] >= 1.0:
                continue
            window[which] = lo, hi = _crumb_bounds(P.n, dens[which], recipe.gamma)
            ranks[which] = [r + 1 for r in (lo, hi) if 0 < r < P.n]
        found = _select(P, ranks) if ranks else {}
        bounds = {}
        for which, (lo, hi) in window.items():
            vals = iter(found.get(which, []))
            b_lo = RankBoundary(lo, *next(vals)) if 0 < lo < P.n else None
            b_hi = RankBoundary(hi, *next(vals)) if 0 < hi < P.n else None
            bounds[which] = (b_lo, b_hi)

        empty = {which for which, (lo, hi) in window.items() if hi <= lo or lo >= P.n}

        def crumbs(ch, which, d, w):
            if which not in window:
                return d.mul_(w)
            lo, hi = window[which]
            b_lo, b_hi = bounds[which]
            if which in empty:
                return d.zero_()
            a = torch.abs(d, out=ch.scratch(0))
            if b_lo is not None:
                d.mul_(b_lo.mask(a, ch.scratch(1), ch.scratch(2)))
            if b_hi is not None:  # 1 - (rank >= hi)
                d.mul_(b_hi.mask(a, ch.scratch(1), ch.scratch(2)).neg_().add_(1.0))
            return d.mul_(w)

        crumbs.discards = empty  # deltas dropped whole: the finite check covers their parent apart
        return crumbs
    if kind == "della":
        eps = recipe.epsilon
        cols = P.rows[1] if len(P.shape) >= 2 else P.n  # DELLA ranks a 1-D tensor as one row

        def della(ch, which, d, w):
            p0 = dens[which]
            if p0 >= 1.0:
                return d.mul_(w)
            mag = d.abs().view(-1, max(cols, 1))
            m, k = mag.shape
            order = mag.argsort(dim=1, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(k, device=d.device).expand(m, k))
            rel = rank.float().mul_(1.0 / (k - 1)) if k > 1 else torch.full_like(mag, 0.5)
            p = rel.mul_(2 * eps).add_(p0 - eps).clamp_(1e-4, 1.0).view(-1)
            bits = (father_bits(ch.bits) if which == "a" else mother_bits(ch.bits)).float()
            keep = torch.lt(bits, p.mul(65536.0), out=ch.scratch(0))
            return d.mul_(keep.div_(p)).mul_(w)

        return della
    raise ValueError(f"unknown sparsification {kind!r}")



def _family_kernel(method: str, P: Parents, recipe, seed: int):
    kind, consensus = FAMILY[method]
    wa, wb = delta_weights(recipe)
    # dA is zero without a base, and weightless at r = 1: skip its statistics and arithmetic
    roles = ("b",) if P.c is None or wa == 0.0 else ("a", "b")
    if wb == 0.0:
        roles = tuple(r for r in roles if r != "b")
    if kind == "della":
        if len(P.shape) >= 2:
            P.row_aligned = True  # per-row ranks need whole rows in a chunk
        elif P.n > P.chunk:
            P.chunk = P.n  # a 1-D tensor is one row: one chunk
    sparsify = _sparsifier(kind, P, recipe, roles)
    random = kind == "della" or (kind == "dare" and min(recipe.density_a, recipe.density_b) < 1.0)

    def apply(ch: Chunk) -> torch.Tensor:
        if random:
            ch.bits = uniform_bits(seed, ch.s, ch.e - ch.s, out=ch.scratch(9, torch.int32), tmp=ch.scratch(8, torch.int32))
        x = sparsify(ch, "a", ch.da(), wa) if "a" in roles else None
        y = sparsify(ch, "b", ch.db(), wb) if "b" in roles else None
        if consensus == "ties":
            delta = ties(x, y, (ch.scratch(0), ch.scratch(1), ch.scratch(2)))
        else:
            delta = y if x is None else (x if y is None else x.add_(y))
        if delta is None:  # nothing of either delta: the base itself
            return ch.c if ch.c is not None else ch.a
        return delta.add_(ch.base)

    # inputs the output does not depend on (a weightless delta, or one dropped whole): the finite
    # check sums them itself
    gone = getattr(sparsify, "discards", set())
    unread = tuple(r for r in ("a", "b") if (r not in roles or r in gone) and (r == "b" or P.c is not None))
    return apply, unread


def _slerp_kernel(P: Parents, recipe):
    """Slerp of the whole tensor as one vector (as mergekit 0.1.5): its norms and dot product are
    accumulated chunk by chunk, in chunk order, then every chunk is ca A + cb B."""
    r, eps = recipe.ratio, recipe.slerp_eps
    na2 = nb2 = ab = 0.0
    for ch in P.chunks():
        s = ch.scratch(0)
        na2 += float(torch.mul(ch.a, ch.a, out=s).sum(dtype=torch.float64))
        nb2 += float(torch.mul(ch.b, ch.b, out=s).sum(dtype=torch.float64))
        ab += float(torch.mul(ch.a, ch.b, out=s).sum(dtype=torch.float64))
    na, nb = math.sqrt(na2), math.sqrt(nb2)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    cos = min(max(ab / (na * nb), -1.0), 1.0)
    if abs(cos) > 1.0 - eps:  # nearly (anti)parallel: linear interpolation
        ca, cb = 1.0 - r, r
    else:
        theta = math.acos(cos)
        ca, cb = math.sin((1.0 - r) * theta) / math.sin(theta), math.sin(r * theta) / math.sin(theta)

    def apply(ch: Chunk) -> torch.Tensor:
        return linear(ch.a, ch.b, ca, cb, out=ch.a, tmp=ch.b)

    return apply


def _model_stock_kernel(P: Parents, recipe):
    if P.c is None:
        raise ValueError(f"tensor {P.name!r}: model_stock needs a base model (parents.base): "
                         "with the father as base it is undefined")
    dot = na2 = nb2 = 0.0
    for ch in P.chunks():
        da, db = ch.da(), ch.db()
        s = ch.scratch(0)
        dot += float(torch.mul(da, db, out=s).sum(dtype=torch.float64))
        na2 += float(torch.mul(da, da, out=s).sum(dtype=torch.float64))
        nb2 += float(torch.mul(db, db, out=s).sum(dtype=torch.float64))
    cos = dot / max(math.sqrt(na2) * math.sqrt(nb2), 1e-6)
    cos = min(max(cos, -1.0), 1.0)
    t = 0.0 if abs(1.0 + cos) < 1e-6 else 2.0 * cos / (1.0 + cos)

    def apply(ch: Chunk) -> torch.Tensor:
        return ch.a.add_(ch.b).mul_(0.5 * t).add_(ch.c.mul_(1.0 - t))

    return apply


def _linear_kernel(P: Parents, recipe):
    r = recipe.ratio

    def apply(ch: Chunk) -> torch.Tensor:
        return linear(ch.a, ch.b, 1.0 - r, r, out=ch.a, tmp=ch.b)

    return apply


def method_kernel(method: str, P: Parents, recipe, seed: int):
    """Run ``method``'s whole-tensor statistics (if any) and return its chunk function and the
    inputs ("a", "b", "c") its output does not depend on."""
    no_base = ("c",) if P.c is not None else ()  # linear and slerp read only A and B
    if method == "linear":
        return _linear_kernel(P, recipe), no_base
    if method == "slerp":
        return _slerp_kernel(P, recipe), no_base
    if method == "model_stock":
        return _model_stock_kernel(P, recipe), ()
    if method in FAMILY:
        return _family_kernel(method, P, recipe, seed)
    raise ValueError(f"tensor {P.name!r}: unknown merge method {method!r}; choose one of {METHODS}")
