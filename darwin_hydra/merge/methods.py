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

Everything is computed a chunk at a time (``CHUNK_CPU`` elements, whole rows where DELLA ranks
per row): memory is a few float32 chunks beside the inputs and the output, and chunks stay in cache.
Whole-tensor statistics (TIES thresholds; slerp's and Model Stock's cosines) are exact order statistics
(select.py) or sums accumulated in chunk order, so the result never depends on thread count or on
the order tensors are merged in. Random masks are a function of (seed, element index) (masks.py).
"""

from __future__ import annotations

import math
import threading

import torch

from darwin_hydra.merge.config import METHODS
from darwin_hydra.merge.masks import dare_mask, father_bits, keep_threshold, mother_bits, uniform_bits
from darwin_hydra.merge.select import SMALL, RankBoundary, RankSelector, sample_positions

CHUNK_CPU = 1 << 18  # 1 MiB of float32 per operand: a chunk's working set stays in L2/L3
CHUNK_CUDA = 1 << 22
BLEND_SALT = 0x5BD1E9955BD1E995  # the blend method's masks differ from the main method's

# method -> (sparsification, consensus) for the task-arithmetic family
_FAMILY = {
    "task_arithmetic": (None, None),
    "dare_linear": ("dare", None),
    "dare_ties": ("dare", "ties"),
    "ties": ("trim", "ties"),
    "breadcrumbs": ("crumbs", None),
    "breadcrumbs_ties": ("crumbs", "ties"),
    "della": ("della", "ties"),
    "della_linear": ("della", None),
}

class NonFiniteTensorError(ValueError):
    """A parent tensor holds NaN or Inf."""


# --------------------------------------------------------------------------------------------------
# scratch buffers: every chunk op writes into a few per-thread buffers (no allocation, and the
# working set stays a few MiB, in cache); measured ~2x faster than allocating results on a CPU

_tls = threading.local()
_SCRATCH = tuple(f"s{i}" for i in range(10))


def _buffer(tag: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer ``tag`` with at least ``n`` elements (a view of n)."""
    try:
        bufs = _tls.bufs
    except AttributeError:
        bufs = _tls.bufs = {}
    key = (tag, dtype, device)
    t = bufs.get(key)
    if t is None or t.numel() < n:
        t = torch.empty(n, dtype=dtype, device=device)
        if n <= 4 * CHUNK_CUDA:  # keep ordinary sizes; a huge one-off (a 1-D DELLA row) is freed after use
            bufs[key] = t
    # most chunks are full: the buffer itself, without a fresh view (~2 us a call, ~12 calls a chunk)
    return t if t.numel() == n else t[:n]


