"""Merge methods on hand tensors, recipes, determinism, faults, and the two engine modes."""

import json

import pytest
import torch

from darwin_hydra.merge.engine import InMemoryMerger, NonFiniteTensorError, merge_tensor, merge_to_disk
from darwin_hydra.merge.methods import breadcrumbs_mask, combine, dare, della_drop, model_stock, slerp, trim
from darwin_hydra.merge.recipe import RatioMap, TensorRecipe, plain_ratio_map, tensor_seed

g = torch.Generator().manual_seed(0)
A = torch.randn(64, 32, generator=g)
B = A + 0.1 * torch.randn(64, 32, generator=g)
BASE = A - 0.1 * torch.randn(64, 32, generator=g)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_linear_and_task_arithmetic_formulas():
    assert torch.allclose(combine("linear", A, B, None, 0.3), 0.7 * A + 0.3 * B)
    ta = combine("task_arithmetic", A, B, BASE, 0.3, scale=2.0)
    assert torch.allclose(ta, BASE + 2.0 * (0.7 * (A - BASE) + 0.3 * (B - BASE)), atol=1e-6)


def test_ties_without_base_is_father_plus_r_times_mother_delta():
    # with the father as base, dA = 0: every entry of dB agrees with the elected sign
    out = combine("ties", A, B, None, 0.4)
    assert torch.allclose(out, A + 0.4 * (B - A), atol=1e-6)


def test_ties_sign_election_drops_disagreeing_entries():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, -1.0, 2.0])
    b = torch.tensor([1.0, -3.0, -1.0, -1.0])
    out = combine("ties", a, b, base, 0.5)
    # signs of 0.5a+0.5b: +, -, -, + -> entry 1 keeps only b, entry 3 keeps only a
    assert torch.allclose(out, torch.tensor([1.0, -1.5, -1.0, 1.0]))


def test_dare_drops_and_rescales_and_is_seeded():
    d = torch.ones(10000)
    out = dare(d, 0.3, gen(5))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.03
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert torch.equal(out, dare(d, 0.3, gen(5)))
    assert dare(d, 1.0, gen(5)) is d


def test_dare_ties_v5_rule_without_base():
    # child = A + r * DARE(B - A) when there is no base
    out = combine("dare_ties", A, B, None, 0.6, density_b=0.5, gen=gen(3))
    expected = A + 0.6 * dare(B - A, 0.5, gen(3))
    assert torch.allclose(out, expected, atol=1e-6)


def test_trim_keeps_the_largest_share():
    d = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 1.0])
    assert torch.equal(trim(d, 0.5), torch.tensor([0.0, -5.0, 0.0, 4.0, 0.0, 1.0]))


def test_breadcrumbs_drops_both_tails():
    d = torch.arange(1, 101, dtype=torch.float32)
    out = breadcrumbs_mask(d, density=0.5, gamma=0.1)
    kept = d[out != 0]
    assert kept.numel() == 50 and kept.min() == 41 and kept.max() == 90


def test_della_keeps_large_entries_more_often():
    d = torch.linspace(0.01, 1.0, 20000)
    out = della_drop(d, 0.5, 0.4, gen(2))
    kept = (out != 0).float()
    assert kept[:5000].mean() < 0.4 < 0.6 < kept[-5000:].mean()


def test_slerp_endpoints_and_parallel_fallback():
    assert torch.allclose(slerp(A, B, 0.0), A, atol=1e-5) and torch.allclose(slerp(A, B, 1.0), B, atol=1e-5)
    assert torch.allclose(slerp(A, 2 * A, 0.5), 1.5 * A)  # parallel: linear
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(x, y, 0.5)
    assert torch.allclose(mid, torch.tensor([0.5**0.5, 0.5**0.5]))


def test_model_stock_needs_a_base_and_interpolates():
    with pytest.raises(ValueError, match="base"):
        combine("model_stock", A, B, None, 0.5)
    out = model_stock(A, B, BASE)
    da, db = A - BASE, B - BASE
    cos = (da * db).sum() / (da.norm() * db.norm())
    t = 2 * cos / (1 + cos)
    assert torch.allclose(out, t * (A + B) / 2 + (1 - t) * BASE, atol=1e-5)


def test_transplant_and_source_return_the_parent_tensor_itself():
    r = TensorRecipe(ratio=0.05, t_lo=0.15, t_hi=0.85)
    assert merge_tensor("x", A, B, None, r, "h") is A
    assert merge_tensor("x", A, B, None, TensorRecipe(ratio=0.9, t_lo=0.15, t_hi=0.85), "h") is B
    assert merge_tensor("x", A, B, None, TensorRecipe(ratio=0.5, source="mother"), "h") is B


def test_rows_from_copies_router_rows():
    r = TensorRecipe(method="linear", ratio=0.5, rows_from=(("father", (1, 3)),))
    out = merge_tensor("gate", A, B, None, r, "h")
    assert torch.equal(out[1], A[1]) and torch.equal(out[3], A[3])
    assert torch.allclose(out[0], 0.5 * (A[0] + B[0]))


