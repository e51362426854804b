"""MoE-aware breeding on tiny Qwen3.5-MoE parents: router source per block, dead-expert revival,
and the same child from the per-expert (disk) and fused (in-memory) layouts."""

from types import SimpleNamespace

import pytest
import torch
from darwin_hydra.config import compose

from darwin_hydra.io.reader import CheckpointReader
from darwin_hydra.merge.engine import InMemoryMerger, merge_to_disk
from darwin_hydra.search.genome import GenomeSpace
from darwin_hydra.search.recipe import apply_moe_rules, genome_ratio_map, revival_plan

L = 6


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny

    root = tmp_path_factory.mktemp("moe")
    base = save_tiny("qwen3_5_moe", root / "base", seed=0, num_layers=L)
    return [CheckpointReader(p) for p in (base, perturbed_copy(base, root / "father", 0.05, 1),
                                          perturbed_copy(base, root / "mother", 0.05, 2))]


def genes(space):
    return {g: 0.5 for g in space.genes} | {"density_a": 0.8, "density_b": 0.8, "mri_trust": 0.0}


def space():
    return GenomeSpace.from_config(compose([]).genome, L)


def test_router_source_per_block_puts_exactly_those_routers_in_the_child(parents, tmp_path):
    base, father, mother = parents
    sp = space()
    rmap = genome_ratio_map(sp, genes(sp), father.names, None, L, None, None, router_source=["mother", "mother", "father"])
    child = CheckpointReader(merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", progress=False))
    routers = [n for n in father.names if n.endswith("mlp.gate.weight")]
    assert len(routers) == L
    for n in routers:
        layer = int(n.split(".layers.")[1].split(".")[0])
        want = mother if layer < 4 else father  # blocks of 2 layers: B, B, A
        assert torch.equal(child.get(n), want.get(n)), n
    # everything else is merged (differs from both parents)
    n = "model.layers.1.mlp.experts.0.up_proj.weight"
    assert not torch.equal(child.get(n), father.get(n)) and not torch.equal(child.get(n), mother.get(n))


def test_revived_experts_are_the_fathers_bit_for_bit(parents, tmp_path):
    base, father, mother = parents
    sp = space()
    revive = {2: [1, 5], 4: [0]}
    rmap = genome_ratio_map(sp, genes(sp), father.names, None, L, None, None, revive=revive)
    child = CheckpointReader(merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", progress=False))
    for layer, experts in revive.items():
        for e in experts:
            for part in ("gate_proj", "up_proj", "down_proj"):
                n = f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"
                assert torch.equal(child.get(n), father.get(n)), n
        _assert_revived_rows(child, father, layer, experts)
    # a non-revived expert is merged
    n = "model.layers.2.mlp.experts.2.up_proj.weight"
    assert not torch.equal(child.get(n), father.get(n))


def _assert_revived_rows(child, father, layer, experts, gain=1.0):
    # The router rows of revived experts are the father's, at the scale of the child's other rows
    # (times the genome's revive gain).
    gate = f"model.layers.{layer}.mlp.gate.weight"
    g_child, g_father = child.get(gate).float(), father.get(gate).float()
    rest = [e for e in range(g_child.shape[0]) if e not in experts]
    s = gain * g_child[rest].norm(dim=-1).mean() / g_father[rest].norm(dim=-1).mean()
    for e in range(g_child.shape[0]):
        assert torch.allclose(g_child[e], g_father[e] * s, rtol=1e-2, atol=1e-6) == (e in experts), (gate, e)


def test_reviving_genome_evolves_the_router_row_gain(parents, tmp_path):
    base, father, mother = parents
    cfg = compose([]).genome
    cfg.revive_dead_experts = True
    sp = GenomeSpace.from_config(cfg, L)
    assert sp.genes[-1] == "revive_gain" and sp.bounds["revive_gain"] == (0.0, 1.0)
    cfg.fixed = {"revive_gain": 0.0}  # pinned: no gene, the plain row-norm rule
    assert "revive_gain" not in GenomeSpace.from_config(cfg, L).genes
    revive = {2: [1, 5]}
    rmap = genome_ratio_map(sp, genes(sp) | {"revive_gain": 0.5}, father.names, None, L, None, None, revive=revive)
    assert rmap["model.layers.2.mlp.gate.weight"].rows_gain == pytest.approx(2.0)
    child = CheckpointReader(merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", progress=False))
    _assert_revived_rows(child, father, 2, [1, 5], gain=2.0)
    for part in ("gate_proj", "up_proj", "down_proj"):  # the gain touches the router rows only
        n = f"model.layers.2.mlp.experts.5.{part}.weight"
        assert torch.equal(child.get(n), father.get(n)), n


def test_revive_gain_pinned_at_zero_keeps_the_hashes_from_before_the_gene():
    # a genome found before revive_gain existed (no value for it) rebuilds its child: same space, same
    # genome hash (so the same DARE masks), gain 1
    from darwin_hydra.search.recipe import hash_genome, space_for_genome

    cfg = compose([]).genome
    cfg.revive_dead_experts = True
    evolved = GenomeSpace.from_config(cfg, 8)
    old_genes = {g: 0.5 for g in evolved.genes if g != "revive_gain"}
    space = space_for_genome(evolved, old_genes)
    assert "revive_gain" not in space.genes and space.fixed["revive_gain"] == 0.0
    assert space_for_genome(evolved, old_genes | {"revive_gain": 0.3}) is evolved
    cfg.fixed = {"revive_gain": 0.0}
    assert GenomeSpace.from_config(cfg, 8) == space
    args = ({"father": "f", "mother": "m"}, {}, 0.15, 0.85, None, {1: [3, 4]})
    assert hash_genome(space, old_genes, *args) == "5482ba12d16fb7a2"  # computed by the code before the gene (0ba3eb8)
    assert hash_genome(evolved, old_genes | {"revive_gain": 0.0}, *args) != "5482ba12d16fb7a2"  # another space
    rmap = genome_ratio_map(space, old_genes, ["model.layers.1.mlp.gate.weight"], None, 8, None, None, revive={1: [3, 4]})
    assert rmap["model.layers.1.mlp.gate.weight"].rows_gain == 1.0


def test_revival_under_the_mothers_router_takes_the_fathers_rows(parents, tmp_path):
    # Darwin-35B-A3B's recipe: the mother's routers (B, B, A) and her dead experts revived.
    base, father, mother = parents
    sp = space()
    revive = {1: [3]}
    rmap = genome_ratio_map(sp, genes(sp), father.names, None, L, None, None,
                            router_source=["mother", "mother", "father"], revive=revive)
    child = CheckpointReader(merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", progress=False))
    _assert_revived_rows(child, father, 1, [3])
    gate = "model.layers.1.mlp.gate.weight"
    rest = [e for e in range(child.get(gate).shape[0]) if e != 3]
    assert torch.equal(child.get(gate)[rest], mother.get(gate)[rest])


def test_per_expert_and_fused_layouts_give_the_same_child(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    base, father, mother = parents
    cfg = compose([]).genome
    cfg.revive_dead_experts = True
    sp = GenomeSpace.from_config(cfg, L)  # with the revive_gain gene (at 0.5: the rows x2)
    rmap = genome_ratio_map(sp, genes(sp), father.names, None, L, 0.15, 0.85, router_source=["mother", "merge", "father"],
                            revive={3: [2, 7]})
    assert rmap["model.layers.3.mlp.gate.weight"].rows_gain == 2.0
    disk = AutoModelForCausalLM.from_pretrained(merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", progress=False))
    model = AutoModelForCausalLM.from_pretrained(father.path)
    assert any(p.dim() == 3 for p in model.parameters())  # fused experts in memory
    tensors = [{n: r.get(n) for n in r.names} for r in (father, mother, base)]
    InMemoryMerger(model, *tensors).apply(rmap, "h")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), disk.state_dict().items()):
        assert torch.equal(v, v2), k


def test_revival_plan_takes_mother_dead_father_alive():
    scan = lambda dead: SimpleNamespace(dead_experts=lambda: dead)  # noqa: E731
    plan = revival_plan(scan({0: [1], 1: [2, 3]}), scan({0: [1, 4], 1: [3], 2: [0]}))
    assert plan == {0: [4], 2: [0]}
    with pytest.raises(ValueError, match="router_source"):
        apply_moe_rules({}, L, router_source=["mom"])
