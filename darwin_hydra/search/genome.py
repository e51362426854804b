"""Genomes: named genes with bounds, the one rule that turns a genome plus the MRI prescription into
a per-tensor merge recipe, and the genome hash that makes a child reproducible.

Ratios are always the mother's share: 0 keeps the father, 1 takes the mother.

The rule (``genome_ratio``), for tensor T in decoder layer l of component c::

    r_genome(T) = sigmoid( logit(global_ratio) + logit(component_ratio[c]) + logit(block_ratio[b(l)]) )
    b(l)        = floor(l * n_blocks / L)            (n_blocks equal blocks over L layers)
    r(T)        = tau * r_mri(T) + (1 - tau) * r_genome(T)        tau = mri_trust
    transplant  : r(T) < t_lo -> father's tensor as is; r(T) > t_hi -> mother's tensor as is

A gene at 0.5 is neutral (logit 0), so each gene moves the ratio on its own scale and the sum stays
in (0, 1). Components: attn -> attn_ratio; ffn, routed and shared experts, routers -> ffn_ratio;
embeddings and head -> embed_ratio; norms and other tensors -> no component gene. Tensors outside
layers have no block gene. The layerwise genome replaces global/component/block genes by
``layer_<l>`` (or ``layer_<l>_attn`` / ``layer_<l>_ffn``) genes used directly as r_genome.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from darwin_hydra.arch import ATTN, EMBED, EXPERT, FFN, HEAD, ROUTER, SHARED_EXPERT, tensor_info

_EPS = 1e-4
_COMPONENT_GENE = {
    ATTN: "attn_ratio",
    FFN: "ffn_ratio",
    EXPERT: "ffn_ratio",
    SHARED_EXPERT: "ffn_ratio",
    ROUTER: "ffn_ratio",
    EMBED: "embed_ratio",
    HEAD: "embed_ratio",
}
# genes every space understands, with the value they take when a space leaves them out
DEFAULTS = {
    "global_ratio": 0.5,
    "attn_ratio": 0.5,
    "ffn_ratio": 0.5,
    "embed_ratio": 0.5,
    "density_a": 1.0,
    "density_b": 1.0,
    "mri_trust": 0.0,
    "merge_method_weight": 1.0,
    "revive_gain": 0.0,
}
# MoE revival: the revived experts' router rows are scaled by REVIVE_GAIN_MAX ** revive_gain on top
# of the row-norm rule (search/recipe.py), so the gene spans 1x..4x; a space whose genome revives
# dead experts gets the gene unless genome.fixed pins it
REVIVE_GAIN_MAX = 4.0


def revive_gain(value: float) -> float:
    """The revived router rows' extra scale of a ``revive_gain`` gene value in [0, 1]."""
    return REVIVE_GAIN_MAX ** float(value)


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class GenomeSpace:
    """Gene names and bounds of one genome config (``conf/genome/*.yaml``), expanded for a model."""

    name: str
    genes: tuple[str, ...]
    bounds: Mapping[str, tuple[float, float]]
    fixed: Mapping[str, float] = field(default_factory=dict)
    blend_method: str = "linear"

    @classmethod
    def from_config(cls, cfg: Any, num_layers: int) -> "GenomeSpace":
        """Build from a ``GenomeConfig`` (dataclass or DictConfig); layerwise spaces get one gene per
        layer (per component with per_component). Unknown genes or missing bounds are errors."""
        genes = list(cfg.genes)
        bounds = {k: tuple(float(x) for x in v) for k, v in dict(cfg.bounds).items()}
        fixed = {k: float(v) for k, v in dict(cfg.fixed).items()}
        if getattr(cfg, "revive_dead_experts", False) and "revive_gain" not in genes and "revive_gain" not in fixed:
            genes.append("revive_gain")  # how hard the revived experts' router rows compete (1x..4x)
            bounds.setdefault("revive_gain", (0.0, 1.0))
        if cfg.layerwise:
            layer_bounds = bounds.pop("layer", (0.0, 1.0))
            for layer in range(num_layers):
                names = [f"layer_{layer}_attn", f"layer_{layer}_ffn"] if cfg.per_component else [f"layer_{layer}"]
                for g in names:
                    genes.append(g)
                    bounds.setdefault(g, layer_bounds)
        for g in genes:
            if g not in bounds:
                raise ValueError(f"genome {cfg.name}: gene {g!r} has no bounds (set genome.bounds.{g}=[low,high])")
            lo, hi = bounds[g]
            if not (0.0 <= lo <= hi <= 1.0) and not g.startswith("density"):
                raise ValueError(f"genome {cfg.name}: bounds of {g!r} must satisfy 0 <= low <= high <= 1, got {[lo, hi]}")
            if g.startswith("density") and not (0.0 < lo <= hi <= 1.0):
                raise ValueError(f"genome {cfg.name}: density bounds of {g!r} must be in (0, 1], got {[lo, hi]}")
            if not _known_gene(g):
                raise ValueError(f"genome {cfg.name}: unknown gene {g!r}; known: {sorted(DEFAULTS)} + block_<i>, layer_<i>")
        extra = sorted(set(bounds) - set(genes))
        if extra:
            hint = " (revive_gain exists only with genome.revive_dead_experts=true)" if "revive_gain" in extra else ""
            raise ValueError(f"genome {cfg.name}: bounds given for genes not in genome.genes: {extra}{hint}")
        if not 0.0 <= fixed.get("revive_gain", 0.0) <= 1.0:
            raise ValueError(f"genome {cfg.name}: genome.fixed.revive_gain={fixed['revive_gain']} must lie in [0, 1] "
                             f"(the rows' gain is {REVIVE_GAIN_MAX:g}^value)")
        return cls(
            name=str(cfg.name),
            genes=tuple(genes),
            bounds=bounds,
            fixed=fixed,
            blend_method=str(cfg.blend_method),
        )

    @property
    def n_blocks(self) -> int:
        return sum(1 for g in self.genes if g.startswith("block_"))

    def full(self, values: Mapping[str, float]) -> dict[str, float]:
        """Genome values completed with fixed values and defaults for genes the space leaves out."""
        out = dict(DEFAULTS)
        out.update(self.fixed)
        missing = [g for g in self.genes if g not in values]
        if missing:
            raise ValueError(f"genome {self.name}: values missing for genes {missing}")
        out.update({g: float(values[g]) for g in self.genes})
        return out

    def pinned(self, gene: str, value: float) -> "GenomeSpace":
        """This space with ``gene`` taken out of the search and fixed at ``value``."""
        bounds = {g: b for g, b in self.bounds.items() if g != gene}
        return replace(self, genes=tuple(g for g in self.genes if g != gene), bounds=bounds,
                       fixed={**self.fixed, gene: float(value)})

    def centre(self) -> dict[str, float]:
        return {g: 0.5 * (self.bounds[g][0] + self.bounds[g][1]) for g in self.genes}

    def clip(self, values: Mapping[str, float]) -> dict[str, float]:
        return {g: min(max(float(values[g]), self.bounds[g][0]), self.bounds[g][1]) for g in self.genes}


