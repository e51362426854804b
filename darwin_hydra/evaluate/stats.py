"""Confidence intervals and paired comparisons for benchmark scores (pure functions on arrays).

Scores are per-item values, usually 0/1 correctness in document order. A "skill average" is the
unweighted mean of per-task means; functions that accept ``dict[task, array]`` compute statistics
of that average and resample items within each task (a stratified bootstrap).
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import NormalDist

import numpy as np

ArrayLike = np.ndarray | list | tuple
Scores = ArrayLike | Mapping[str, ArrayLike]


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level} must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _as_array(values: ArrayLike, what: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what}: no items to compute a statistic on")
    return arr


def _is_binary(arr: np.ndarray) -> bool:
    return bool(np.all((arr == 0) | (arr == 1)))


def mean_ci(values: ArrayLike, level: float = 0.95, method: str = "auto") -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of ``values`` at confidence ``level``.

    ``method``: ``wilson`` (0/1 values), ``normal``, or ``auto`` (Wilson when every value is 0 or 1).

    Wilson score interval for p = k/n with z the normal quantile::

        center = (p + z^2/(2n)) / (1 + z^2/n)
        half   = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2))

    Normal interval: mean +- z * s / sqrt(n), s the sample standard deviation (ddof=1).
    """
    arr = _as_array(values)
    n, mean, z = arr.size, float(arr.mean()), _z(level)
    if method == "auto":
        method = "wilson" if _is_binary(arr) else "normal"
    if method == "wilson":
        if not _is_binary(arr):
            raise ValueError("mean_ci(method='wilson') needs 0/1 values")
        denom = 1 + z * z / n
        center = (mean + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
        return mean, float(center - half), float(center + half)
    if method == "normal":
        if n < 2:
            return mean, mean, mean
        half = z * float(arr.std(ddof=1)) / np.sqrt(n)
        return mean, mean - half, mean + half
    raise ValueError(f"mean_ci: method {method!r} is not one of 'auto', 'wilson', 'normal'")


def _stratified(values: Scores) -> list[np.ndarray]:
    if isinstance(values, Mapping):
        if not values:
            raise ValueError("no tasks to average")
        return [_as_array(v, f"task {k!r}") for k, v in values.items()]
    return [_as_array(values)]


def skill_average(values: Scores) -> float:
    """Unweighted mean over tasks of each task's mean (for an array: its mean)."""
    return float(np.mean([a.mean() for a in _stratified(values)]))


def _boot_means(arrays: list[np.ndarray], n_boot: int, rng: np.random.Generator, paired: list[np.ndarray] | None = None):
    # Resample items within each task; the statistic is the mean over tasks of the resampled task means.
    total = np.zeros(n_boot)
    total_b = np.zeros(n_boot) if paired is not None else None
    for t, arr in enumerate(arrays):
        idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
        total += arr[idx].mean(axis=1)
        if paired is not None:
            total_b += paired[t][idx].mean(axis=1)
    k = len(arrays)
    return (total / k, None) if paired is None else (total / k, total_b / k)


def bootstrap_ci(
    values: Scores, level: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """``(estimate, lo, hi)``: percentile bootstrap of the mean (or of the skill average for a dict).

    Each replicate resamples n items with replacement (within each task for a dict) and recomputes
    the statistic; lo/hi are the (1-level)/2 and (1+level)/2 quantiles of the replicates.
    """
    arrays = _stratified(values)
    rng = np.random.default_rng(seed)
    boots, _ = _boot_means(arrays, n_boot, rng)
    alpha = (1 - level) / 2
    return skill_average(values), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


def paired_bootstrap(
    a: Scores, b: Scores, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(diff, lo, hi)`` for ``mean(a) - mean(b)`` over the same items, by paired bootstrap.

    ``a[i]`` and ``b[i]`` are two models' scores on item i; a replicate draws item indices with
    replacement and uses the same indices for both, so the item difficulty cancels:
    ``diff* = mean(a[idx]) - mean(b[idx])``. For dicts (task -> array) the statistic is the
    difference of skill averages and items are resampled within each task. ``lo``/``hi`` are
    percentile bounds at ``level``; the difference is significant when 0 lies outside them.
    """
    arrays_a, arrays_b = _stratified(a), _stratified(b)
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise ValueError("paired_bootstrap: pass two arrays or two dicts task -> array")
    if isinstance(a, Mapping) and list(a) != list(b):
        if set(a) != set(b):
            raise ValueError(f"paired_bootstrap: tasks differ: {sorted(a)} vs {sorted(b)}")
        arrays_b = [_as_array(b[k]) for k in a]  # type: ignore[index]
    for x, y in zip(arrays_a, arrays_b):
        if x.size != y.size:
            raise ValueError(f"paired_bootstrap: item counts differ ({x.size} vs {y.size}); scores must be paired")
    rng = np.random.default_rng(seed)
    boot_a, boot_b = _boot_means(arrays_a, n_boot, rng, paired=arrays_b)
    diffs = boot_a - boot_b
    alpha = (1 - level) / 2
    diff = float(np.mean([x.mean() for x in arrays_a]) - np.mean([y.mean() for y in arrays_b]))
    return diff, float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))
