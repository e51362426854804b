"""The genome rule: genes -> per-tensor ratios, MRI blending, centred coordinates, hashing."""

import math

import pytest
from darwin_hydra.config import compose

from darwin_hydra.search.genome import (
    GenomeSpace,
    fit_genome_to_prescription,
    from_unit,
    genome_hash,
    genome_ratio,
    tensor_ratios,
    to_unit,
)

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.5.self_attn.q_proj.weight",
    "model.layers.5.mlp.experts.3.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def v6_space(num_layers=6, **over):
    cfg = compose(["genome=darwin_v6"] + [f"genome.{k}={v}" for k, v in over.items()]).genome
    return GenomeSpace.from_config(cfg, num_layers)


def test_neutral_genes_leave_global_ratio():
    space = v6_space()
    genes = space.full({g: 0.5 for g in space.genes} | {"global_ratio": 0.3})
    for n in NAMES:
        assert genome_ratio(n, genes, 6, space.n_blocks) == pytest.approx(0.3)


def test_component_and_block_genes_combine_in_logit_space():
    space = v6_space()
    genes = space.full({g: 0.5 for g in space.genes} | {"attn_ratio": 0.8, "block_5": 0.9})
    r = genome_ratio("model.layers.5.self_attn.q_proj.weight", genes, 6, 6)
    expected = 1 / (1 + math.exp(-(math.log(0.8 / 0.2) + math.log(0.9 / 0.1))))
    assert r == pytest.approx(expected)
    # the ffn of layer 0 sees neither gene
    assert genome_ratio("model.layers.0.mlp.up_proj.weight", genes, 6, 6) == pytest.approx(0.5)
    # experts follow the ffn gene
    genes2 = space.full({g: 0.5 for g in space.genes} | {"ffn_ratio": 0.7})
    assert genome_ratio("model.layers.5.mlp.experts.3.up_proj.weight", genes2, 6, 6) == pytest.approx(0.7)


def test_mri_trust_blends_prescription():
    space = v6_space()
    genes = space.full({g: 0.5 for g in space.genes} | {"mri_trust": 0.25, "global_ratio": 0.2})
    r_mri = {n: 1.0 for n in NAMES}
    r = tensor_ratios(NAMES, genes, r_mri, 6, 6)
    assert all(v == pytest.approx(0.25 * 1.0 + 0.75 * 0.2) for v in r.values())


def test_layerwise_space_has_a_gene_per_layer():
    cfg = compose(["genome=layerwise"]).genome
    space = GenomeSpace.from_config(cfg, 4)
    assert [g for g in space.genes if g.startswith("layer_")] == ["layer_0", "layer_1", "layer_2", "layer_3"]
    genes = space.full({g: 0.5 for g in space.genes} | {"layer_2": 0.9})
    assert genome_ratio("model.layers.2.mlp.up_proj.weight", genes, 4, 0) == pytest.approx(0.9)
    cfg.per_component = True
    space = GenomeSpace.from_config(cfg, 4)
    assert "layer_3_attn" in space.genes and "layer_3_ffn" in space.genes


def test_bad_bounds_and_unknown_genes_are_errors():
    with pytest.raises(ValueError, match=r"genome.bounds.mri_trust=\[0.8, 0.2\]"):
        v6_space(**{"bounds.mri_trust": [0.8, 0.2]})
    cfg = compose([]).genome
    cfg.genes.append("warp_ratio")
    cfg.bounds["warp_ratio"] = [0, 1]
    with pytest.raises(ValueError, match="warp_ratio"):
        GenomeSpace.from_config(cfg, 6)


def test_centred_coordinates_round_trip_and_cover_bounds():
    space = v6_space(**{"bounds.mri_trust": [0.5, 1.0]})
    x0 = space.clip(space.centre() | {"mri_trust": 0.9, "global_ratio": 0.2})
    assert from_unit({g: 0.0 for g in space.genes}, x0, space) == pytest.approx(x0)
    lo = from_unit({g: -1.0 for g in space.genes}, x0, space)
    hi = from_unit({g: 1.0 for g in space.genes}, x0, space)
    assert lo["mri_trust"] == 0.5 and hi["mri_trust"] == 1.0 and lo["global_ratio"] == 0.0
    vals = space.clip(space.centre() | {"global_ratio": 0.7})
    assert from_unit(to_unit(vals, x0, space), x0, space) == pytest.approx(vals)


def test_fit_to_prescription_reproduces_a_blockwise_pattern():
    space = v6_space()
    r_mri = {f"model.layers.{l}.mlp.up_proj.weight": (0.8 if l < 3 else 0.2) for l in range(6)}
    x0 = fit_genome_to_prescription(space, r_mri, 6)
    genes = space.full(x0 | {"mri_trust": 0.0})
    got = tensor_ratios(list(r_mri), genes, None, 6, 6)
    for n, r in r_mri.items():
        assert got[n] == pytest.approx(r, abs=0.02)


def test_genome_hash_is_stable_and_sensitive():
    ctx = {"father": "abc", "mother": "def"}
    h = genome_hash({"a": 0.1, "b": 0.2}, ctx)
    assert h == genome_hash({"b": 0.2, "a": 0.1}, dict(ctx))
    assert h != genome_hash({"a": 0.1, "b": 0.2000001}, ctx)
    assert h != genome_hash({"a": 0.1, "b": 0.2}, {"father": "abc", "mother": "xyz"})
    assert len(h) == 16


@pytest.mark.parametrize("genome", ["darwin_v6", "darwin_v5", "layerwise"])
def test_a_uniform_genome_merges_every_tensor_as_the_uniform_merge_does(genome):
    """phase 1's uniform seeds: the genome of each space that is child = (1 - r) father + r mother."""
    import torch

    from darwin_hydra.merge.methods import merge_tensor
    from darwin_hydra.merge.recipe import TensorRecipe
    from darwin_hydra.search.genome import phase1_seeds, uniform_genome
    from darwin_hydra.search.recipe import genome_ratio_map

    space = GenomeSpace.from_config(compose([f"genome={genome}"]).genome, 6)
    x0 = space.clip({g: (lo + hi) / 2 for g, (lo, hi) in space.bounds.items()})
    names = [n for n in NAMES if "experts" not in n]
    gen = torch.Generator().manual_seed(0)
    f, m = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    for r in (0.25, 0.6):
        rmap = genome_ratio_map(space, uniform_genome(space, x0, r), names, {}, 6, None, None)
        for n in names:
            assert rmap[n].ratio == pytest.approx(r, abs=1e-6), n
            child = merge_tensor(f, m, None, rmap[n], seed=1, name=n)
            want = merge_tensor(f, m, None, TensorRecipe(method="linear", ratio=r), seed=1, name=n)
            torch.testing.assert_close(child, want, atol=1e-5, rtol=1e-5)
    seeds = phase1_seeds(space, x0, 3)
    assert seeds[0] == (x0, {"start": True}) and len(seeds) == 4
    assert [a["start"] for _, a in seeds[1:]] == ["uniform r=0.2500", "uniform r=0.5000", "uniform r=0.7500"]
