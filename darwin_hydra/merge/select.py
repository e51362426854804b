"""Exact ranks of a tensor that is only ever seen a chunk at a time.

TIES keeps the ``density`` share of a delta's entries with the largest magnitude; Model Breadcrumbs
keeps a window of ranks (dropping the smallest and the largest ``gamma`` share). Entries are
ordered by magnitude, **ties broken by flat index** (an earlier entry ranks lower), so every rank
is one entry and exactly k entries are kept even when many magnitudes are equal (they are: deltas
of bf16 checkpoints take a few thousand distinct values, the median one often shared by 20% of a
tensor).

A rank boundary r ("the entries of rank >= r") is then (v, j): v = the value of rank r, j = how
many entries equal to v rank below r. ``RankBoundary`` turns it into a mask chunk by chunk.

Finding v (Floyd-Rivest style), instead of sorting the tensor (mergekit: a full ``argsort``,
~100 ns an entry and a float32 copy):

1. a sample of S = min(65,536, (2n)^(2/3)) entries at fixed pseudo-random positions brackets each
   wanted rank: [lo, hi] = sample order statistics at r/n -/+ 4 binomial standard deviations (+8);
2. one pass over the chunks counts the entries below ``lo``, equal to ``lo``, equal to ``hi``,
   and keeps the few strictly inside (lo, hi);
3. the answer is lo, hi or a partition of those kept when the bracket holds the rank; otherwise
   (rare: a sample that misrepresents the tensor) one more pass gathers the whole tensor.

Every answer is exact, so it depends neither on chunking nor on threads or device.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

MAX_SAMPLE = 1 << 16
SMALL = 1 << 18  # tensors up to this size are simply gathered whole
_POS_MULT = 2654435761  # a prime: i -> i*P mod n visits spread-out positions


def sample_size(n: int) -> int:
    """Balances partitioning the sample against selecting among the kept: about (2n)^(2/3)."""
    return int(min(MAX_SAMPLE, max(1024, (2 * n) ** (2 / 3))))


@functools.lru_cache(maxsize=64)
def _positions(n: int) -> torch.Tensor:
    i = torch.arange(min(sample_size(n), n), dtype=torch.int64)
    return ((i * _POS_MULT) % n).sort().values  # sorted: the gathers walk memory forwards


def sample_positions(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``sample_size(n)`` pseudo-random, deterministic flat positions in [0, n), ascending."""
    return _positions(n).to(device)


def _count(x) -> int:
    return int(np.count_nonzero(x)) if isinstance(x, np.ndarray) else int(x.sum())


def _kth(values: torch.Tensor, k: int) -> float:
    """k-th smallest (1-based) of a 1-D tensor (numpy's introselect on the CPU: ~2x kthvalue)."""
    if values.device.type == "cpu":
        return float(np.partition(values.numpy(), k - 1)[k - 1])
    return float(values.kthvalue(k).values)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.empty(0)
    if parts[0].device.type == "cpu":
        return torch.from_numpy(np.concatenate([p.numpy() for p in parts]))
    return torch.cat(parts)


