"""Tiny random-weight checkpoints in the exact on-disk layout of the Hub models the presets name.

``darwin_hydra.testing.tiny`` builds small models from transformers' config classes; what it saves is
what ``save_pretrained`` writes, which is not always what the Hub holds. The fixtures here start from
copies of the real ``config.json`` of each father (``hub_configs/``, sources in ``hub_configs/SOURCES.md``),
scale width, depth and vocabulary down while keeping every structural feature (layer-type pattern,
head-count ratios, Gemma's ``attention_k_eq_v`` / ``global_head_dim`` / soft-capping, tied or untied
head), and write the files the way the Hub does:

- ``config.json`` in the Hub's own keys (transformers 5 rewrites some on save, e.g. Gemma 4's
  ``global_head_dim`` becomes ``per_layer_config``), all weights bf16;
- the multimodal wrapper's names: ``model.language_model.*``, the vision tower (``model.visual.*`` for
  Qwen3.5, ``model.vision_tower.*`` + ``model.embed_vision.*`` for Gemma 4), ``lm_head.weight`` unless tied;
- Qwen3.5's multi-token-prediction head ``mtp.*``, which transformers neither builds nor saves (it
  ignores the keys on load), so it is written here explicitly;
- Qwen3.5-MoE's routed experts fused as the Hub stores them, ``mlp.experts.gate_up_proj`` (E, 2I, H) and
  ``mlp.experts.down_proj`` (E, H, I), no ``.weight`` suffix (transformers 5's in-memory layout too; but a
  model built from a config saves them per expert, ``mlp.experts.{e}.gate_proj.weight``: its qwen2_moe
  conversion, reversed);
- sharded safetensors with the Hub's shard names and ``model.safetensors.index.json``;
- a small tokenizer whose special tokens sit at the config's token ids, so ``AutoTokenizer`` works offline.

Mothers: ``perturbed_mother`` keeps the father's layout exactly (a fine-tune saved like its base);
``text_only_mother`` is a fine-tune saved as a text-only causal LM (``*ForCausalLM``, ``model.layers.*``,
no vision tower, no MTP, experts per expert), the plausible layout of
Jackrong/Qwen3.5-35B-A3B-Claude-4.6-Opus-Reasoning-Distilled ("Text Generation" on the Hub; its files
were not found).
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerFast

from darwin_hydra.zoo.skills import ALPHABET

CONFIG_DIR = Path(__file__).with_name("hub_configs")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class HubModel:
    """One Hub checkpoint the presets use, and how its tiny stand-in is scaled.

    ``text`` / ``vision``: the config keys replaced in ``text_config`` / ``vision_config`` (widths, head
    counts, vocabulary); ``num_layers`` keeps a whole number of periods of the real ``layer_types``.
    ``shard_pattern``: the Hub's shard file names (``{i}``, ``{n}``: 5-digit index and count).
    """

    name: str
    repo_id: str
    num_layers: int
    text: Mapping[str, Any]
    vision: Mapping[str, Any]
    shard_pattern: str
    causal_lm: str  # the text-only class a fine-tune saved as a causal LM uses
    special_tokens: Mapping[int, str] = field(default_factory=dict)  # real id -> token text

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / f"{self.name}.json"


# Special tokens at their real ids (Qwen3.5's from its tokenizer as quoted by llama.cpp's load log and
# the vision placeholder strings; Gemma 4's names are placeholders for the ids its config.json names).
_QWEN_SPECIALS = {
    248044: "<|endoftext|>",
    248045: "<|im_start|>",
    248046: "<|im_end|>",
    248053: "<|vision_start|>",
    248054: "<|vision_end|>",
    248055: "<|vision_pad|>",
    248056: "<|image_pad|>",
    248057: "<|video_pad|>",
}
_GEMMA_SPECIALS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    106: "<end_of_turn>",
    255999: "<boi>",
    256000: "<boa>",
    258880: "<image_soft_token>",
    258881: "<audio_soft_token>",
    258882: "<eoi>",
    258883: "<eoa>",
    258884: "<video_soft_token>",
}
# Qwen3.5 text widths: head_dim 32 with partial_rotary_factor 0.25 leaves 8 rotary dims, i.e. 4
# frequency pairs that mrope splits [2, 1, 1] (the real [11, 11, 10] of 32 pairs, scaled).
_QWEN_ROPE = {"mrope_section": [2, 1, 1]}
_QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64)

HUB_MODELS: dict[str, HubModel] = {
    m.name: m
    for m in (
        HubModel(
            name="qwen3.5-9b",
            repo_id="Qwen/Qwen3.5-9B",
            num_layers=8,
            # real: 16 q heads / 4 kv heads / head_dim 256; GDN 16 key heads, 32 value heads, dims 128
            text=dict(
                hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            ),
            vision=dict(_QWEN_VISION, out_hidden_size=64),
            shard_pattern="model.safetensors-{i}-of-{n}.safetensors",
            causal_lm="Qwen3_5ForCausalLM",
            special_tokens=_QWEN_SPECIALS,
        ),
        HubModel(
            name="qwen3.5-35b-a3b",
            repo_id="Qwen/Qwen3.5-35B-A3B",
            num_layers=8,
            # real: 16 q / 2 kv heads; 256 experts top-8 (here 8 top-2), moe and shared expert widths equal
            text=dict(
                hidden_size=64, num_attention_heads=8, num_key_value_heads=1, head_dim=32,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            ),
            vision=dict(_QWEN_VISION, out_hidden_size=64),
            shard_pattern="model.safetensors-{i}-of-{n}.safetensors",
            causal_lm="Qwen3_5MoeForCausalLM",
            special_tokens=_QWEN_SPECIALS,
        ),
        HubModel(
            name="gemma-4-31b-it",
            repo_id="google/gemma-4-31B-it",
            num_layers=6,
            # real: 32 q heads / 16 kv (sliding) / 4 kv (full); head_dim 256, global_head_dim 512
            text=dict(
                hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                num_global_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=16,
            ),
            vision=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, global_head_dim=16, position_embedding_size=64,
                default_output_length=4,
            ),
            shard_pattern="model-{i}-of-{n}.safetensors",
            causal_lm="Gemma4ForCausalLM",
            special_tokens=_GEMMA_SPECIALS,
        ),
    )
}


def hub_model(name: str) -> HubModel:
    """The spec of Hub model ``name`` (a key of ``HUB_MODELS``)."""
    if name not in HUB_MODELS:
        raise KeyError(f"unknown Hub model {name!r}; choose one of {sorted(HUB_MODELS)}")
    return HUB_MODELS[name]


def real_config(name: str) -> dict[str, Any]:
    """The stored copy of the real ``config.json`` of Hub model ``name``."""
    return json.loads(hub_model(name).config_path.read_text())


def _token_id_map(spec: HubModel, vocab_size: int) -> dict[int, int]:
    """Real special-token id -> id in a vocabulary of ``vocab_size``.

    Ids that fit stay; the rest move, in their order, to the top of the small vocabulary (where the
    real ones sit too: after the ordinary tokens)."""
    large = sorted(i for i in spec.special_tokens if i >= vocab_size)
    top = vocab_size - len(large)
    if any(i >= top for i in spec.special_tokens if i < vocab_size):
        raise ValueError(f"{spec.name}: vocab_size {vocab_size} leaves no room for the special tokens")
    mapping = {i: i for i in spec.special_tokens if i < vocab_size}
    mapping.update({old: top + k for k, old in enumerate(large)})
    return mapping


def _remap_ids(node: Any, mapping: Mapping[int, int]) -> Any:
    """Every ``*_token_id`` / ``*_token_index`` value (int or list) of a config dict, remapped."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if re.search(r"_token_(id|index)$", key) and value is not None:
                value = [mapping[v] for v in value] if isinstance(value, list) else mapping[value]
            out[key] = _remap_ids(value, mapping)
        return out
    return node


