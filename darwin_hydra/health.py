"""Health check: the child's probe importance beside both parents', layer by layer.

For probe set p and layer l, with importances F = I^father_p(l), M = I^mother_p(l), C = I^child_p(l):

    interference(p, l)  : C > factor * max(F, M)  and  C - max(F, M) > margin
                          (the child leans on a layer far more than either parent did: the merged
                          weights interfere there)
    function loss(p, l) : P >= min_parent  and  C < fraction * P   for P = F or M
                          (a parent relied on the layer and the child barely uses it: the function
                          that lived there is gone)

Verdict: ``healthy`` with no flags, else ``flagged`` with the flagged (set, layer) pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


@dataclass
class HealthFlag:
    kind: str  # "interference" | "function_loss"
    probe_set: str
    layer: int
    child: float
    father: float
    mother: float
    parent: str | None = None  # for function loss: whose function was lost

    def describe(self) -> str:
        if self.kind == "interference":
            return (f"layer {self.layer} ({self.probe_set}): interference, child importance {self.child:.4f} vs "
                    f"father {self.father:.4f} / mother {self.mother:.4f}")
        parent_value = self.father if self.parent == "father" else self.mother
        return (f"layer {self.layer} ({self.probe_set}): function loss, {self.parent}'s importance "
                f"{parent_value:.4f} -> child {self.child:.4f}")


@dataclass
class HealthReport:
    verdict: str
    flags: list[HealthFlag] = field(default_factory=list)
    flagged_layers: list[int] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def health_check(
    child: Mapping[str, list[float]],
    father: Mapping[str, list[float]],
    mother: Mapping[str, list[float]],
    thresholds: Any = None,
    **overrides: float,
) -> HealthReport:
    """Flag interference and function loss per (probe set, layer); see the module docstring.
    ``thresholds``: a ``HealthConfig`` (default: its defaults); keyword arguments replace single fields
    (``interference_factor=1.2``)."""
    from dataclasses import replace

    from darwin_hydra.config import HealthConfig

    t = replace(thresholds or HealthConfig(), **overrides)
    interference_factor, interference_margin = t.interference_factor, t.interference_margin
    loss_min_parent, loss_fraction = t.loss_min_parent, t.loss_fraction
    flags: list[HealthFlag] = []
    for p, c_layers in child.items():
        if p not in father or p not in mother:
            raise ValueError(f"health check: probe set {p!r} is missing from a parent's scan")
        for l, c in enumerate(c_layers):
            f, m = float(father[p][l]), float(mother[p][l])
            top = max(f, m)
            if c > interference_factor * top and c - top > interference_margin:
                flags.append(HealthFlag("interference", p, l, c, f, m))
            for who, val in (("father", f), ("mother", m)):
                if val >= loss_min_parent and c < loss_fraction * val:
                    flags.append(HealthFlag("function_loss", p, l, c, f, m, parent=who))
                    break
    layers = sorted({fl.layer for fl in flags})
    return HealthReport(
        "healthy" if not flags else "flagged",
        flags,
        layers,
        dict(interference_factor=interference_factor, interference_margin=interference_margin,
             loss_min_parent=loss_min_parent, loss_fraction=loss_fraction),
    )
