"""The Hub-layout fixtures are faithful: scaled configs keep every structural feature of the real ones,
the files carry the Hub's tensor names, dtypes, shards and config keys (MTP head, fused experts, vision
towers, tied heads), and they load, generate and see images with the classes the configs name.

The expected layouts below are facts about the real checkpoints (sources in
``darwin_hydra/testing/hub_configs/SOURCES.md``), written out independently of the code under test."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from darwin_hydra.testing.hub import (
    HUB_MODELS,
    INDEX_FILE,
    build_hub_model,
    hub_config,
    image_inputs,
    perturbed_mother,
    real_config,
    save_hub_model,
    text_only_mother,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN_DENSE, QWEN_MOE, GEMMA = "qwen3.5-9b", "qwen3.5-35b-a3b", "gemma-4-31b-it"
NAMES = (QWEN_DENSE, QWEN_MOE, GEMMA)

# Per-layer tensor names (after "model.language_model.layers.{i}.") of the real checkpoints.
_QWEN_GDN = {
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"linear_attn.{n}" for n in ("A_log", "dt_bias", "conv1d.weight", "norm.weight", "out_proj.weight",
                                   "in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight")),
}
_QWEN_ATTN = {
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
}
_QWEN_MLP = {f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
_QWEN_MOE = {
    "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_expert_gate.weight",
    *(f"mlp.shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")),
}
_GEMMA_SLIDING = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "layer_scalar",
    *(f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
    *(f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")),
}
HUB_LAYER_KEYS = {
    QWEN_DENSE: {"linear_attention": _QWEN_GDN | _QWEN_MLP, "full_attention": _QWEN_ATTN | _QWEN_MLP},
    QWEN_MOE: {"linear_attention": _QWEN_GDN | _QWEN_MOE, "full_attention": _QWEN_ATTN | _QWEN_MOE},
    # attention_k_eq_v: a full-attention layer reads its values from k_proj and has no v_proj.
    GEMMA: {"sliding_attention": _GEMMA_SLIDING, "full_attention": _GEMMA_SLIDING - {"self_attn.v_proj.weight"}},
}
# Vision towers: keys per block/layer and outside them (incl. Gemma's projector into the text model).
_QWEN_VISION_BLOCK = {f"{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
                      for p in ("weight", "bias")}
_QWEN_VISION_REST = {"model.visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.bias",
                     "model.visual.pos_embed.weight",
                     *(f"model.visual.merger.{m}.{p}" for m in ("norm", "linear_fc1", "linear_fc2") for p in ("weight", "bias"))}
_GEMMA_VISION_LAYER = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    *(f"self_attn.{n}.linear.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(f"mlp.{n}.linear.weight" for n in ("gate_proj", "up_proj", "down_proj")),
}
_GEMMA_VISION_REST = {"model.vision_tower.patch_embedder.input_proj.weight",
                      "model.vision_tower.patch_embedder.position_embedding_table",
                      "model.vision_tower.std_bias", "model.vision_tower.std_scale",
                      "model.embed_vision.embedding_projection.weight"}
VISION = {
    QWEN_DENSE: ("model.visual.blocks", _QWEN_VISION_BLOCK, _QWEN_VISION_REST),
    QWEN_MOE: ("model.visual.blocks", _QWEN_VISION_BLOCK, _QWEN_VISION_REST),
    GEMMA: ("model.vision_tower.encoder.layers", _GEMMA_VISION_LAYER, _GEMMA_VISION_REST),
}
_MTP_COMMON = {"mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"}
MTP_KEYS = {
    QWEN_DENSE: _MTP_COMMON | {"mtp.layers.0." + k for k in _QWEN_ATTN | _QWEN_MLP},
    QWEN_MOE: _MTP_COMMON | {"mtp.layers.0." + k for k in _QWEN_ATTN | _QWEN_MOE},
    GEMMA: set(),
}
SHARD_RE = {
    QWEN_DENSE: r"model\.safetensors-\d{5}-of-\d{5}\.safetensors",
    QWEN_MOE: r"model\.safetensors-\d{5}-of-\d{5}\.safetensors",
    GEMMA: r"model-\d{5}-of-\d{5}\.safetensors",
}


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_FILE).read_text())["weight_map"]


def headers(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) from the safetensors files the index names."""
    out = {}
    for fname in sorted(set(weight_map(path).values())):
        with safe_open(str(path / fname), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                out[name] = (t.get_dtype(), tuple(t.get_shape()))
    return out


def text_layer_keys(names, prefix: str = "model.language_model.layers.") -> dict[int, set[str]]:
    layers: dict[int, set[str]] = {}
    for n in names:
        if n.startswith(prefix):
            i, rest = n[len(prefix):].split(".", 1)
            layers.setdefault(int(i), set()).add(rest)
    return layers


@pytest.fixture(scope="module")
def fathers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {name: save_hub_model(name, root / name, seed=0) for name in NAMES}


# ---- the scaled configs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_scaled_config_keeps_every_key_and_the_layer_pattern(name):
    real, tiny = real_config(name), hub_config(name)
    assert tiny.keys() == real.keys()
    for sub in ("text_config", "vision_config"):
        assert tiny[sub].keys() == real[sub].keys(), sub
    rt, tt = real["text_config"], tiny["text_config"]
    assert tt["hidden_size"] <= 64 and tt["vocab_size"] <= 512 and tt["num_hidden_layers"] < rt["num_hidden_layers"]
    period = rt["layer_types"].index("full_attention") + 1
    assert tt["layer_types"] == rt["layer_types"][: tt["num_hidden_layers"]]
    assert tt["num_hidden_layers"] % period == 0 and tt["layer_types"][period - 1] == "full_attention"
    assert tt["layer_types"].count("full_attention") >= 1 and len(set(tt["layer_types"])) == 2


@pytest.mark.parametrize("name", NAMES)
def test_scaled_config_keeps_head_ratios_and_options(name):
    rt, tt = real_config(name)["text_config"], hub_config(name)["text_config"]

    def ratio(cfg, a, b):
        return cfg[a] / cfg[b]

    assert ratio(tt, "num_attention_heads", "num_key_value_heads") == ratio(rt, "num_attention_heads", "num_key_value_heads")
    if name == GEMMA:
        assert ratio(tt, "num_attention_heads", "num_global_key_value_heads") == 8 == ratio(
            rt, "num_attention_heads", "num_global_key_value_heads")
        assert ratio(tt, "global_head_dim", "head_dim") == ratio(rt, "global_head_dim", "head_dim") == 2
        kept = ("attention_k_eq_v", "final_logit_softcapping", "tie_word_embeddings", "hidden_size_per_layer_input",
                "num_kv_shared_layers", "enable_moe_block", "rope_parameters", "use_bidirectional_attention")
        assert tt["hidden_size_per_layer_input"] == 0  # no per-layer input embeddings on the 31B
        assert tt["attention_k_eq_v"] is True and tt["final_logit_softcapping"] == 30.0
    else:
        assert ratio(tt, "linear_num_value_heads", "linear_num_key_heads") == 2
        assert ratio(rt, "linear_num_value_heads", "linear_num_key_heads") == 2
        kept = ("mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "attn_output_gate", "tie_word_embeddings",
                "linear_conv_kernel_dim", "partial_rotary_factor", "full_attention_interval")
        rope = tt["rope_parameters"]
        assert sum(rope["mrope_section"]) * 2 == tt["head_dim"] * rope["partial_rotary_factor"]
    for key in kept:
        assert tt[key] == rt[key], key
    if name == QWEN_MOE:
        assert (tt["num_experts"], tt["num_experts_per_tok"]) == (8, 2)
        assert tt["moe_intermediate_size"] == tt["shared_expert_intermediate_size"]
    vocab = tt["vocab_size"]
    ids = re.findall(r'"\w+_token_(?:id|index)": (\[[^\]]*\]|\d+)', json.dumps(hub_config(name)))
    assert ids and all(0 <= int(i) < vocab for s in ids for i in re.findall(r"\d+", s))


def test_hub_config_refuses_to_cut_the_layer_pattern():
    with pytest.raises(ValueError, match="multiple of 4"):
        hub_config(QWEN_DENSE, num_layers=6)
    with pytest.raises(ValueError, match="multiple of 6"):
        hub_config(GEMMA, num_layers=8)
    assert hub_config(GEMMA, num_layers=12)["text_config"]["layer_types"].count("full_attention") == 2
    with pytest.raises(KeyError, match="qwen3.5-9b"):
        hub_config("qwen3-8b")


# ---- the files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_text_layers_have_the_hub_tensor_names(fathers, name):
    names = weight_map(fathers[name])
    cfg = hub_config(name)["text_config"]
    layers = text_layer_keys(names)
    assert sorted(layers) == list(range(cfg["num_hidden_layers"]))
    for i, kind in enumerate(cfg["layer_types"]):
        assert layers[i] == HUB_LAYER_KEYS[name][kind], (i, kind)
    rest = {n for n in names if n.startswith("model.language_model.") and ".layers." not in n}
    assert rest == {"model.language_model.embed_tokens.weight", "model.language_model.norm.weight"}
    assert ("lm_head.weight" in names) is (not cfg["tie_word_embeddings"])


@pytest.mark.parametrize("name", NAMES)
def test_counts_extrapolate_to_the_real_checkpoint(fathers, name):
    """The per-layer layout times the real depth gives the tensor counts read from real headers."""
    text = real_config(name)["text_config"]
    per_kind = {k: len(v) for k, v in HUB_LAYER_KEYS[name].items()}
    n_text = sum(per_kind[k] for k in text["layer_types"]) + 2 + (0 if text["tie_word_embeddings"] else 1)
    prefix, block, rest = VISION[name]
    depth = real_config(name)["vision_config"].get("depth") or real_config(name)["vision_config"]["num_hidden_layers"]
    # Qwen3.6-35B-A3B's real BF16 snapshot: 693 text tensors; nvidia/Gemma-4-31B-IT-NVFP4's headers: 2 + 50 x 14
    # + 10 x 13 text tensors in the BF16 release's names and 356 vision ones (1,188 in all, as DESIGN.md says).
    expected = {QWEN_MOE: (693, None), GEMMA: (832, 356), QWEN_DENSE: (None, None)}[name]
    if expected[0] is not None:
        assert n_text == expected[0]
    if expected[1] is not None:
        assert depth * len(block) + len(rest) == expected[1]


@pytest.mark.parametrize("name", NAMES)
def test_vision_tower_and_mtp_are_stored(fathers, name):
    names = set(weight_map(fathers[name]))
    prefix, block, rest = VISION[name]
    vision = {n for n in names if n.startswith(("model.visual.", "model.vision_tower.", "model.embed_vision."))}
    blocks = text_layer_keys(vision, prefix + ".")
    depth = hub_config(name)["vision_config"].get("depth") or hub_config(name)["vision_config"]["num_hidden_layers"]
    assert sorted(blocks) == list(range(depth)) and all(keys == block for keys in blocks.values())
    assert {n for n in vision if not n.startswith(prefix + ".")} == rest
    assert {n for n in names if n.startswith("mtp.")} == MTP_KEYS[name]
    # Nothing outside the text model, the towers, MTP and the head.
    assert all(n.startswith(("model.language_model.", "mtp.", "lm_head.")) or n in vision for n in names)


def test_moe_experts_are_fused_as_on_the_hub(fathers):
    cfg = hub_config(QWEN_MOE)["text_config"]
    e, i, h = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    heads = headers(fathers[QWEN_MOE])
    assert not [n for n in heads if re.search(r"\.experts\.\d+\.", n)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.language_model.layers.{layer}.mlp."
        assert heads[p + "experts.gate_up_proj"][1] == (e, 2 * i, h)
        assert heads[p + "experts.down_proj"][1] == (e, h, i)
        assert heads[p + "gate.weight"][1] == (e, h)
        assert heads[p + "shared_expert_gate.weight"][1] == (1, h)
    assert heads["mtp.layers.0.mlp.experts.gate_up_proj"][1] == (e, 2 * i, h)
    assert heads["mtp.fc.weight"][1] == (h, 2 * h)
    assert heads["mtp.layers.0.self_attn.q_proj.weight"][1] == (2 * cfg["num_attention_heads"] * cfg["head_dim"], h)


@pytest.mark.parametrize("name", NAMES)
def test_files_are_bf16_shards_with_the_hub_names_and_config_keys(fathers, name):
    path = fathers[name]
    heads = headers(path)
    assert {dtype for dtype, _ in heads.values()} == {"BF16"}
    index = json.loads((path / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 2 and all(re.fullmatch(SHARD_RE[name], f) for f in files)
    assert set(heads) == set(index["weight_map"])
    sizes = sum(2 * torch.Size(shape).numel() for _, shape in heads.values())
    assert index["metadata"]["total_size"] == sizes
    on_disk = json.loads((path / "config.json").read_text())
    assert on_disk == hub_config(name)  # the Hub's keys, not transformers' re-serialisation
    if name == GEMMA:
        assert "global_head_dim" in on_disk["text_config"] and "per_layer_config" not in on_disk["text_config"]


# ---- what transformers 5 does with them ----------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(fathers):
    from transformers import AutoModelForImageTextToText

    out = {}
    for name, path in fathers.items():
        model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        out[name] = (model.eval(), info)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_the_named_class_and_generates(fathers, loaded, name):
    from transformers import AutoTokenizer

    model, info = loaded[name]
    assert type(model).__name__ == real_config(name)["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(str(fathers[name] / weight_map(fathers[name])["model.language_model.embed_tokens.weight"]), "pt") as f:
        embed = f.get_tensor("model.language_model.embed_tokens.weight")
    assert torch.equal(model.get_input_embeddings().weight, embed.float())
    tok = AutoTokenizer.from_pretrained(fathers[name])
    cfg = model.config
    image_token = tok.convert_ids_to_tokens(cfg.image_token_id)
    assert image_token.startswith("<") and tok.convert_tokens_to_ids(image_token) == cfg.image_token_id
    ids = tok("12+3=", return_tensors="pt")
    assert tok.decode(ids["input_ids"][0], skip_special_tokens=True) == "12+3="
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids["input_ids"].shape[1] + 3)
    assert torch.equal(out, model.generate(**ids, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("name", NAMES)
def test_vision_tower_sees_an_image(loaded, name):
    model, _ = loaded[name]
    ids, image = image_inputs(name, model.config)
    with torch.no_grad():
        with_image = model(input_ids=ids, **image).logits
        text_only = model(input_ids=ids).logits
    assert torch.isfinite(with_image).all()
    pos = (ids[0] == model.config.image_token_id).nonzero()[0].item()
    assert torch.allclose(with_image[:, :pos], text_only[:, :pos], atol=1e-5)  # causal: before the image, unchanged
    assert (with_image[:, pos:] - text_only[:, pos:]).abs().max() > 1e-3


def saved_names(path: Path) -> list[str]:
    """Tensor names of a checkpoint, sharded (index) or single-file."""
    if (path / INDEX_FILE).exists():
        return list(weight_map(path))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_what_transformers_save_pretrained_writes(loaded, tmp_path):
    """Why the fixtures write their own files: save_pretrained never writes the MTP head, and writes the
    experts fused only when the model was loaded from fused files; built from a config it splits them."""
    model, _ = loaded[QWEN_MOE]
    model.save_pretrained(tmp_path / "resaved")
    names = set(saved_names(tmp_path / "resaved"))
    assert not [n for n in names if n.startswith("mtp.")]
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in names
    built, _ = build_hub_model(QWEN_MOE)
    built.save_pretrained(tmp_path / "built")
    names = set(saved_names(tmp_path / "built"))
    assert "model.language_model.layers.0.mlp.experts.3.up_proj.weight" in names
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" not in names


# ---- mothers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", (QWEN_DENSE, GEMMA))
def test_perturbed_mother_keeps_the_layout_and_moves_every_weight(fathers, tmp_path, name):
    father = fathers[name]
    mother = perturbed_mother(father, tmp_path / "mother", scale=0.05, seed=3)
    assert headers(mother) == headers(father)
    assert (mother / INDEX_FILE).read_text() == (father / INDEX_FILE).read_text()
    assert (mother / "config.json").read_text() == (father / "config.json").read_text()
    assert (mother / "tokenizer.json").exists()
    wm = weight_map(father)
    last = hub_config(name)["text_config"]["num_hidden_layers"] - 1
    for n in ("model.language_model.layers.0.mlp.down_proj.weight", f"model.language_model.layers.{last}.self_attn.q_proj.weight"):
        with safe_open(str(father / wm[n]), "pt") as f, safe_open(str(mother / wm[n]), "pt") as m:
            a, b = f.get_tensor(n).float(), m.get_tensor(n).float()
        rel = float((b - a).norm() / a.norm()) if a.norm() > 0 else float((b - a).abs().max())
        assert 0 < rel < 0.2, n


@pytest.mark.parametrize("name", NAMES)
def test_text_only_mother_is_a_causal_lm_of_the_text_decoder(fathers, loaded, tmp_path, name):
    from transformers import AutoModelForCausalLM

    mother = text_only_mother(fathers[name], tmp_path / "text", scale=0.0)
    cfg = json.loads((mother / "config.json").read_text())
    assert cfg["architectures"] == [HUB_MODELS[name].causal_lm] and cfg["model_type"].endswith("_text")
    names = set(saved_names(mother))
    assert all(n.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")) for n in names)
    layers = text_layer_keys(names, "model.layers.")
    expected = HUB_LAYER_KEYS[name]["linear_attention" if name != GEMMA else "sliding_attention"]
    if name == QWEN_MOE:  # transformers 5 writes the experts one by one
        e = hub_config(name)["text_config"]["num_experts"]
        expected = (expected - {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}) | {
            f"mlp.experts.{i}.{p}_proj.weight" for i in range(e) for p in ("gate", "up", "down")}
    assert layers[0] == expected
    causal, info = AutoModelForCausalLM.from_pretrained(mother, dtype=torch.float32, output_loading_info=True)
    assert type(causal).__name__ == HUB_MODELS[name].causal_lm and not info["missing_keys"]
    father, _ = loaded[name]
    ids = torch.tensor([[5, 9, 14, 3, 7, 7, 21]])
    with torch.no_grad():
        assert torch.allclose(causal(input_ids=ids).logits, father(input_ids=ids).logits, atol=1e-4)


def test_save_hub_model_text_only_writes_only_the_causal_lm(tmp_path):
    out = save_hub_model(QWEN_DENSE, tmp_path / "text", seed=0, text_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]  # no multimodal leftovers
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    assert not [n for n in saved_names(out) if n.startswith(("mtp.", "model.visual.", "model.language_model."))]