def hub_config(name: str, num_layers: int | None = None, vocab_size: int = 512) -> dict[str, Any]:
    """The real config of ``name`` scaled down, as a dict in the Hub's own keys.

    Width, heads and vocabulary take the spec's tiny values; ``layer_types`` is the real list cut to
    ``num_layers`` (a whole number of its full-attention periods); special-token ids move into the small
    vocabulary (``_token_id_map``). Everything else (MTP layer count, ``attention_k_eq_v``, soft-capping,
    ``tie_word_embeddings``, rope types) stays as on the Hub.
    """
    spec = hub_model(name)
    cfg = copy.deepcopy(real_config(name))
    text = cfg["text_config"]
    n = num_layers or spec.num_layers
    real_types = text["layer_types"]
    period = real_types.index("full_attention") + 1
    if n % period:
        raise ValueError(f"{name}: num_layers={n} cuts the {period}-layer attention pattern; use a multiple of {period}")
    text.update(spec.text, num_hidden_layers=n, layer_types=real_types[:n], vocab_size=vocab_size)
    if "vocab_size_per_layer_input" in text:
        text["vocab_size_per_layer_input"] = vocab_size
    if "mrope_section" in text.get("rope_parameters", {}):
        text["rope_parameters"] = dict(text["rope_parameters"], **_QWEN_ROPE)
    cfg["vision_config"].update(spec.vision)
    return _remap_ids(cfg, _token_id_map(spec, vocab_size))


