"""Static scan: statistics of each parent's tensors and of each tensor pair, streamed one tensor at a time.

Per tensor T: L2 norm, standard deviation, Shannon entropy of the value histogram (``bins`` equal bins
between T's finite min and max, in bits), NaN and Inf counts. Per pair (A, B): cosine(A, B) and the
relative delta norm ||B - A|| / ||A||. Large tensors are processed in chunks so no float32 copy of a
whole embedding matrix is needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# elements per chunk when a tensor is reduced piecewise (float64 accumulators; 64 MiB of float32)
_CHUNK = 1 << 24


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor (finite values only, except the NaN/Inf counts)."""

    numel: int
    norm: float
    std: float
    entropy: float
    nan: int
    inf: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairStats:
    """How far the mother's tensor is from the father's: cosine and ||B - A|| / ||A||."""

    cosine: float
    rel_delta: float

    def to_dict(self) -> dict:
        return asdict(self)


def _chunks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i : i + _CHUNK].to(torch.float64)


def tensor_stats(t: torch.Tensor, bins: int = 256) -> TensorStats:
    """Norm, std, histogram entropy and NaN/Inf counts of ``t``.

    entropy = -sum_i p_i log2 p_i, p_i = share of finite values in bin i of ``bins`` equal bins over
    [min, max]; 0 for a constant tensor, log2(bins) at most. std is the population std (ddof 0).
    """
    if bins < 2:
        raise ValueError(f"tensor_stats: bins={bins} must be >= 2")
    n_nan = n_inf = 0
    count = 0
    total = 0.0
    sq = 0.0
    lo, hi = math.inf, -math.inf
    for c in _chunks(t):
        nan = torch.isnan(c)
        inf = torch.isinf(c)
        n_nan += int(nan.sum())
        n_inf += int(inf.sum())
        if n_nan or n_inf:
            c = c[~(nan | inf)]
        if c.numel() == 0:
            continue
        count += c.numel()
        total += float(c.sum())
        sq += float((c * c).sum())
        lo = min(lo, float(c.min()))
        hi = max(hi, float(c.max()))
    if count == 0:
        return TensorStats(t.numel(), 0.0, 0.0, 0.0, n_nan, n_inf)
    mean = total / count
    # second pass for the variance (sum of squared deviations) and the histogram: exact, chunked
    ssd = 0.0
    hist = torch.zeros(bins, dtype=torch.float64, device=t.device)
    for c in _chunks(t):
        if n_nan or n_inf:
            c = c[torch.isfinite(c)]
        if c.numel() == 0:
            continue
        ssd += float(((c - mean) ** 2).sum())
        if hi > lo:
            idx = ((c - lo) / (hi - lo) * bins).floor().clamp_(0, bins - 1).to(torch.long)
            hist += torch.bincount(idx, minlength=bins).to(torch.float64)
    if hi > lo:
        p = hist[hist > 0] / count
        entropy = float(-(p * torch.log2(p)).sum())
    else:
        entropy = 0.0
    return TensorStats(
        numel=t.numel(),
        norm=math.sqrt(sq),
        std=math.sqrt(ssd / count),
        entropy=max(entropy, 0.0),
        nan=n_nan,
        inf=n_inf,
    )


def pair_stats(a: torch.Tensor, b: torch.Tensor) -> PairStats:
    """cosine(a, b) = <a, b> / (||a|| ||b||) and rel_delta = ||b - a|| / ||a|| (over finite entries).

    A zero tensor has cosine 1 with another zero tensor and 0 with anything else; rel_delta is inf when
    ||a|| = 0 and b is not zero.
    """
    if a.shape != b.shape:
        raise ValueError(f"pair_stats: shapes differ, father {tuple(a.shape)} vs mother {tuple(b.shape)}")
    dot = na = nb = nd = 0.0
    for ca, cb in zip(_chunks(a), _chunks(b)):
        ok = torch.isfinite(ca) & torch.isfinite(cb)
        if not bool(ok.all()):
            ca, cb = ca[ok], cb[ok]
        dot += float((ca * cb).sum())
        na += float((ca * ca).sum())
        nb += float((cb * cb).sum())
        nd += float(((cb - ca) ** 2).sum())
    na, nb, nd = math.sqrt(na), math.sqrt(nb), math.sqrt(nd)
    if na == 0.0 or nb == 0.0:
        cosine = 1.0 if na == nb else 0.0
    else:
        cosine = max(-1.0, min(1.0, dot / (na * nb)))
    rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
    return PairStats(cosine=cosine, rel_delta=rel)


def static_score(s: TensorStats, w_entropy: float, w_std: float, w_norm: float, norm_cap: float) -> float:
    """Darwin's static term: w_entropy*H + w_std*std + w_norm*min(norm, norm_cap)."""
    return w_entropy * s.entropy + w_std * s.std + w_norm * min(s.norm, norm_cap)


class TensorSource(Protocol):
    """What the static scan reads: tensor names and one tensor at a time (the I/O layer's reader)."""

    names: list[str]

    def get(self, name: str) -> torch.Tensor: ...


@dataclass
class StaticScan:
    """Static statistics of both parents and of each pair, keyed by canonical tensor name."""

    father: dict[str, TensorStats]
    mother: dict[str, TensorStats]
    pair: dict[str, PairStats]

    def to_dict(self) -> dict:
        return {
            "father": {k: v.to_dict() for k, v in self.father.items()},
            "mother": {k: v.to_dict() for k, v in self.mother.items()},
            "pair": {k: v.to_dict() for k, v in self.pair.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "StaticScan":
        return cls(
            father={k: TensorStats(**v) for k, v in d["father"].items()},
            mother={k: TensorStats(**v) for k, v in d["mother"].items()},
            pair={k: PairStats(**v) for k, v in d["pair"].items()},
        )


def static_scan(
    father: TensorSource,
    mother: TensorSource,
    bins: int = 256,
    names: Iterable[str] | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> StaticScan:
    """Stream both parents tensor by tensor: stats of each, pair stats where both have the tensor.

    A tensor only one parent has gets its own stats and no pair entry (logged); shapes that differ are
    an error naming the tensor. ``device``: where the reductions run (a GPU makes large models fast).
    """
    f_names, m_names = list(father.names), set(mother.names)
    f_set = set(f_names)
    order = list(names) if names is not None else f_names + sorted(m_names - f_set)
    out = StaticScan({}, {}, {})
    only = []
    for name in tqdm(order, desc="MRI static scan", unit="tensor", disable=not progress):
        a = father.get(name).to(device) if name in f_set else None
        b = mother.get(name).to(device) if name in m_names else None
        if a is not None:
            out.father[name] = tensor_stats(a, bins)
        if b is not None:
            out.mother[name] = tensor_stats(b, bins)
        if a is not None and b is not None:
            if a.shape != b.shape:
                raise ValueError(
                    f"tensor {name!r}: father shape {tuple(a.shape)} != mother shape {tuple(b.shape)}; "
                    "the parents must share one architecture"
                )
            out.pair[name] = pair_stats(a, b)
        else:
            only.append(name)
        del a, b
    if only:
        log.warning("%d tensor(s) in only one parent (no pair stats), e.g. %s", len(only), only[:3])
    bad = [n for n, s in list(out.father.items()) + list(out.mother.items()) if s.nan or s.inf]
    if bad:
        log.warning("NaN/Inf values in %d tensor(s), e.g. %s", len(bad), bad[:3])
    return out