def _known_gene(g: str) -> bool:
    if g in DEFAULTS:
        return True
    for prefix in ("block_", "layer_"):
        if g.startswith(prefix):
            rest = g[len(prefix):].split("_")
            return rest[0].isdigit() and (len(rest) == 1 or rest[1] in ("attn", "ffn"))
    return False


def genome_ratio(name: str, genes: Mapping[str, float], num_layers: int, n_blocks: int) -> float:
    """r_genome(T) for one tensor name under complete gene values (see the module docstring)."""
    info = tensor_info(name)
    layer_gene = None
    if info.layer is not None:
        if f"layer_{info.layer}" in genes:
            layer_gene = f"layer_{info.layer}"
        else:
            part = "attn" if info.component == ATTN else "ffn"
            if f"layer_{info.layer}_{part}" in genes:
                layer_gene = f"layer_{info.layer}_{part}"
    if layer_gene is not None:  # layerwise genome: the layer's gene is the ratio
        return float(genes[layer_gene])
    if any(k.startswith("layer_") for k in genes):  # layerwise, outside layers
        if info.component in (EMBED, HEAD):
            return float(genes["embed_ratio"])
        last = [v for k, v in genes.items() if k.startswith(f"layer_{num_layers - 1}")]
        return float(sum(last) / len(last)) if last else 0.5
    z = logit(genes["global_ratio"])
    comp_gene = _COMPONENT_GENE.get(info.component)
    if comp_gene is not None:
        z += logit(genes[comp_gene])
    if info.layer is not None and n_blocks > 0:
        block = min(info.layer * n_blocks // max(num_layers, 1), n_blocks - 1)
        z += logit(genes[f"block_{block}"])
    return sigmoid(z)


def tensor_ratios(
    names: Sequence[str],
    genes: Mapping[str, float],
    r_mri: Mapping[str, float] | None,
    num_layers: int,
    n_blocks: int,
) -> dict[str, float]:
    """r(T) = tau * r_mri(T) + (1 - tau) * r_genome(T) for every name (tau = genes['mri_trust'];
    without a prescription tau is taken as 0)."""
    tau = float(genes.get("mri_trust", 0.0)) if r_mri else 0.0
    out = {}
    for n in names:
        rg = genome_ratio(n, genes, num_layers, n_blocks)
        rm = float(r_mri.get(n, rg)) if r_mri else rg
        out[n] = tau * rm + (1.0 - tau) * rg
    return out


def fit_genome_to_prescription(space: GenomeSpace, r_mri: Mapping[str, float], num_layers: int) -> dict[str, float]:
    """The genome whose r_genome best imitates the MRI prescription: the MRI-seeded starting point.

    Ratio genes are set from mean logits (global = mean over all tensors; a component or block gene
    = mean residual logit of its tensors, applied on top of global); densities start at the upper
    bound (DARE off where allowed), mri_trust, merge_method_weight and revive_gain at the middle of
    their bounds (revive_gain 0.5: the revived router rows start at 2x the row-norm rule).
    Every value is clipped to the bounds.
    """
    vals = space.centre()
    if not r_mri:
        return vals
    zs = {n: logit(r) for n, r in r_mri.items()}
    z_glob = sum(zs.values()) / len(zs)
    if "global_ratio" in space.genes:
        vals["global_ratio"] = sigmoid(z_glob)
    groups: dict[str, list[float]] = {}
    for n, z in zs.items():
        info = tensor_info(n)
        gene = _COMPONENT_GENE.get(info.component)
        if gene:
            groups.setdefault(gene, []).append(z - z_glob)
        if info.layer is not None:
            if space.n_blocks:
                b = min(info.layer * space.n_blocks // max(num_layers, 1), space.n_blocks - 1)
                groups.setdefault(f"block_{b}", []).append(z - z_glob)
            groups.setdefault(f"layer_{info.layer}", []).append(z)
            part = "attn" if info.component == ATTN else "ffn"
            groups.setdefault(f"layer_{info.layer}_{part}", []).append(z)
    for g in space.genes:
        if g in groups and (g.startswith(("block_", "layer_")) or g.endswith("_ratio")) and g != "global_ratio":
            vals[g] = sigmoid(sum(groups[g]) / len(groups[g]))
        if g.startswith("density"):
            vals[g] = space.bounds[g][1]
    return space.clip(vals)


def genome_hash(values: Mapping[str, float], context: Mapping[str, Any]) -> str:
    """Stable hash of the genome and everything else that decides the child.

    sha256 over canonical JSON (sorted keys, floats as repr) of the gene values and ``context``
    (parents' fingerprints, prescription digest, method, thresholds, genome space). 16 hex chars.
    """
    payload = {"genes": {k: float(v) for k, v in sorted(values.items())}, "context": context}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (for prescriptions and configs inside a genome hash)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- centred coordinates for CMA-ES ------------------------------------------------------------
# Optuna 5 deprecates CmaEsSampler's x0. We centre the search on x0 by reparametrising each gene as
# u in [-1, 1] with u = 0 at x0: value = x0 + u * (high - x0) for u >= 0, x0 + u * (x0 - low) below.
# CMA-ES starts at the centre of the u box, i.e. at x0, and still reaches the whole [low, high].


def to_unit(values: Mapping[str, float], x0: Mapping[str, float], space: GenomeSpace) -> dict[str, float]:
    out = {}
    for g in space.genes:
        lo, hi = space.bounds[g]
        v, c = float(values[g]), float(x0[g])
        if v >= c:
            out[g] = 0.0 if hi == c else (v - c) / (hi - c)
        else:
            out[g] = 0.0 if c == lo else (v - c) / (c - lo)
        out[g] = min(max(out[g], -1.0), 1.0)
    return out


def from_unit(u: Mapping[str, float], x0: Mapping[str, float], space: GenomeSpace) -> dict[str, float]:
    out = {}
    for g in space.genes:
        lo, hi = space.bounds[g]
        c, x = float(x0[g]), float(u[g])
        out[g] = c + x * (hi - c) if x >= 0 else c + x * (c - lo)
    return space.clip(out)


def uniform_genome(space: GenomeSpace, x0: Mapping[str, float], ratio: float) -> dict[str, float]:
    """The genome of ``space`` that is (as near as its bounds allow) the uniform merge
    child = (1 - r) father + r mother: ``global_ratio`` carries r (in a space without it: every
    ``layer_*`` and component gene, each the ratio of its tensors), the other ratio genes are neutral (0.5), ``mri_trust`` 0, densities
    1 (no DARE drop), ``merge_method_weight`` 0 (the blend method alone, linear by default); genes with
    no say in the ratio keep their ``x0`` value."""
    genes = dict(space.full(x0))
    carriers = ["global_ratio"] if "global_ratio" in space.genes else [
        g for g in space.genes if g.startswith("layer_") or g in ("attn_ratio", "ffn_ratio", "embed_ratio")]
    for g in space.genes:
        if g in carriers:
            genes[g] = ratio
        elif g in ("global_ratio", "attn_ratio", "ffn_ratio", "embed_ratio") or g.startswith(("block_", "layer_")):
            genes[g] = 0.5
        elif g == "mri_trust":
            genes[g] = 0.0
        elif g.startswith("density"):
            genes[g] = 1.0
        elif g == "merge_method_weight":
            genes[g] = 0.0
    return space.clip(genes)


def phase1_seeds(space: GenomeSpace, x0: Mapping[str, float], uniform_seeds: int) -> list[tuple[dict[str, float], dict]]:
    """Phase 1's first trials, as (genes, trial attributes): the start genome ``x0``, then
    ``uniform_seeds`` uniform-merge genomes at ratios i / (k + 1) (``uniform_genome``), so that the
    search starts from the best of the MRI's prescription and plain interpolation and phase 2's
    top-k can hold either."""
    seeds = [(dict(x0), {"start": True})]
    for i in range(1, max(uniform_seeds, 0) + 1):
        r = i / (uniform_seeds + 1)
        seeds.append((uniform_genome(space, x0, r), {"start": f"uniform r={r:.4f}"}))
    return seeds
