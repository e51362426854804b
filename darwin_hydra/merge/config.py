"""The ``merge`` config group: a plain merge (one recipe for every tensor, optionally per component
and per layer) and how the engine runs (device, workers). A genome overrides the per-tensor part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class MergeConfig:
    """``darwin-hydra 'pipeline.stages=[merge]' merge.method=ties merge.ratio=0.5``.

    ratio is the mother's share (0 = father, 1 = mother). ``component_ratios`` (attn, ffn, embed,
    norm, head, router, expert, shared_expert) replace ``ratio`` for their tensors; ``layer_ratios``
    (a list interpolated linearly over the decoder layers, e.g. [0.2, 0.8] for a gradient) replace it
    for tensors inside layers; component ratios win over layer ratios.
    """

    method: str = "dare_ties"
    ratio: float = 0.5
    density_a: float = 1.0
    density_b: float = 1.0
    # share of ``method`` in the child; the rest is ``blend_method`` (Darwin's merge_method_weight)
    method_weight: float = 1.0
    blend_method: str = "linear"
    # transplant whole tensors: r < t_lo -> father's, r > t_hi -> mother's (null = never)
    t_lo: Optional[float] = None
    t_hi: Optional[float] = None
    component_ratios: dict[str, float] = field(default_factory=dict)
    layer_ratios: Optional[list[float]] = None
    # task_arithmetic / ties / dare / della / breadcrumbs: scale of the combined delta
    scale: float = 1.0
    # breadcrumbs: share of the largest-magnitude delta entries dropped (beside the smallest)
    gamma: float = 0.01
    # della: spread of keep probabilities around the density, by magnitude rank
    epsilon: float = 0.1
    # slerp: |cos| above 1 - slerp_eps is "nearly parallel": linear interpolation instead
    slerp_eps: float = 5e-4
    # merge on "cpu", "cuda" or "auto" (cuda when available); masks are drawn on the CPU either way
    device: str = "cpu"
    # parallel tensor merges (0 = one per core)
    workers: int = 0
    # seed material for a plain merge's DARE masks (a genome's hash is used when there is a genome)
    seed: int = 0
