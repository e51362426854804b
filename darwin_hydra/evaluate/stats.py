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

    Wilson score interval for p = k/n with z the normal quantile (``scipy.stats.binomtest(k, n)
    .proportion_ci(method="wilson")``)::

        center = (p + z^2/(2n)) / (1 + z^2/n)
        half   = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2))

    Normal interval: mean +- z * s / sqrt(n), s the sample standard deviation (ddof=1).
    """
    arr = _as_array(values)
    n, mean = arr.size, float(arr.mean())
    if method == "auto":
        method = "wilson" if _is_binary(arr) else "normal"
    if method == "wilson":
        if not _is_binary(arr):
            raise ValueError("mean_ci(method='wilson') needs 0/1 values")
        if not 0 < level < 1:
            raise ValueError(f"confidence level {level} must be in (0, 1)")
        from scipy.stats import binomtest

        ci = binomtest(int(arr.sum()), n).proportion_ci(confidence_level=level, method="wilson")
        return mean, float(ci.low), float(ci.high)
    if method == "normal":
        z = _z(level)
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


# Resampled values held at once by one bootstrap batch (about 16 MB of indices and values): the
# memory of a bootstrap no longer grows with n_boot x n.
_BATCH_VALUES = 1 << 20


def _stratified_percentile(arrays: list[np.ndarray], n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval of the skill average ``mean_t(mean(arrays[t]))``, resampling items with
    replacement within each array (``scipy.stats.bootstrap`` with one independent sample per task)."""
    from scipy.stats import bootstrap

    if not 0 < level < 1:
        raise ValueError(f"confidence level {level} must be in (0, 1)")
    k = len(arrays)
    # one item: every resample is the item itself (scipy needs two or more per sample)
    fixed = sum(float(a[0]) for a in arrays if a.size == 1)
    varying = tuple(a for a in arrays if a.size > 1)
    if not varying:
        return fixed / k, fixed / k

    def skill_average(*samples, axis=-1):
        return (fixed + sum(s.mean(axis=axis) for s in samples)) / k

    batch = max(1, _BATCH_VALUES // max(a.size for a in varying))
    res = bootstrap(varying, skill_average, n_resamples=n_boot, batch=batch, vectorized=True, paired=False,
                    confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_ci(
    values: Scores, level: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """``(estimate, lo, hi)``: percentile bootstrap of the mean (or of the skill average for a dict).

    Each replicate resamples n items with replacement (within each task for a dict) and recomputes
    the statistic; lo/hi are the (1-level)/2 and (1+level)/2 quantiles of the replicates.
    """
    arrays = _stratified(values)
    lo, hi = _stratified_percentile(arrays, n_boot, seed, level)
    return skill_average(values), lo, hi


def paired_bootstrap(
    a: Scores, b: Scores, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(diff, lo, hi)`` for ``mean(a) - mean(b)`` over the same items, by paired bootstrap.

    ``a[i]`` and ``b[i]`` are two models' scores on item i; a replicate draws item indices with
    replacement and uses the same indices for both, so the item difficulty cancels:
    ``diff* = mean(a[idx]) - mean(b[idx]) = mean((a - b)[idx])``, i.e. a bootstrap of the per-item
    differences. For dicts (task -> array) the statistic is the difference of skill averages and items
    are resampled within each task. ``lo``/``hi`` are percentile bounds at ``level``; the difference is
    significant when 0 lies outside them.
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
    diffs = [x - y for x, y in zip(arrays_a, arrays_b)]
    lo, hi = _stratified_percentile(diffs, n_boot, seed, level)
    return float(np.mean([d.mean() for d in diffs])), lo, hi
