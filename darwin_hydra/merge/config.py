"""The ``merge`` config group: a plain merge (one recipe for every tensor, optionally per component
and per layer) and how the engine runs (device, workers, output dtype). A genome, when the run has
one, replaces the per-tensor part (ratios, densities, method weight); device/workers/dtype still apply."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from darwin_hydra.dtypes import Dtype


class MergeMethod(StrEnum):
    """The merge methods (mergekit's vocabulary); formulas in docs/merge.md. The names live here, not
    in methods.py: the config schema must not import torch."""

    dare_ties = "dare_ties"
    ties = "ties"
    dare_linear = "dare_linear"
    task_arithmetic = "task_arithmetic"
    linear = "linear"
    slerp = "slerp"
    breadcrumbs = "breadcrumbs"
    breadcrumbs_ties = "breadcrumbs_ties"
    della = "della"
    della_linear = "della_linear"
    model_stock = "model_stock"


METHODS = tuple(m.value for m in MergeMethod)
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


@dataclass
class MergeConfig:
    """``darwin-hydra 'pipeline.stages=[merge]' merge=ties merge.ratio=0.5``.

    ratio is the mother's share (0 = father, 1 = mother). ``component_ratios`` (embed, attn, ffn,
    norm, head, router, expert, shared_expert, other) replace ``ratio`` for their tensors;
    ``layer_ratios`` (a list interpolated linearly over the decoder layers, e.g. [0.2, 0.8] for a
    gradient from the first layer to the last) replace it for tensors inside layers; component
    ratios win over layer ratios. Formulas: docs/merge.md.
    """

    method: MergeMethod = MergeMethod.dare_ties
    ratio: float = 0.5
    # DARE / TIES / breadcrumbs / DELLA: share of the father's (a) and mother's (b) delta entries kept
    density_a: float = 1.0
    density_b: float = 1.0
    # share of ``method`` in the child; the rest is ``blend_method`` (Darwin's merge_method_weight)
    method_weight: float = 1.0
    blend_method: MergeMethod = MergeMethod.linear
    # transplant whole tensors: r < t_lo -> father's, r > t_hi -> mother's (null = never)
    t_lo: Optional[float] = None
    t_hi: Optional[float] = None
    component_ratios: dict[str, float] = field(default_factory=dict)
    layer_ratios: Optional[list[float]] = None
    # task-arithmetic family: child = base + scale * combined delta (mergekit's lambda)
    scale: float = 1.0
    # breadcrumbs: share of the largest-magnitude delta entries dropped (beside the smallest)
    gamma: float = 0.01
    # della: keep probabilities spread over density +- epsilon by magnitude rank within a row
    epsilon: float = 0.15
    # slerp: rows with |cos| above 1 - slerp_eps are "nearly parallel": linear interpolation instead
    slerp_eps: float = 5e-4
    # merge on "cpu", "cuda", "cuda:N" or "auto" (cuda when available)
    device: str = "cpu"
    # tensors merged in parallel (0 = one per core)
    workers: int = 0
    # export workers as forked processes instead of threads (Linux, CPU; the same files; 0.81x (ties)
    # and 0.99x (dare_ties) the threads' time on 2 cores, docs/merge.md); null = processes where they
    # work (Linux, CPU merge, 2+ workers); true = processes even for one worker, or an error
    processes: Optional[bool] = None
    # the child's floating dtype: null = the father's, else bfloat16 / float16 / float32
    dtype: Optional[Dtype] = None
    # seed material of a plain merge's random masks (with a genome, its genome_hash is used)
    seed: int = 0

    def __post_init__(self):
        for key in ("method", "blend_method"):
            try:
                setattr(self, key, MergeMethod(getattr(self, key)))
            except ValueError:
                raise ValueError(f"merge.{key}={getattr(self, key)!r} is not one of {list(METHODS)}") from None
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"merge.ratio={self.ratio} must lie in [0, 1] (the mother's share)")
        for key in ("density_a", "density_b"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ValueError(f"merge.{key}={getattr(self, key)} must lie in (0, 1]")
        if not 0.0 <= self.method_weight <= 1.0:
            raise ValueError(f"merge.method_weight={self.method_weight} must lie in [0, 1]")
        if self.t_lo is not None and self.t_hi is not None and self.t_lo > self.t_hi:
            raise ValueError(f"merge.t_lo={self.t_lo} > merge.t_hi={self.t_hi}: need t_lo <= t_hi")
        dev = str(self.device)
        if dev not in ("cpu", "cuda", "auto") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ValueError(f"merge.device={dev!r}: use cpu, cuda, cuda:N or auto")
        if self.workers < 0:
            raise ValueError(f"merge.workers={self.workers}: use 0 (one per core) or a positive count")
        if self.dtype is not None:
            try:
                self.dtype = Dtype(self.dtype)
            except ValueError:
                raise ValueError(f"merge.dtype={self.dtype!r}: use null (the father's), bfloat16, float16 or float32") from None