class RankSelector:
    """For each 1-based rank k in ``ks`` of a float tensor of ``n`` entries: (v, below), v = the
    k-th smallest value, below = how many entries are smaller than v.

    ``sample``: the tensor's values at ``sample_positions(n)``, or None (small tensors: every chunk
    is kept). Feed every chunk (any order) to ``update``, then call ``result``; if that returns
    None, feed every chunk to ``update_full`` and call ``result_full``.
    """

    def __init__(self, n: int, ks: Sequence[int], sample: torch.Tensor | None):
        self.n = n
        self.ks = [int(k) for k in ks]
        for k in self.ks:
            if not 1 <= k <= n:
                raise ValueError(f"rank {k} outside 1..{n}")
        self.small = sample is None or n <= SMALL
        self.brackets: list[tuple[float, float]] = []
        if not self.small:
            s = sample.float().cpu().numpy()
            m = s.size
            idx = []
            for k in self.ks:
                q = (k - 0.5) / n
                margin = 4.0 * math.sqrt(m * q * (1 - q)) + 8
                idx.append((math.floor(q * m - margin), math.ceil(q * m + margin)))
            inner = sorted({i for pair in idx for i in pair if 0 <= i < m})
            part = np.partition(s, inner) if inner else s
            for i_lo, i_hi in idx:
                lo = float(part[i_lo]) if i_lo >= 0 else -math.inf
                hi = float(part[i_hi]) if i_hi < m else math.inf
                self.brackets.append((lo, hi))
        nb = len(self.brackets)
        self.below, self.eq_lo, self.eq_hi = [0] * nb, [0] * nb, [0] * nb
        self.kept: list[list[torch.Tensor]] = [[] for _ in range(nb)]
        self.full: list[torch.Tensor] = []

    def update(self, values: torch.Tensor) -> None:
        """Count and keep what this chunk contributes (``values`` itself is not retained)."""
        if self.small:
            self.full.append(values.reshape(-1).clone())
            return
        # on the CPU numpy's bool comparisons and boolean indexing are ~5x faster than torch's
        v = values.numpy() if values.device.type == "cpu" else values
        for j, (lo, hi) in enumerate(self.brackets):
            self.below[j] += _count(v < lo)
            self.eq_lo[j] += _count(v == lo)
            if hi != lo:
                self.eq_hi[j] += _count(v == hi)
                inside = v[(v > lo) & (v < hi)]
                self.kept[j].append(torch.from_numpy(inside) if isinstance(inside, np.ndarray) else inside)

    def result(self) -> list[tuple[float, int]] | None:
        if self.small:
            return self.result_full()
        out = []
        for j, k in enumerate(self.ks):
            lo, hi = self.brackets[j]
            below, eq_lo = self.below[j], self.eq_lo[j]
            kept = _cat(self.kept[j])
            if k <= below:
                return None
            if k <= below + eq_lo:
                out.append((lo, below))
                continue
            r = k - below - eq_lo
            if r <= kept.numel():
                v = _kth(kept, r)
                out.append((v, below + eq_lo + _count(kept < v)))
                continue
            if hi != lo and r <= kept.numel() + self.eq_hi[j]:
                out.append((hi, below + eq_lo + kept.numel()))
                continue
            return None
        self.kept = [[] for _ in self.ks]
        return out

    def update_full(self, values: torch.Tensor) -> None:
        self.full.append(values.reshape(-1).clone())

    def result_full(self) -> list[tuple[float, int]]:
        allv = _cat(self.full)
        self.full = []
        out = []
        for k in self.ks:
            v = _kth(allv, k)
            out.append((v, _count(allv < v)))
        return out


class RankBoundary:
    """Mask of the entries of rank >= r (order: magnitude, then flat index), chunk by chunk.

    ``v``, ``below``: the value of rank r and the count of entries smaller than it
    (``RankSelector``), so the first j = r - below entries equal to v rank below r. Chunks must be
    given in flat order, each once (a running count of the ties seen so far places them).
    """

    def __init__(self, r: int, v: float, below: int):
        self.v, self.j, self.seen = v, r - below, 0

    def mask(self, a: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        """Float 1.0/0.0 of ``a`` (a chunk's magnitudes) into ``out``; ``tmp``: scratch."""
        if self.seen >= self.j:  # every tie from here on ranks >= r
            return torch.ge(a, self.v, out=out)
        eq = torch.eq(a, self.v, out=tmp)
        n_eq = _count(eq)
        torch.gt(a, self.v, out=out)
        if self.seen + n_eq > self.j:  # this chunk holds the j-th tie: keep the ties after it
            after = torch.cumsum(eq, 0).gt_(self.j - self.seen)  # exact: counts < 2^24 per chunk
            out.add_(eq.mul_(after))
        self.seen += n_eq
        return out
