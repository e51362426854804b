"""One place where a genome becomes a merge recipe (the merge engine's ratio map), MoE rules included.

MoE rules (applied after the genome's ratios):

- router source per block: with ``router_source = [s_0, ..., s_{k-1}]`` the layers split into k
  equal blocks; the router tensors (``mlp.gate``, ``shared_expert_gate``) of block b come whole from
  s_b (``father`` / ``mother``) or follow the ratio map (``merge``).
- dead-expert revival: an expert dead in the mother's MoE scan and alive in the father's takes all
  of the father's weights for that expert, and the router rows that score that expert (row e of
  ``mlp.gate.weight``) are the father's, scaled to the mean row norm of the child's router (also when
  the router is taken whole from the mother) times g = 4 ** revive_gain: tokens reach the revived
  expert the way they reached it in the father, at the scale the child's router scores the others
  (g = 1) or up to 4x harder, while the other rows follow the router's own recipe. ``revive_gain``
  is a gene a reviving genome evolves (``GenomeSpace.from_config``): the father's row points where
  the father's hidden states lay, and the child's hidden states (the mother's, in the layers she
  trained) can score it lower than the father did. ``genome.fixed.revive_gain=0`` pins g = 1 and
  keeps the genome hashes of children found before the gene (``space_for_genome``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from darwin_hydra.arch import EXPERT, ROUTER, tensor_info
from darwin_hydra.merge.recipe import FATHER, MOTHER, RatioMap, TensorRecipe
from darwin_hydra.search.genome import GenomeSpace, digest, genome_hash, revive_gain, tensor_ratios

ROUTER_SOURCES = (FATHER, MOTHER, "merge")
log = logging.getLogger(__name__)


def revival_plan(moe_father: Any, moe_mother: Any) -> dict[int, list[int]]:
    """Layer -> experts dead in the mother's MoE scan and alive in the father's (their dead masks)."""
    if moe_father is None or moe_mother is None:
        return {}
    dead_f = moe_father.dead_experts()
    plan = {}
    for layer, dead in moe_mother.dead_experts().items():
        revive = [e for e in dead if e not in dead_f.get(layer, [])]
        if revive:
            plan[int(layer)] = revive
    return plan


def apply_moe_rules(
    recipes: dict[str, TensorRecipe],
    num_layers: int,
    router_source: Sequence[str] | None = None,
    revive: Mapping[int, Sequence[int]] | None = None,
    gain: float = 1.0,
) -> dict[str, TensorRecipe]:
    """Router source per block and dead-expert revival on top of a recipe map (see module doc);
    ``gain``: the revived router rows' extra scale (``genome.revive_gain``)."""
    if router_source:
        bad = [s for s in router_source if s not in ROUTER_SOURCES]
        if bad:
            raise ValueError(f"genome.router_source: {bad} not in {ROUTER_SOURCES}")
    out = dict(recipes)
    for name, rec in recipes.items():
        info = tensor_info(name)
        if info.layer is None:
            continue
        if info.component == ROUTER and router_source:
            k = len(router_source)
            src = router_source[min(info.layer * k // max(num_layers, 1), k - 1)]
            if src != "merge":
                out[name] = replace(rec, source=src)
        if revive and info.layer in revive:
            experts = tuple(sorted(int(e) for e in revive[info.layer]))
            if info.component == EXPERT and info.expert in experts:
                out[name] = replace(out[name], source=FATHER)
            elif info.component == ROUTER and "shared_expert_gate" not in name and out[name].transplant_side() != FATHER:
                out[name] = replace(out[name], rows_from=((FATHER, experts),), rows_gain=gain)
    return out


def genome_ratio_map(
    space: GenomeSpace,
    values: Mapping[str, float],
    names: Sequence[str],
    r_mri: Mapping[str, float] | None,
    num_layers: int,
    t_lo: float | None,
    t_hi: float | None,
    router_source: Sequence[str] | None = None,
    revive: Mapping[int, Sequence[int]] | None = None,
    outside_decoder: str = "merge",
) -> RatioMap:
    """Per-tensor DARE-TIES recipes of a genome (``values`` = the space's genes).

    r(T) as in ``darwin_hydra.search.genome``; densities and merge_method_weight are genome-wide;
    tensors with r(T) < t_lo or > t_hi are transplanted whole from the father or the mother; then
    the MoE rules (module doc); then ``outside_decoder`` (``apply_outside_decoder``).
    """
    genes = space.full(values)
    ratios = tensor_ratios(names, genes, r_mri, num_layers, space.n_blocks)
    recipes = {}
    for name in names:
        recipes[name] = TensorRecipe(
            method="dare_ties",
            ratio=float(ratios[name]),
            density_a=float(genes["density_a"]),
            density_b=float(genes["density_b"]),
            method_weight=float(genes["merge_method_weight"]),
            blend_method=space.blend_method,
            t_lo=t_lo,
            t_hi=t_hi,
        )
    if router_source or revive:
        recipes = apply_moe_rules(recipes, num_layers, router_source, revive, revive_gain(genes["revive_gain"]))
    return RatioMap(apply_outside_decoder(recipes, outside_decoder))


def apply_outside_decoder(recipes: Mapping[str, TensorRecipe], policy: str = "merge") -> dict[str, TensorRecipe]:
    """Tensors outside the text decoder (``arch.outside_decoder``: vision/audio towers, projectors, MTP
    heads) taken whole from the ``father`` or the ``mother``; ``merge`` leaves their recipes as they are."""
    from darwin_hydra.arch import outside_decoder

    if str(policy) == "merge":
        return dict(recipes)
    return {n: replace(r, source=str(policy)) if outside_decoder(n) else r for n, r in recipes.items()}


def outside_decoder_rule(names: Sequence[str], policy: str) -> dict[str, str]:
    """What ``outside_decoder`` adds to a hash: nothing when it changes no tensor (no tensor outside
    the decoder, or ``merge``), so the children of text-only pairs keep the hashes they had."""
    from darwin_hydra.arch import outside_decoder

    if str(policy) == "merge" or not any(outside_decoder(n) for n in names):
        return {}
    return {"outside_decoder": str(policy)}


def uniform_ratio_map(names: Sequence[str], ratio: float) -> RatioMap:
    """child = (1 - r) * father + r * mother for every tensor (the baseline merges)."""
    return RatioMap({n: TensorRecipe(method="linear", ratio=float(ratio)) for n in names})


def hash_context(
    space: GenomeSpace, fingerprints: Mapping[str, str], r_mri: Mapping[str, float] | None, t_lo, t_hi,
    router_source=None, revive=None, outside: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Everything besides the genes that decides the child, for ``genome_hash``. ``outside``:
    ``outside_decoder_rule``'s entry."""
    moe = dict(outside or {})
    if router_source:
        moe["router_source"] = list(router_source)
    if revive:
        moe["revive"] = {str(k): sorted(v) for k, v in sorted(revive.items())}
        # v2: router rows scaled to the child's router, also under a transplanted router (a run
        # revived under v1 rebuilds a different child, so it gets a different hash)
        moe["revive_rule"] = 2
    # revive_gain pinned at 0 is the row rule from before the gene existed: left out, so those
    # children keep their hashes (and their DARE masks)
    fixed = {k: v for k, v in space.fixed.items() if not (k == "revive_gain" and v == 0.0)}
    return moe | {
        "space": space.name,
        "genes": list(space.genes),
        "fixed": fixed,
        "blend_method": space.blend_method,
        "parents": dict(fingerprints),
        "r_mri": digest({k: round(float(v), 12) for k, v in (r_mri or {}).items()}),
        "transplant": [t_lo, t_hi],
        "method": "dare_ties",
    }


def space_for_genome(space: GenomeSpace, genes: Mapping[str, float], where: str = "genome") -> GenomeSpace:
    """The space a saved genome was found in: one found before the ``revive_gain`` gene existed has
    no value for it, and its revived rows had gain 1 (``revive_gain`` pinned at 0, which also gives
    back its genome hash)."""
    if "revive_gain" in space.genes and "revive_gain" not in genes:
        log.info("%s predates the revive_gain gene: its revived router rows keep gain 1", where)
        return space.pinned("revive_gain", 0.0)
    return space


def moe_rules(genome_cfg: Any, scan: Any) -> tuple[list[str] | None, dict[int, list[int]]]:
    """(router_source, revival plan) of a genome config and the run's MRI."""
    router_source = list(genome_cfg.router_source) if genome_cfg.router_source else None
    revive = revival_plan(scan.moe_father, scan.moe_mother) if genome_cfg.revive_dead_experts else {}
    return router_source, revive


def hash_genome(space, values, fingerprints, r_mri, t_lo, t_hi, router_source=None, revive=None, outside=None) -> str:
    return genome_hash(values, hash_context(space, fingerprints, r_mri, t_lo, t_hi, router_source, revive, outside))


@dataclass(frozen=True)
class BreedingPlan:
    """Everything besides the genes that decides a run's child: the genome space, the parents (tensor
    names, layer count, fingerprints), the MRI prescription, the transplant thresholds and the MoE
    rules. ``hash(values)`` is a genome's ``genome_hash``; ``ratio_map(values)`` its per-tensor recipe."""

    space: GenomeSpace
    names: tuple[str, ...]
    num_layers: int
    r_mri: Mapping[str, float]
    t_lo: float | None
    t_hi: float | None
    fingerprints: Mapping[str, str]
    router_source: tuple[str, ...] | None = None
    revive: Mapping[int, Sequence[int]] = field(default_factory=dict)
    outside_decoder: str = "merge"

    def hash(self, values: Mapping[str, float]) -> str:
        return hash_genome(self.space, values, self.fingerprints, self.r_mri, self.t_lo, self.t_hi,
                           self.router_source, self.revive, outside_decoder_rule(self.names, self.outside_decoder))

    def ratio_map(self, values: Mapping[str, float]) -> RatioMap:
        return genome_ratio_map(self.space, values, self.names, self.r_mri, self.num_layers, self.t_lo, self.t_hi,
                                self.router_source, self.revive, self.outside_decoder)

    def uniform(self, ratio: float) -> RatioMap:
        """child = (1 - r) * father + r * mother for every tensor (the baselines), outside the decoder
        as ``outside_decoder`` says."""
        return RatioMap(apply_outside_decoder(uniform_ratio_map(self.names, ratio), self.outside_decoder))

    def for_genome(self, genes: Mapping[str, float], where: str = "genome") -> "BreedingPlan":
        """The plan a saved genome was found under (``space_for_genome``)."""
        space = space_for_genome(self.space, genes, where)
        return self if space is self.space else replace(self, space=space)

    # ---- the child's candidates: the search's genome, the MRI alone, one uniform ratio -----------------

    def mri_only(self) -> RatioMap:
        """The MRI's own child (no genome): child(T) = (1 - r) father + r mother with r = r_mri(T)
        (0.5 where the MRI gives none), the MRI's transplant rule, the MoE rules (revived rows at gain 1)
        and ``outside_decoder``."""
        recipes = {n: TensorRecipe(method="linear", ratio=float(self.r_mri.get(n, 0.5)), t_lo=self.t_lo, t_hi=self.t_hi)
                   for n in self.names}
        if self.router_source or self.revive:
            recipes = apply_moe_rules(recipes, self.num_layers, self.router_source, self.revive)
        return RatioMap(apply_outside_decoder(recipes, self.outside_decoder))

    def candidate_hash(self, kind: str, ratio: float | None = None) -> str:
        """genome_hash of a child that is not a genome: ``uniform`` (one ratio) or ``mri`` (``mri_only``)."""
        context = {"candidate": kind, "parents": dict(self.fingerprints),
                   **outside_decoder_rule(self.names, self.outside_decoder)}
        if kind == MRI_ONLY:
            context |= {"r_mri": digest({k: round(float(v), 12) for k, v in self.r_mri.items()}),
                        "transplant": [self.t_lo, self.t_hi]}
            if self.router_source:
                context["router_source"] = list(self.router_source)
            if self.revive:
                context["revive"] = {str(k): sorted(v) for k, v in sorted(self.revive.items())}
            return genome_hash({}, context)
        if kind == UNIFORM:
            return genome_hash({"ratio": float(ratio)}, context)
        raise ValueError(f"unknown child candidate {kind!r}: {GENOME}, {MRI_ONLY} or {UNIFORM}")

    def child(self, genome: Mapping[str, Any]) -> tuple[RatioMap, str]:
        """(recipe, genome_hash) of the child ``genome.json`` describes: its ``child`` entry says which
        candidate won on dev (``genome``, the default and what older files mean; ``mri``; ``uniform``
        with its ratio)."""
        kind, ratio = child_kind(genome)
        if kind == GENOME:
            plan = self.for_genome(genome["genes"])
            return plan.ratio_map(genome["genes"]), plan.hash(genome["genes"])
        if kind == UNIFORM:
            return self.uniform(ratio), self.candidate_hash(UNIFORM, ratio)
        return self.mri_only(), self.candidate_hash(MRI_ONLY)


GENOME, MRI_ONLY, UNIFORM = "genome", "mri", "uniform"


def child_kind(genome: Mapping[str, Any]) -> tuple[str, float | None]:
    """(kind, ratio) of ``genome.json``'s ``child`` entry (absent: ``genome``)."""
    entry = genome.get("child") or {"kind": GENOME}
    kind = entry.get("kind", GENOME)
    if kind not in (GENOME, MRI_ONLY, UNIFORM):
        raise ValueError(f"genome.json: child kind {kind!r} is not {GENOME}, {MRI_ONLY} or {UNIFORM}")
    if kind == UNIFORM and not isinstance(entry.get("ratio"), (int, float)):
        raise ValueError("genome.json: a uniform child needs its ratio (child.ratio)")
    return kind, (float(entry["ratio"]) if kind == UNIFORM else None)