class _Chunk:
    """One chunk [s, e) of father (a), mother (b), base (c; None = the father), as float32 scratch
    buffers. ``da()``/``db()`` turn a/b into deltas in place (a is then no longer the father)."""

    __slots__ = ("s", "e", "a", "b", "c", "bits", "tag", "_da", "_db")

    def __init__(self, s, e, a, b, c, tag):
        self.s, self.e, self.a, self.b, self.c, self.tag = s, e, a, b, c, tag
        self.bits = None  # 32 random bits per element (masks.uniform_bits), drawn by random methods
        self._da = self._db = False

    @property
    def base(self) -> torch.Tensor:
        if self.c is None and self._da:
            raise RuntimeError("the father's chunk was turned into a delta")
        return self.a if self.c is None else self.c

    def da(self) -> torch.Tensor:
        """A - base, in a's buffer (only with a real base: without one dA = 0)."""
        if not self._da:
            self.a.sub_(self.c)
            self._da = True
        return self.a

    def db(self) -> torch.Tensor:
        """B - base, in b's buffer."""
        if not self._db:
            self.b.sub_(self.base)
            self._db = True
        return self.b

    def scratch(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _buffer(_SCRATCH[i], self.e - self.s, dtype, self.a.device)


def _is_stored(t) -> bool:
    """A tensor left in its file (``io.checkpoint.StoredTensor``: ``read(start, stop)``), not in memory."""
    return t is not None and not isinstance(t, torch.Tensor) and hasattr(t, "read")


def _span(flat, s: int, e: int) -> torch.Tensor:
    """Elements [s, e) of a flat tensor or of a ``StoredTensor`` (read from its file)."""
    return flat.read(s, e) if _is_stored(flat) else flat[s:e]


class Parents:
    """One tensor of each parent, flat, on the merge device; yields float32 chunks.

    A parent may be a ``StoredTensor`` (export mode on the CPU, recipes that ``streams``): its
    chunks are then read from the file as they are needed."""

    def __init__(self, father, mother, base, device, name: str = "tensor"):
        self.name = name
        self.shape = tuple(father.shape)
        self.device = torch.device(device)
        self.roles = {"father": father, "mother": mother, "base": base}

        def flat(t):
            if t is None or _is_stored(t):
                if t is not None and self.device.type != "cpu":
                    raise ValueError(f"tensor {name!r}: stored (on-disk) parents merge on the CPU only")
                return t
            return t.reshape(-1).to(self.device)

        self.a, self.b, self.c = flat(father), flat(mother), flat(base)
        self.stored = any(_is_stored(t) for t in (father, mother, base))
        self.n = self.a.numel()
        self.chunk = CHUNK_CUDA if self.device.type == "cuda" else CHUNK_CPU
        self.row_aligned = False  # set by methods that work per row (della)
        self._sum = None

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, cols) of the leading-axis view (a 0-d or 1-D tensor: one column per element)."""
        if len(self.shape) == 0:
            return 1, 1
        r = self.shape[0]
        return r, (self.n // r if r else 0)

    def ranges(self):
        size = self.chunk
        if self.row_aligned:
            cols = max(self.rows[1], 1)
            size = max(1, size // cols) * cols
        return [(s, min(self.n, s + size)) for s in range(0, self.n, size)]

    def load(self, s: int, e: int, tag: str = "", check: tuple[str, ...] = ()) -> _Chunk:
        """Chunk [s, e) in this thread's buffers ``tag``; ``check``: the inputs ("a", "b", "c") to
        add to the finite check (those the kernel does not read; see ``add_to_check``)."""
        n = e - s

        def get(src, t: str):
            if src is None:
                return None
            return _buffer(t + tag, n, torch.float32, self.device).copy_(_span(src, s, e))

        a, b, c = get(self.a, "a"), get(self.b, "b"), get(self.c, "c")
        for x in (a if "a" in check else None, b if "b" in check else None, c if "c" in check else None):
            if x is not None:
                self.add_to_check(x)
        return _Chunk(s, e, a, b, c, tag)

    def add_to_check(self, x: torch.Tensor) -> None:
        """Add ``x``'s sum to the finite check. The merge adds every output chunk (float32, before the
        cast): NaN and Inf propagate through the kernels' arithmetic (a dropped entry is multiplied
        by 0, and 0 x Inf = NaN), so one sum covers every input the output depends on; a kernel names
        the inputs it ignores or drops whole (``_kernel``), and their chunks are added here too."""
        t = x.sum()
        self._sum = t if self._sum is None else self._sum + t

    def chunks(self):
        for s, e in self.ranges():
            yield self.load(s, e)

    def check_finite(self) -> None:
        """Raise ``NonFiniteTensorError`` naming the tensor and the parent when the summed chunks
        were not finite (and an exact count confirms it: huge finite values may overflow a sum)."""
        if self._sum is None or bool(torch.isfinite(self._sum)):
            return
        for role, t in self.roles.items():
            if t is None:
                continue
            if _is_stored(t):  # a chunk at a time: an overflowing but finite merge loads nothing whole
                check_finite_chunked(t, role, self.name)
            else:
                check_finite(t, role, self.name)

    def samples(self, which: list[str]) -> dict[str, torch.Tensor]:
        """|dA| ("a") and/or |dB| ("b") at ``select.sample_positions(n)``."""
        pos = sample_positions(self.n, self.device)
        if not self.stored:
            base = (self.a if self.c is None else self.c)[pos].float()
            return {w: ((self.a if w == "a" else self.b)[pos].float() - base).abs_() for w in which}
        # parents in their files: one pass over the chunks, gathering the (ascending) positions each
        # holds straight from the bytes read, before converting (the same float32 differences as
        # above; converting whole chunks for ~1% of their entries cost ties 3% of its CPU at the
        # benchmark's size)
        out = {w: torch.empty(pos.numel(), dtype=torch.float32) for w in which}
        base = self.a if self.c is None else self.c
        ranges = self.ranges()
        cuts = torch.searchsorted(pos, torch.tensor([s for s, _ in ranges] + [self.n], dtype=pos.dtype)).tolist()
        for (s, e), lo, hi in zip(ranges, cuts[:-1], cuts[1:]):
            if lo == hi:
                continue
            at = pos[lo:hi] - s
            c = _span(base, s, e)[at].float()  # a read is valid until the thread's next one: gather first
            for w in which:
                torch.sub(_span(self.a if w == "a" else self.b, s, e)[at].float(), c, out=out[w][lo:hi]).abs_()
        return out


def _non_finite(role: str, name: str, n_nan: int, n_inf: int) -> NonFiniteTensorError:
    return NonFiniteTensorError(
        f"{role} tensor {name!r} holds {n_nan} NaN and {n_inf} Inf values: fix or replace that checkpoint before merging"
    )


def check_finite(t: torch.Tensor, role: str, name: str) -> None:
    """Raise ``NonFiniteTensorError`` if floating ``t`` holds NaN or Inf, naming ``role`` and ``name``."""
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise _non_finite(role, name, n_nan, int(bad.sum()) - n_nan)


def check_finite_chunked(t, role: str, name: str) -> None:
    """As ``check_finite``, a chunk at a time: a float32 sum per chunk, and only when their total is
    not finite a second pass that counts exactly. ``t``: a tensor, or a ``StoredTensor`` (read from
    its file; never loaded whole)."""
    if not t.is_floating_point():
        return
    n = t.numel()
    src = t if _is_stored(t) else t.reshape(-1)
    device = torch.device("cpu") if _is_stored(t) else src.device

    def chunks():
        for s in range(0, n, CHUNK_CPU):
            e = min(n, s + CHUNK_CPU)
            yield _buffer("a", e - s, torch.float32, device).copy_(_span(src, s, e))

    total = None
    for x in chunks():
        total = x.sum() if total is None else total + x.sum()
    if total is None or bool(torch.isfinite(total)):
        return
    n_nan = n_bad = 0
    for x in chunks():
        n_nan += int(torch.isnan(x).sum())
        n_bad += int((~torch.isfinite(x)).sum())
    if n_bad:
        raise _non_finite(role, name, n_nan, n_bad - n_nan)


# --------------------------------------------------------------------------------------------------
# per-delta sparsification, in place on the delta's buffer
#
# Masks are float tensors (1.0 keep / 0.0 drop) written with ``out=``: on the CPU, comparisons and
# selects that produce or consume bool tensors cost 3-20x more than float arithmetic.


def _weights(recipe) -> tuple[float, float]:
    return recipe.scale * (1.0 - recipe.ratio), recipe.scale * recipe.ratio


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


def _ties(ch: _Chunk, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    """TIES sign election of two weighted deltas: S = + where x + y >= 0 (mergekit's rule at 0),
    keep the terms of sign S: max(x,0) + max(y,0) where S = +, else min(x,0) + min(y,0). In x's buffer."""
    if x is None or y is None:
        return y if x is None else x
    up = torch.add(x, y, out=ch.scratch(0))
    torch.ge(up, 0.0, out=up)
    pos = torch.clamp_min(x, 0.0, out=ch.scratch(1)).add_(torch.clamp_min(y, 0.0, out=ch.scratch(2)))
    neg = x.clamp_max_(0.0).add_(y.clamp_max_(0.0))
    # lerp(a, b, w) is exactly a at w = 0 and exactly b at w = 1 (torch evaluates b - (b-a)(1-w) for w >= 0.5)
    return torch.lerp(neg, pos, up, out=neg)


def _family_kernel(method: str, P: Parents, recipe, seed: int):
    kind, consensus = _FAMILY[method]
    wa, wb = _weights(recipe)
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

    def apply(ch: _Chunk) -> torch.Tensor:
        if random:
            ch.bits = uniform_bits(seed, ch.s, ch.e - ch.s, out=ch.scratch(9, torch.int32), tmp=ch.scratch(8, torch.int32))
        x = sparsify(ch, "a", ch.da(), wa) if "a" in roles else None
        y = sparsify(ch, "b", ch.db(), wb) if "b" in roles else None
        if consensus == "ties":
            delta = _ties(ch, x, y)
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

    def apply(ch: _Chunk) -> torch.Tensor:
        return ch.a.mul_(ca).add_(ch.b.mul_(cb))

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

    def apply(ch: _Chunk) -> torch.Tensor:
        return ch.a.add_(ch.b).mul_(0.5 * t).add_(ch.c.mul_(1.0 - t))

    return apply


def _linear_kernel(P: Parents, recipe):
    r = recipe.ratio

    def apply(ch: _Chunk) -> torch.Tensor:
        return ch.a.mul_(1.0 - r).add_(ch.b.mul_(r))

    return apply


def _kernel(method: str, P: Parents, recipe, seed: int):
    """Run ``method``'s whole-tensor statistics (if any) and return its chunk function and the
    inputs ("a", "b", "c") its output does not depend on."""
    no_base = ("c",) if P.c is not None else ()  # linear and slerp read only A and B
    if method == "linear":
        return _linear_kernel(P, recipe), no_base
    if method == "slerp":
        return _slerp_kernel(P, recipe), no_base
    if method == "model_stock":
        return _model_stock_kernel(P, recipe), ()
    if method in _FAMILY:
        return _family_kernel(method, P, recipe, seed)
    raise ValueError(f"tensor {P.name!r}: unknown merge method {method!r}; choose one of {METHODS}")


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

    Parents may be ``StoredTensor``s (left in their files): they are read chunk by chunk when the
    recipe ``streams`` on the CPU, and loaded whole otherwise (``device`` is then required).
    """
    from darwin_hydra.merge.recipe import FATHER

    if sink is not None and not (streams(recipe) and father.is_floating_point()):
        raise ValueError(f"tensor {name!r}: a transplant, copied rows or an integer tensor cannot be merged into a sink")
    if any(_is_stored(t) for t in (father, mother, base)):
        if device is None:
            raise ValueError(f"tensor {name!r}: stored (on-disk) parents need an explicit merge device")
        if not (streams(recipe) and father.is_floating_point() and torch.device(device).type == "cpu"):
            father, mother, base = (t.load() if _is_stored(t) else t for t in (father, mother, base))
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
        plan = [(recipe.method, seed, 1.0)]
    elif w <= 0.0:
        plan = [(recipe.blend_method, seed ^ BLEND_SALT, 1.0)]
    else:
        plan = [(recipe.method, seed, w), (recipe.blend_method, seed ^ BLEND_SALT, 1.0 - w)]
    kernels = [(*_kernel(m, P, recipe, s), wt) for m, s, wt in plan]  # runs whole-tensor statistics
    unread = kernels[0][1]  # the first kernel's output is always in y: what it reads is checked there
    dtype = out_dtype or father.dtype
    out = torch.empty(P.n, dtype=dtype, device=dev) if sink is None else None
    for s, e in P.ranges():
        y = None
        for i, (kernel, _, wt) in enumerate(kernels):
            z = kernel(P.load(s, e, tag=str(i), check=unread if i == 0 else ()))
            y = z if wt == 1.0 else (z.mul_(wt) if y is None else y.add_(z.mul_(wt)))
        P.add_to_check(y)
        if sink is None:
            out[s:e].copy_(y)
        else:
            sink(_buffer("out", e - s, dtype, dev).copy_(y))
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
