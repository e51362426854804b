"""One place where a genome becomes a merge recipe (the merge engine's ratio map)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from darwin_hydra.merge.recipe import RatioMap, TensorRecipe
from darwin_hydra.search.genome import GenomeSpace, digest, genome_hash, tensor_ratios


def genome_ratio_map(
    space: GenomeSpace,
    values: Mapping[str, float],
    names: Sequence[str],
    r_mri: Mapping[str, float] | None,
    num_layers: int,
    t_lo: float | None,
    t_hi: float | None,
) -> RatioMap:
    """Per-tensor DARE-TIES recipes of a genome (``values`` = the space's genes).

    r(T) as in ``darwin_hydra.search.genome``; densities and merge_method_weight are genome-wide;
    tensors with r(T) < t_lo or > t_hi are transplanted whole from the father or the mother.
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
    return RatioMap(recipes)


def uniform_ratio_map(names: Sequence[str], ratio: float) -> RatioMap:
    """child = (1 - r) * father + r * mother for every tensor (the baseline merges)."""
    return RatioMap({n: TensorRecipe(method="linear", ratio=float(ratio)) for n in names})


def hash_context(
    space: GenomeSpace, fingerprints: Mapping[str, str], r_mri: Mapping[str, float] | None, t_lo, t_hi
) -> dict[str, Any]:
    """Everything besides the genes that decides the child, for ``genome_hash``."""
    return {
        "space": space.name,
        "genes": list(space.genes),
        "fixed": dict(space.fixed),
        "blend_method": space.blend_method,
        "parents": dict(fingerprints),
        "r_mri": digest({k: round(float(v), 12) for k, v in (r_mri or {}).items()}),
        "transplant": [t_lo, t_hi],
        "method": "dare_ties",
    }


def hash_genome(space, values, fingerprints, r_mri, t_lo, t_hi) -> str:
    return genome_hash(values, hash_context(space, fingerprints, r_mri, t_lo, t_hi))
