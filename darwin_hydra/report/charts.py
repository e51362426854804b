"""Charts of the search, the health check, the benchmark and the recipe (PNG, matplotlib Agg).
The MRI's own charts live in ``darwin_hydra.mri.charts``."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from darwin_hydra.mri.charts import save_figure  # noqa: E402  (one figure-saving rule for every chart)


def evolution_curve(history: Sequence[Mapping], path: Path) -> Path:
    """Trial values and best-so-far per phase (phase 1: proxy, phase 2: benchmark dev score)."""
    phases = sorted({h["phase"] for h in history})
    fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 3.6), squeeze=False)
    labels = {1: "phase 1: proxy (-KL to stronger parent)", 2: "phase 2: benchmark (dev mean acc)"}
    for ax, ph in zip(axes[0], phases):
        hs = [h for h in history if h["phase"] == ph]
        x = list(range(1, len(hs) + 1))
        ax.scatter(x, [h["value"] for h in hs], s=14, alpha=0.6, label="trial")
        best, run = [], float("-inf")
        for h in hs:
            run = max(run, h["value"])
            best.append(run)
        ax.plot(x, best, color="C3", label="best so far")
        ax.set_title(labels.get(ph, f"phase {ph}"), fontsize=10)
        ax.set_xlabel("trial")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def health_curves(
    child: Mapping[str, Sequence[float]],
    father: Mapping[str, Sequence[float]],
    mother: Mapping[str, Sequence[float]],
    flagged_layers: Sequence[int],
    path: Path,
) -> Path:
    """Per probe set: layer importance of father, mother and child; flagged layers shaded."""
    sets = list(child)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], sets):
        layers = list(range(len(child[p])))
        ax.plot(layers, father[p], "o-", label="father", color="C0")
        ax.plot(layers, mother[p], "s-", label="mother", color="C1")
        ax.plot(layers, child[p], "^-", label="child", color="C2")
        for l in flagged_layers:
            ax.axvspan(l - 0.4, l + 0.4, color="red", alpha=0.12)
        ax.set_title(p, fontsize=10)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("importance (skip-layer cosine distance)")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def benchmark_bars(table: Mapping[str, Mapping[str, tuple[float, float, float]]], path: Path) -> Path:
    """Grouped bars: per task (x), per model (colour), accuracy with its 95% interval.
    ``table[model][task] = (acc, lo, hi)`` in points."""
    models = list(table)
    tasks = list(next(iter(table.values())))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks) * len(models) / 2), 3.8))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(tasks))]
        acc = [table[m][t][0] for t in tasks]
        # max(0, .): a Wilson bound at 0% or 100% can land a rounding error on the wrong side of the estimate
        err = [[max(0.0, table[m][t][0] - table[m][t][1]) for t in tasks],
               [max(0.0, table[m][t][2] - table[m][t][0]) for t in tasks]]
        ax.bar(xs, acc, width, yerr=err, capsize=3, label=m)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy (test split, %)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=len(models), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return save_figure(fig, path)


def layer_ratios(per_layer: Mapping[str, Sequence[float]], transplanted: Mapping[str, Sequence[int]], path: Path) -> Path:
    """Mean merge ratio (mother's share) per layer for each component, with the number of
    transplanted tensors per layer as bars."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for comp, vals in per_layer.items():
        ax.plot(range(len(vals)), vals, "o-", label=comp, markersize=4)
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("ratio r (0 father, 1 mother)")
    if any(sum(counts) for counts in transplanted.values()):  # no empty axis when nothing was transplanted
        ax2 = ax.twinx()
        width = 0.35
        for i, (who, counts) in enumerate(transplanted.items()):
            ax2.bar([l + (i - 0.5) * width for l in range(len(counts))], counts, width, alpha=0.25, label=f"from {who}")
        ax2.set_ylabel("transplanted tensors")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=7, loc="upper right")
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)
