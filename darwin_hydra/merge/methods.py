"""Merge methods as pure functions on tensors.

Notation: A = father, B = mother, b = base (the father when no base is given), r = the mother's
share, dA = A - b, dB = B - b, s = scale. All maths in float32; the engine casts back.

    linear          child = (1 - r) A + r B
    slerp           child = sin((1-r)t)/sin(t) A + sin(r t)/sin(t) B,  t = angle(A, B);
                    linear when |cos t| > 1 - slerp_eps (nearly parallel)
    task_arithmetic child = b + s ((1 - r) dA + r dB)
    dare_linear     child = b + s ((1 - r) DARE(dA, density_a) + r DARE(dB, density_b))
    ties            child = b + s sum_i w_i TRIM(d_i) [sign(TRIM(d_i)) == S],  S = sign(sum_i w_i TRIM(d_i))
    dare_ties       as ties with DARE in place of TRIM (Darwin's default)
    breadcrumbs     as task_arithmetic on deltas with the largest ``gamma`` and the smallest
                    (1 - density - gamma) shares of entries (by magnitude) removed
    della           as dare_ties with keep probabilities by magnitude rank:
                    p = density - epsilon/2 + epsilon * rank/(n-1), survivors rescaled by 1/p
    model_stock     child = t (A + B)/2 + (1 - t) b,  t = 2 cos / (1 + cos),  cos = cos(dA, dB)
                    (r is not used; needs a real base)

with w = (1 - r, r). DARE(d, p): drop each entry with probability 1 - p, rescale survivors by 1/p
(mergekit's dare rescales so the L1 norm is kept instead: see docs/merge.md). TRIM(d, p): keep the
p share of entries with the largest magnitude. With b = A (no base) dare_ties is Darwin V5's rule
child = A + r DARE(B - A).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dare",
    "trim",
    "breadcrumbs_mask",
    "della_drop",
    "sign_elect",
    "linear",
    "slerp",
    "model_stock",
    "combine",
]


def dare(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Drop entries with probability 1 - density (mask drawn on the CPU from ``gen``), rescale by 1/density."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=gen, dtype=torch.float32).to(delta.device) < density
    return delta * keep / density


def _kth_abs(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest |entry| (1-based)."""
    flat = delta.abs().flatten()
    return flat.kthvalue(k).values if flat.device.type == "cpu" else flat.sort().values[k - 1]


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (TIES' trim step)."""
    n = delta.numel()
    k = int(density * n)
    if density >= 1.0 or n == 0:
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    thr = _kth_abs(delta, n - k + 1)
    return delta * (delta.abs() >= thr)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share with the largest magnitude and the smallest entries,
    so a ``density`` share remains."""
    n = delta.numel()
    if n < 2:
        return delta
    n_top = int(gamma * n)
    n_keep = max(0, min(int(density * n), n - n_top))
    n_low = n - n_top - n_keep
    a = delta.abs()
    mask = torch.ones_like(delta, dtype=torch.bool)
    if n_low > 0:
        mask &= a > _kth_abs(delta, n_low)
    if n_top > 0:
        mask &= a < _kth_abs(delta, n - n_top + 1)
    return delta * mask


def della_drop(delta: torch.Tensor, density: float, epsilon: float, gen: torch.Generator) -> torch.Tensor:
    """DELLA's MagPrune: keep probability rises with magnitude rank, p in [density - eps/2, density + eps/2]
    (clipped to (0, 1]); survivors rescaled by 1/p."""
    n = delta.numel()
    if n == 0 or (density >= 1.0 and epsilon == 0):
        return delta
    flat = delta.abs().flatten()
    ranks = torch.empty(n, dtype=torch.float32, device=delta.device)
    ranks[flat.argsort()] = torch.arange(n, dtype=torch.float32, device=delta.device)
    rel = ranks / max(n - 1, 1)
    p = (density - epsilon / 2 + epsilon * rel).clamp(1e-4, 1.0).view(delta.shape)
    keep = torch.rand(delta.shape, generator=gen, dtype=torch.float32).to(delta.device) < p
    return delta * keep / p


def sign_elect(deltas: list[torch.Tensor], weights: list[float]) -> list[torch.Tensor]:
    """TIES sign election: S = sign(sum_i w_i d_i); each d_i keeps the entries whose sign equals S."""
    total = sum(w * d for w, d in zip(weights, deltas))
    s = torch.sign(total)
    return [d * (torch.sign(d) == s) for d in deltas]


def linear(a: torch.Tensor, b: torch.Tensor, r: float) -> torch.Tensor:
    """(1 - r) a + r b."""
    return a * (1.0 - r) + b * r


def slerp(a: torch.Tensor, b: torch.Tensor, r: float, eps: float = 5e-4) -> torch.Tensor:
    """Spherical interpolation on the flattened tensors; linear when nearly (anti)parallel or degenerate."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return linear(a, b, r)
    cos = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(cos) > 1.0 - eps:
        return linear(a, b, r)
    theta = math.acos(cos)
    s = math.sin(theta)
    return a * (math.sin((1.0 - r) * theta) / s) + b * (math.sin(r * theta) / s)


def model_stock(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Model Stock for two fine-tunes: t = 2cos/(1+cos) of their deltas; t (a+b)/2 + (1-t) base."""
    da, db = a - base, b - base
    na, nb = da.norm(), db.norm()
    if na == 0 or nb == 0:
        return linear(a, b, 0.5)
    cos = float((da * db).sum() / (na * nb))
    cos = max(cos, -1.0 + 1e-6)
    t = 2.0 * cos / (1.0 + cos)
    return (a + b) * (0.5 * t) + base * (1.0 - t)


def combine(
    method: str,
    a: torch.Tensor,
    b: torch.Tensor,
    base: torch.Tensor | None,
    r: float,
    *,
    density_a: float = 1.0,
    density_b: float = 1.0,
    scale: float = 1.0,
    gamma: float = 0.01,
    epsilon: float = 0.1,
    slerp_eps: float = 5e-4,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """One method on float32 tensors (module docstring for the formulas). ``base`` None means the
    father is the base. ``gen`` draws DARE/DELLA masks: the father's first, then the mother's."""
    if method == "linear":
        return linear(a, b, r)
    if method == "slerp":
        return slerp(a, b, r, slerp_eps)
    if method == "model_stock":
        if base is None:
            raise ValueError("model_stock needs a base model (parents.base): with the father as base it is undefined")
        return model_stock(a, b, base)
    c = a if base is None else base
    da, db = a - c, b - c
    w = [1.0 - r, r]
    if method == "task_arithmetic":
        return c + (da * w[0] + db * w[1]) * scale
    if method in ("dare_linear", "dare_ties", "della"):
        if gen is None:
            raise ValueError(f"{method} draws random masks: pass a seeded generator")
        if method == "della":
            da, db = della_drop(da, density_a, epsilon, gen), della_drop(db, density_b, epsilon, gen)
        else:
            da, db = dare(da, density_a, gen), dare(db, density_b, gen)
        if method == "dare_linear":
            return c + (da * w[0] + db * w[1]) * scale
        da, db = sign_elect([da, db], w)
        return c + (da * w[0] + db * w[1]) * scale
    if method == "ties":
        da, db = sign_elect([trim(da, density_a), trim(db, density_b)], w)
        return c + (da * w[0] + db * w[1]) * scale
    if method == "breadcrumbs":
        da, db = breadcrumbs_mask(da, density_a, gamma), breadcrumbs_mask(db, density_b, gamma)
        return c + (da * w[0] + db * w[1]) * scale
    raise ValueError(f"unknown merge method {method!r}")
