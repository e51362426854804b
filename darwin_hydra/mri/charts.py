"""MRI charts (matplotlib, Agg backend): probe-importance heatmaps, the layer advantage map, expert
utilisation and the prescribed per-layer ratio. Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from darwin_hydra.mri.moe import MoeScan
    from darwin_hydra.mri.prescribe import Prescription
    from darwin_hydra.mri.probes import ProbeScan


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def importance_heatmap(scan: "ProbeScan", title: str, path: Path) -> Path:
    """Probe set x layer heatmap of I_p(l)."""
    data = np.array([scan.importance[p] for p in scan.sets])
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * scan.num_layers + 2), 0.5 * len(scan.sets) + 1.6))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(scan.sets)), scan.sets)
    ax.set_xlabel("layer")
    ax.set_title(f"{title}: layer importance (1 - cos of the final hidden state, layer skipped)")
    fig.colorbar(im, ax=ax, label="I_p(l)")
    return save_figure(fig, path)


def advantage_map(father: "ProbeScan", mother: "ProbeScan", path: Path) -> Path:
    """Probe set x layer map of I^father_p(l) - I^mother_p(l): red = the father's layer matters more,
    blue = the mother's."""
    data = np.array([father.importance[p] for p in father.sets]) - np.array(
        [mother.importance[p] for p in father.sets]
    )
    lim = float(np.abs(data).max()) or 1e-6
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * father.num_layers + 2), 0.5 * len(father.sets) + 1.6))
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(father.sets)), father.sets)
    ax.set_xlabel("layer")
    ax.set_title("layer advantage: father minus mother (red: father's layer matters more)")
    fig.colorbar(im, ax=ax, label="I_A - I_B")
    return save_figure(fig, path)


def expert_utilisation(father: "MoeScan", mother: "MoeScan | None", path: Path) -> Path:
    """Layer x expert heatmaps of routing frequency over the uniform share k/E (1 = balanced);
    dead experts (configured rule) marked x."""
    scans = [("father", father)] + ([("mother", mother)] if mother is not None else [])
    fig, axes = plt.subplots(
        1, len(scans), figsize=(len(scans) * max(4, 0.3 * father.num_experts + 2), 0.35 * len(father.layers) + 2),
        squeeze=False,
    )
    vmax = max(float(np.max(np.array(s.frequency) / s.uniform_share)) for _, s in scans)
    for ax, (role, s) in zip(axes[0], scans):
        rel = np.array(s.frequency) / s.uniform_share
        im = ax.imshow(rel, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        dead = np.argwhere(np.array(s.dead))
        if len(dead):
            ax.scatter(dead[:, 1], dead[:, 0], marker="x", c="cyan", s=18)
        ax.set_yticks(range(len(s.layers)), s.layers)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{role}: frequency / (k/E)  (x = dead, {s.dead_rule})")
        fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def prescribed_ratio(p: "Prescription", t_lo: float, t_hi: float, path: Path) -> Path:
    """Per-layer r_mri (mean over the layer's tensors) after sharpening, the raw ratio, and the
    transplant thresholds."""
    L = len(p.per_layer)
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * L + 2), 3.2))
    ax.bar(range(L), p.per_layer, color="tab:purple", alpha=0.75, label="r_mri (mother's share)")
    ax.plot(range(L), p.raw_per_layer, "k.-", lw=1, label="before sharpening")
    for t, name in ((t_lo, "t_lo: father as is"), (t_hi, "t_hi: mother as is")):
        ax.axhline(t, ls="--", lw=0.8, c="grey")
        ax.text(L - 0.5, t, name, ha="right", va="bottom", fontsize=7, color="grey")
    ax.axhline(0.5, lw=0.5, c="black")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("ratio")
    ax.set_title(f"prescribed ratio per layer (mother's sets: {', '.join(p.mother_sets)})")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def delta_heatmaps(father: "ProbeScan", mother: "ProbeScan", reference: str, path: Path) -> Path:
    """Probe set x layer heatmaps of the delta probe D_p(l) for both parents: where each parent's own
    version of a layer (vs the reference's) matters for each set."""
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * max(4, 0.35 * father.num_layers + 2), 0.5 * len(father.sets) + 1.8), squeeze=False
    )
    vmax = max(max(max(v) for v in s.delta.values()) for s in (father, mother)) or 1e-6
    for ax, (role, scan) in zip(axes[0], (("father", father), ("mother", mother))):
        data = np.array([scan.delta[p] for p in scan.sets])
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(scan.sets)), scan.sets)
        ax.set_xlabel("layer")
        ax.set_title(f"{role}: layer replaced by the {reference}'s (delta probe)")
        fig.colorbar(im, ax=ax, label="D_p(l)")
    return save_figure(fig, path)
