"""Per-tensor merge recipes: the ratio map the engine executes.

A ``RatioMap`` maps every tensor name to a ``TensorRecipe``. The genome (search) or the ``merge``
config (a plain merge) produces it; the engine only executes it. ``tensor_seed`` derives the DARE /
DELLA mask seed of a tensor from (genome_hash, tensor name), so masks do not depend on the order
tensors are processed in nor on the thread count.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator, Mapping, Optional, Sequence

from darwin_hydra.arch import tensor_info
from darwin_hydra.merge.config import METHODS, RANDOM_METHODS

FATHER, MOTHER = "father", "mother"


@dataclass(frozen=True)
class TensorRecipe:
    """How one tensor is merged. ``ratio`` is the mother's share r.

    ``method_weight`` w blends the method with ``blend_method``: child = w*method + (1-w)*blend.
    Transplant: r < t_lo takes the father's tensor as is, r > t_hi the mother's (None = never).
    ``source`` forces a whole tensor from "father" or "mother" whatever r is (router source,
    revived experts); ``rows_from`` copies listed rows from a parent after merging or
    transplanting, scaled to the mean row norm of the child's other rows times ``rows_gain`` (the
    router rows of revived experts; see ``methods.merge_tensor``).
    """

    method: str = "dare_ties"
    ratio: float = 0.5
    density_a: float = 1.0
    density_b: float = 1.0
    method_weight: float = 1.0
    blend_method: str = "linear"
    t_lo: Optional[float] = None
    t_hi: Optional[float] = None
    scale: float = 1.0
    gamma: float = 0.01
    epsilon: float = 0.15
    slerp_eps: float = 5e-4
    source: Optional[str] = None
    rows_from: Optional[tuple[tuple[str, tuple[int, ...]], ...]] = None
    rows_gain: float = 1.0

    def __post_init__(self):
        for key in ("method", "blend_method"):
            m = getattr(self, key)
            if m not in METHODS:
                raise ValueError(f"merge method {m!r} is not one of {METHODS}")
            object.__setattr__(self, key, str(m))  # a MergeMethod from config: its plain name
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"merge ratio {self.ratio} must lie in [0, 1]")
        for d in (self.density_a, self.density_b):
            if not 0.0 < d <= 1.0:
                raise ValueError(f"density {d} must lie in (0, 1]")
        if self.source not in (None, FATHER, MOTHER):
            raise ValueError(f"tensor source {self.source!r} must be 'father', 'mother' or None")
        if not (math.isfinite(self.rows_gain) and self.rows_gain > 0.0):
            raise ValueError(f"rows_gain {self.rows_gain} must be a finite number > 0")
        if not 0.0 <= self.method_weight <= 1.0:
            raise ValueError(f"method_weight {self.method_weight} must lie in [0, 1]")
        if not 0.0 <= self.gamma < 1.0 or self.epsilon < 0.0 or not 0.0 <= self.slerp_eps < 1.0:
            raise ValueError(
                f"gamma {self.gamma} must lie in [0, 1), epsilon {self.epsilon} >= 0, slerp_eps {self.slerp_eps} in [0, 1)"
            )

    def transplant_side(self) -> str | None:
        """``father`` / ``mother`` when the whole tensor is taken from one parent, else None."""
        if self.source is not None:
            return self.source
        if self.t_lo is not None and self.ratio < self.t_lo:
            return FATHER
        if self.t_hi is not None and self.ratio > self.t_hi:
            return MOTHER
        return None

    @property
    def random(self) -> bool:
        """Whether the merge draws random masks (so its result depends on the seed)."""
        if self.transplant_side() is not None:
            return False
        uses = ({self.method} if self.method_weight > 0.0 else set()) | (
            {self.blend_method} if self.method_weight < 1.0 else set()
        )
        return any(m in RANDOM_METHODS for m in uses) and min(self.density_a, self.density_b) < 1.0


class RatioMap(Mapping[str, TensorRecipe]):
    """Tensor name -> TensorRecipe, with JSON round trip and a summary."""

    def __init__(self, recipes: Mapping[str, TensorRecipe]):
        self._r = dict(recipes)

    def __getitem__(self, name: str) -> TensorRecipe:
        try:
            return self._r[name]
        except KeyError:
            raise KeyError(f"the ratio map has no recipe for tensor {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._r)

    def __len__(self) -> int:
        return len(self._r)

    def to_json(self) -> str:
        return json.dumps({n: _recipe_dict(r) for n, r in self._r.items()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RatioMap":
        data = json.loads(text)
        out = {}
        for n, d in data.items():
            if d.get("rows_from") is not None:
                d["rows_from"] = tuple((who, tuple(rows)) for who, rows in d["rows_from"])
            out[n] = TensorRecipe(**d)
        return cls(out)

    def transplanted(self) -> dict[str, list[str]]:
        """Tensors taken whole from one parent: {"father": [...], "mother": [...]}."""
        out: dict[str, list[str]] = {FATHER: [], MOTHER: []}
        for n, r in self._r.items():
            side = r.transplant_side()
            if side is not None:
                out[side].append(n)
        return out

    def summary(self) -> str:
        """One paragraph: tensor count, counts per method, transplants (with a few names), ratio range."""
        merged = [r for r in self._r.values() if r.transplant_side() is None]
        methods = Counter(r.method for r in merged)
        moved = self.transplanted()
        ratios = [r.ratio for r in self._r.values()]
        mean = sum(ratios) / max(len(ratios), 1)

        def names(side: str) -> str:
            ns = moved[side]
            return f"{len(ns)}" + (f" (e.g. {', '.join(ns[:3])})" if ns else "")

        return (
            f"{len(self._r)} tensors; merged {len(merged)} by method {dict(methods)}; "
            f"whole from father {names(FATHER)}, from mother {names(MOTHER)}; "
            f"ratio mean {mean:.3f} min {min(ratios, default=0):.3f} max {max(ratios, default=0):.3f}"
        )


def _recipe_dict(r: TensorRecipe) -> dict:
    d = asdict(r)
    defaults = {f.name: f.default for f in fields(TensorRecipe)}
    # keep the file small: drop fields at their default except the ones that always matter
    return {k: v for k, v in d.items() if k in ("method", "ratio") or v != defaults[k]}


def tensor_seed(genome_hash: str, name: str) -> int:
    """64-bit seed of a tensor's random masks: blake2b(genome_hash, 0x00, name)."""
    h = hashlib.blake2b(f"{genome_hash}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _interp(values: Sequence[float], layer: int, num_layers: int) -> float:
    if len(values) == 1 or num_layers <= 1:
        return float(values[0])
    x = layer / (num_layers - 1) * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    t = x - i
    return float(values[i]) * (1 - t) + float(values[i + 1]) * t


def plain_ratio_map(names: Sequence[str], cfg: Any, num_layers: int) -> RatioMap:
    """The recipe of a plain merge from a ``MergeConfig``: one ratio for all, replaced by the
    layer gradient inside layers and by the component's ratio where one is given."""
    base = TensorRecipe(
        method=cfg.method,
        ratio=float(cfg.ratio),
        density_a=float(cfg.density_a),
        density_b=float(cfg.density_b),
        method_weight=float(cfg.method_weight),
        blend_method=cfg.blend_method,
        t_lo=cfg.t_lo,
        t_hi=cfg.t_hi,
        scale=float(cfg.scale),
        gamma=float(cfg.gamma),
        epsilon=float(cfg.epsilon),
        slerp_eps=float(cfg.slerp_eps),
    )
    comp = dict(cfg.component_ratios or {})
    from darwin_hydra.arch import COMPONENTS

    unknown = sorted(set(comp) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"merge.component_ratios: unknown component(s) {unknown}; known: {list(COMPONENTS)}")
    out = {}
    for n in names:
        info = tensor_info(n)
        r = base.ratio
        if cfg.layer_ratios and info.layer is not None:
            r = _interp(list(cfg.layer_ratios), info.layer, num_layers)
        if info.component in comp:
            r = float(comp[info.component])
        out[n] = base if r == base.ratio else replace(base, ratio=r)
    return RatioMap(out)