def test_method_weight_blends_with_linear():
    r = TensorRecipe(method="ties", ratio=0.5, method_weight=0.25, blend_method="linear")
    out = merge_tensor("x", A, B, BASE, r, "h")
    expected = 0.25 * combine("ties", A, B, BASE, 0.5) + 0.75 * combine("linear", A, B, BASE, 0.5)
    assert torch.allclose(out, expected, atol=1e-6)


def test_nan_in_a_parent_is_reported_by_name():
    bad = B.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match="mother tensor 'model.layers.3.mlp.up_proj.weight'"):
        merge_tensor("model.layers.3.mlp.up_proj.weight", A, bad, None, TensorRecipe(), "h")


def test_seed_depends_on_hash_and_name_only():
    assert tensor_seed("abc", "w") == tensor_seed("abc", "w")
    assert len({tensor_seed("abc", "w"), tensor_seed("abd", "w"), tensor_seed("abc", "v")}) == 3


def test_ratio_map_json_round_trip_and_plain_map():
    from darwin_hydra.merge.config import MergeConfig

    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    cfg = MergeConfig(method="ties", ratio=0.5, layer_ratios=[0.0, 1.0], component_ratios={"embed": 0.1})
    rmap = plain_ratio_map(names, cfg, 4)
    assert rmap[names[0]].ratio == 0.1 and rmap[names[1]].ratio == 0.0 and rmap[names[2]].ratio == 1.0
    back = RatioMap.from_json(rmap.to_json())
    assert dict(back) == dict(rmap)
    with pytest.raises(ValueError, match="warp"):
        plain_ratio_map(names, MergeConfig(component_ratios={"warp": 0.3}), 4)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny

    root = tmp_path_factory.mktemp("parents")
    base = save_tiny("qwen3_5_moe", root / "base", seed=0)
    father = perturbed_copy(base, root / "father", scale=0.05, seed=1)
    mother = perturbed_copy(base, root / "mother", scale=0.05, seed=2)
    return base, father, mother


def _readers(paths):
    from darwin_hydra.io.checkpoint import CheckpointReader

    return [CheckpointReader(p) for p in paths]


def test_export_is_bit_identical_across_workers_and_order(parents, tmp_path):
    from darwin_hydra.io.checkpoint import CheckpointReader

    base, father, mother = _readers(parents)
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.6, density_a=0.5, density_b=0.4) for n in father.names})
    one = merge_to_disk(father, mother, base, rmap, "g1", tmp_path / "one", workers=1, progress=False)
    two = merge_to_disk(father, mother, base, rmap, "g1", tmp_path / "two", workers=2, progress=False)
    s1 = json.loads((one / "checksums.json").read_text())["tensors"]
    s2 = json.loads((two / "checksums.json").read_text())["tensors"]
    assert s1 == s2
    # one tensor on its own (any order) gives the same bits
    name = father.names[-3]
    alone = merge_tensor(name, father.get(name), mother.get(name), base.get(name), rmap[name], "g1")
    assert torch.equal(alone, CheckpointReader(one).get(name))
    other = merge_to_disk(father, mother, base, rmap, "g2", tmp_path / "three", workers=2, progress=False)
    assert json.loads((other / "checksums.json").read_text())["tensors"] != s1


def test_in_memory_equals_export_including_fused_experts(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    base, father, mother = _readers(parents)
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.3, density_b=0.7) for n in father.names})
    out = merge_to_disk(father, mother, base, rmap, "h", tmp_path / "child", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    model = AutoModelForCausalLM.from_pretrained(father.path).eval()
    tensors = [{n: r.get(n) for n in r.names} for r in (father, mother, base)]
    merger = InMemoryMerger(model, tensors[0], tensors[1], tensors[2])
    assert merger.apply(rmap, "h") == len(father.names)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), exported.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # nothing changed -> nothing re-merged; a new hash re-merges only the random tensors
    assert merger.apply(rmap, "h") == 0
    lin = RatioMap({n: TensorRecipe(method="linear", ratio=0.3) for n in father.names})
    merger.apply(lin, "x")
    assert merger.apply(lin, "y") == 0


def test_export_refuses_a_map_missing_tensors(parents, tmp_path):
    base, father, mother = _readers(parents)
    rmap = RatioMap({n: TensorRecipe() for n in father.names[1:]})
    with pytest.raises(KeyError, match="no recipe"):
        merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_nan_during_export_leaves_no_child(parents, tmp_path):
    from safetensors.torch import load_file, save_file

    base, father, mother = _readers(parents)
    bad_dir = tmp_path / "bad"
    import shutil

    shutil.copytree(mother.path, bad_dir)
    sd = load_file(bad_dir / "model.safetensors")
    name = sorted(sd)[5]
    sd[name][..., 0] = float("inf")
    save_file(sd, bad_dir / "model.safetensors", metadata={"format": "pt"})
    from darwin_hydra.io.checkpoint import CheckpointReader

    rmap = RatioMap({n: TensorRecipe(method="ties", ratio=0.5) for n in father.names})
    with pytest.raises(NonFiniteTensorError, match=name.replace(".", r"\.")):
        merge_to_disk(father, CheckpointReader(bad_dir), base, rmap, "h", tmp_path / "child", progress=False)
    assert not (tmp_path / "child").exists()
    assert not list(tmp_path.glob("child.tmp*"))
