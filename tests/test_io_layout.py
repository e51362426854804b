"""Disk names vs in-memory layout (transformers 5): ``param_views`` maps every canonical tensor to a
view of the loaded model, fused MoE experts included, tied weights once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from darwin_hydra.io.reader import CheckpointReader
from darwin_hydra.io.writer import CheckpointWriter, storable, write_slot
from darwin_hydra.io.layout import fuse_experts, load_from, param_views, split_experts
from darwin_hydra.testing.tiny import save_tiny, tiny_model

SEEDS = ("qwen3_5", "gemma4", "qwen3_5_moe")
TOKENS = (torch.arange(64).view(1, 64) * 7) % 120


def tiny_mixtral(seed: int = 0):
    """Mixtral's layout: ``block_sparse_moe.experts.{e}.w1/w2/w3`` on disk, ``mlp.experts`` fused in memory."""
    cfg = AutoConfig.for_model(
        "mixtral", vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layout")
    out = {arch: save_tiny(arch, root / arch) for arch in SEEDS}
    tiny_mixtral().save_pretrained(root / "mixtral")
    out["mixtral"] = root / "mixtral"
    return out


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


@pytest.mark.parametrize("arch", (*SEEDS, "mixtral"))
def test_views_cover_disk_names_exactly(saved, arch):
    model = load(saved[arch])
    views = param_views(model)
    with CheckpointReader(saved[arch]) as r:
        assert set(views) == set(r.names) and len(views) == len(r.names)
        for name, t in r.iter_tensors():
            assert views[name].shape == t.shape and torch.equal(views[name], t), name
    owned = storages(model)
    assert all(v.untyped_storage().data_ptr() in owned for v in views.values())  # views, not copies


def test_fused_expert_orientation(saved):
    model = load(saved["qwen3_5_moe"])
    views = param_views(model)
    experts = model.model.layers[1].mlp.experts
    inter = experts.gate_up_proj.shape[1] // 2
    p = "model.layers.1.mlp.experts.5."
    assert views[p + "gate_proj.weight"].data_ptr() == experts.gate_up_proj[5, :inter].data_ptr()
    assert views[p + "up_proj.weight"].data_ptr() == experts.gate_up_proj[5, inter:].data_ptr()
    assert views[p + "down_proj.weight"].data_ptr() == experts.down_proj[5].data_ptr()
    per_expert = split_experts(experts.gate_up_proj, experts.down_proj)
    assert torch.equal(per_expert[5]["up_proj"], views[p + "up_proj.weight"])
    gate_up, down = fuse_experts(per_expert)
    assert torch.equal(gate_up, experts.gate_up_proj) and torch.equal(down, experts.down_proj)


def test_gemma4_tied_head_maps_once(saved):
    model = load(saved["gemma4"])
    views = param_views(model)
    assert len(model.state_dict()) == len(views) + 1 and "lm_head.weight" not in views
    assert "model.language_model.layers.0.layer_scalar" in views  # a persistent buffer, saved too
    embed = views["model.language_model.embed_tokens.weight"]
    with torch.no_grad():
        embed[7].mul_(2.0)
    assert torch.equal(model.lm_head.weight[7], embed[7])


@pytest.mark.parametrize("arch", ("qwen3_5_moe", "mixtral"))
def test_editing_one_expert_through_its_view_equals_loading_it(saved, tmp_path, arch):
    model = load(saved[arch])
    with torch.no_grad():
        before = model(TOKENS).logits
    views = param_views(model)
    names = (
        ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight")
        if arch == "qwen3_5_moe"
        else ("model.layers.1.block_sparse_moe.experts.3.w3.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight")
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            views[name].add_(torch.randn(views[name].shape, generator=g))
        edited = model(TOKENS).logits
    assert not torch.allclose(edited, before)
    # The same tensors written to disk under their canonical names load to the same model.
    with CheckpointWriter(tmp_path / "child", source_dir=saved[arch]) as w:
        for name, view in views.items():
            t = storable(name, view)
            w.fill(name, write_slot(w.reserve(name, t.dtype, t.shape), t))
    with torch.no_grad():
        reloaded = load(tmp_path / "child")(TOKENS).logits
    assert torch.equal(reloaded, edited)


@pytest.mark.parametrize("arch", SEEDS)
def test_load_from_reader_equals_from_pretrained(saved, arch):
    model = tiny_model(arch, seed=123)
    with CheckpointReader(saved[arch]) as r:
        assert load_from(model, r) == []
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, load(saved[arch])(TOKENS).logits)
    with pytest.raises(KeyError, match="not.a.tensor"):
        load_from(model, {"not.a.tensor": torch.zeros(1)})