def hub_tokenizer(name: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fast tokenizer of exactly ``vocab_size`` ids: the model's special tokens at their (remapped) ids,
    one token per character of the zoo alphabet, and ``<unused{i}>`` fillers (as real vocabularies pad)."""
    spec = hub_model(name)
    specials = {new: spec.special_tokens[old] for old, new in _token_id_map(spec, vocab_size).items()}
    free = (i for i in range(vocab_size) if i not in specials)
    vocab = {tok: i for i, tok in specials.items()}
    vocab.update({ch: next(free) for ch in ALPHABET})
    vocab.update({f"<unused{i}>": i for i in free})
    vocab = {tok: i for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])}
    unk = next((t for t in specials.values() if t in ("<unk>", "<|endoftext|>")), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.add_special_tokens(list(specials.values()))
    tok.decoder = decoders.Fuse()
    by_text = set(specials.values())
    if "<bos>" in by_text:
        roles = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    else:  # Qwen: no BOS; <|endoftext|> pads, <|im_end|> ends a turn
        roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256, clean_up_tokenization_spaces=False, **roles)


def _model_class(architecture: str) -> type[PreTrainedModel]:
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no class {architecture}")
    return cls


def build_hub_model(name: str, seed: int = 0, **scale) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A random-weight model (fp32, seeded, eval mode) of the class the scaled config names, and that config."""
    cfg = hub_config(name, **scale)
    config = AutoConfig.for_model(**copy.deepcopy(cfg))  # transformers fills in the nested dicts it is given
    torch.manual_seed(seed)
    model = _model_class(cfg["architectures"][0])._from_config(config, dtype=torch.float32)
    return model.eval(), cfg


def _hub_tensors(model: PreTrainedModel, cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's tensors under the names the Hub files use: in-memory names (fused experts included),
    the tied head dropped, non-persistent buffers excluded."""
    tensors = dict(model.state_dict())
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    return tensors


def mtp_tensors(text: Mapping[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Qwen3.5's multi-token-prediction head (``mtp_num_hidden_layers`` full-attention layers), as stored
    on the Hub next to the decoder: ``mtp.fc`` (H, 2H) joins the normed embedding and hidden state,
    each layer is a decoder layer with gated attention (q_proj twice the heads) and the model's FFN
    (dense MLP, or router + fused experts + shared expert for MoE). Norm weights are zero, as
    Qwen3.5's (1 + w) RMSNorm initialises them."""
    h, hd = text["hidden_size"], text["head_dim"]
    nh, nkv = text["num_attention_heads"], text["num_key_value_heads"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * text.get("initializer_range", 0.02)

    out = {
        "mtp.fc.weight": w(h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": torch.zeros(h),
        "mtp.pre_fc_norm_hidden.weight": torch.zeros(h),
        "mtp.norm.weight": torch.zeros(h),
    }
    for i in range(text.get("mtp_num_hidden_layers", 0)):
        p = f"mtp.layers.{i}."
        out.update({
            p + "input_layernorm.weight": torch.zeros(h),
            p + "post_attention_layernorm.weight": torch.zeros(h),
            p + "self_attn.q_proj.weight": w(2 * nh * hd, h),
            p + "self_attn.k_proj.weight": w(nkv * hd, h),
            p + "self_attn.v_proj.weight": w(nkv * hd, h),
            p + "self_attn.o_proj.weight": w(h, nh * hd),
            p + "self_attn.q_norm.weight": torch.zeros(hd),
            p + "self_attn.k_norm.weight": torch.zeros(hd),
        })
        if text.get("num_experts"):
            e, i_moe, i_sh = text["num_experts"], text["moe_intermediate_size"], text["shared_expert_intermediate_size"]
            out.update({
                p + "mlp.gate.weight": w(e, h),
                p + "mlp.experts.gate_up_proj": w(e, 2 * i_moe, h),
                p + "mlp.experts.down_proj": w(e, h, i_moe),
                p + "mlp.shared_expert.gate_proj.weight": w(i_sh, h),
                p + "mlp.shared_expert.up_proj.weight": w(i_sh, h),
                p + "mlp.shared_expert.down_proj.weight": w(h, i_sh),
                p + "mlp.shared_expert_gate.weight": w(1, h),
            })
        else:
            inter = text["intermediate_size"]
            out.update({
                p + "mlp.gate_proj.weight": w(inter, h),
                p + "mlp.up_proj.weight": w(inter, h),
                p + "mlp.down_proj.weight": w(h, inter),
            })
    return out


def write_sharded(tensors: Mapping[str, torch.Tensor], out_dir: Path, shard_pattern: str, shards: int = 2) -> Path:
    """Write ``tensors`` (in their order) as ``shards`` safetensors files named by ``shard_pattern``, plus
    the index (``metadata.total_size`` in bytes, ``weight_map`` name -> file), split by size."""
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for n, size in zip(names, sizes):
        groups[min(shards - 1, done * shards // max(total, 1))].append(n)
        done += size
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        fname = shard_pattern.format(i=f"{i:05d}", n=f"{shards:05d}")
        save_file({n: tensors[n].contiguous() for n in group}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def _write_config(cfg: Mapping[str, Any], out_dir: Path) -> None:
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_hub_model(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    text_only: bool = False,
    shards: int = 2,
    **scale,
) -> Path:
    """Write a tiny random ``name`` checkpoint to ``out_dir`` in the Hub's layout (see module doc) and
    return the path. ``text_only``: the causal-LM layout a text-only fine-tune has (``text_only_mother``
    of the multimodal checkpoint). ``scale``: ``num_layers`` / ``vocab_size`` for ``hub_config``."""
    out = Path(out_dir)
    if text_only:
        with tempfile.TemporaryDirectory() as tmp:
            full = save_hub_model(name, Path(tmp) / name, seed, dtype, False, shards, **scale)
            return text_only_mother(full, out, scale=0.0)
    spec = hub_model(name)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = build_hub_model(name, seed=seed, **scale)
    tensors = _hub_tensors(model, cfg)
    text = cfg["text_config"]
    if text.get("mtp_num_hidden_layers"):
        tensors.update(mtp_tensors(text, torch.Generator().manual_seed(seed + 7919)))
    write_sharded({n: t.to(dtype) for n, t in tensors.items()}, out, spec.shard_pattern, shards)
    _write_config(cfg, out)
    hub_tokenizer(name, text["vocab_size"]).save_pretrained(out)
    return out


def _noisy(t: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """``t`` plus Gaussian noise of ``scale`` x its std (x |t| for one element), same dtype."""
    if scale == 0 or not t.is_floating_point():
        return t
    x = t.float()
    std = float(x.std()) if x.numel() > 1 else float(x.abs().max())
    return (x + torch.randn(x.shape, generator=g) * (scale * std + 1e-8)).to(t.dtype)


def _read_checkpoint(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a (sharded or single-file) safetensors checkpoint, and name -> file."""
    index = src / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {n: "model.safetensors" for n in load_file(str(src / "model.safetensors"))}
    tensors: dict[str, torch.Tensor] = {}
    for fname in dict.fromkeys(weight_map.values()):
        tensors.update(load_file(str(src / fname)))
    return {n: tensors[n] for n in weight_map}, weight_map


def _copy_side_files(src: Path, out: Path, tokenizer_only: bool = False) -> None:
    """Copy config, tokenizer and other non-weight files of ``src`` (only the tokenizer's if asked)."""
    for f in src.iterdir():
        if not f.is_file() or f.suffix == ".safetensors" or f.name == INDEX_FILE:
            continue
        if not tokenizer_only or f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            (out / f.name).write_bytes(f.read_bytes())


def perturbed_mother(src: str | Path, out_dir: str | Path, scale: float = 0.01, seed: int = 1) -> Path:
    """A stand-in fine-tune in exactly the layout of ``src``: same tensor names, shards, dtypes, config and
    tokenizer, every floating tensor plus noise of ``scale`` x its std (seeded, in file order)."""
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, weight_map = _read_checkpoint(src)
    g = torch.Generator().manual_seed(seed)
    noisy = {n: _noisy(t, scale, g) for n, t in tensors.items()}
    for fname in dict.fromkeys(weight_map.values()):
        save_file({n: noisy[n].contiguous() for n in weight_map if weight_map[n] == fname}, str(out / fname),
                  metadata={"format": "pt"})
    if (src / INDEX_FILE).exists():
        (out / INDEX_FILE).write_text((src / INDEX_FILE).read_text())
    _copy_side_files(src, out)
    return out


def text_only_mother(src: str | Path, out_dir: str | Path, scale: float = 0.01, seed: int = 1) -> Path:
    """A stand-in fine-tune of the multimodal checkpoint ``src`` saved as a text-only causal LM: the text
    config alone (``model_type`` ``*_text``, ``architectures`` the spec's ``causal_lm``), decoder weights
    renamed ``model.language_model.X`` -> ``model.X`` (plus noise of ``scale`` x std), ``lm_head`` kept
    unless tied, vision tower and MTP dropped, written by ``save_pretrained`` of a model built from that
    config (bf16; MoE experts per expert).

    Built from a config on purpose: ``Qwen3_5*ForCausalLM.from_pretrained(src)`` loads the multimodal
    files (transformers strips ``language_model``) but its ``save_pretrained`` puts the prefix back and
    keeps the experts fused, and ``Gemma4ForCausalLM.from_pretrained(src)`` matches no tensor at all."""
    src, out = Path(src), Path(out_dir)
    cfg = json.loads((src / "config.json").read_text())
    spec = next((m for m in HUB_MODELS.values() if real_config(m.name)["architectures"] == cfg["architectures"]), None)
    if spec is None:
        raise ValueError(f"{src}: architectures {cfg['architectures']} is none of the Hub fixtures' {sorted(HUB_MODELS)}")
    text = dict(copy.deepcopy(cfg["text_config"]), architectures=[spec.causal_lm])
    config = AutoConfig.for_model(**text)
    model = _model_class(spec.causal_lm)._from_config(config, dtype=torch.float32).eval()
    tensors, _ = _read_checkpoint(src)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for n, t in tensors.items():
        if n.startswith("model.language_model."):
            state["model." + n.removeprefix("model.language_model.")] = _noisy(t, scale, g)
        elif n == "lm_head.weight":
            state[n] = _noisy(t, scale, g)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{src} -> {spec.causal_lm}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(torch.bfloat16).save_pretrained(out)
    _copy_side_files(src, out, tokenizer_only=True)
    return out


def image_inputs(name: str, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A small random image as ``name``'s vision tower takes it, and a prompt with its placeholders:
    (input_ids, the image's keyword arguments to the model's forward)."""
    g = torch.Generator().manual_seed(0)
    if name.startswith("gemma"):  # 3x3 patches of 16x16 pixels, pooled 3x3 into one token
        pixels = torch.rand(1, 9, 3 * 16 * 16, generator=g)
        pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="xy"), -1).reshape(1, 9, 2)
        ids = torch.tensor([[cfg.text_config.bos_token_id, cfg.boi_token_id, cfg.image_token_id, cfg.eoi_token_id, 9]])
        return ids, dict(pixel_values=pixels, image_position_ids=pos)
    # Qwen3.5: one frame pair (temporal patch 2) of 2x2 patches, merged 2x2 into one token
    pixels = torch.randn(4, 3 * 2 * 16 * 16, generator=g)
    ids = torch.tensor([[1, 2, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 3]])
    return ids, dict(pixel_values=pixels, image_grid_thw=torch.tensor([[1, 2, 2]]),
                     mm_token_type_ids=(ids == cfg.image_token_id).int())
