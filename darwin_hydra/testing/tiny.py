"""Tiny random-weight instances of the seeds' exact architectures, built from transformers' own
config classes (no download): Qwen3.5 dense (GDN hybrid), Gemma 4 (multimodal wrapper), Qwen3.5 MoE
(fused experts, shared expert, hybrid layers), plus a plain Llama. For tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_ARCHS = ("qwen3_5", "gemma4", "qwen3_5_moe", "llama")

_GDN = dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2)
_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)


def tiny_config(arch: str, vocab_size: int = 128, num_layers: int = 4) -> PretrainedConfig:
    """A config of ``arch`` with a few layers and small sizes (hidden 32)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    # Qwen3.5's hybrid pattern: three Gated-DeltaNet (linear attention) layers, then one full attention.
    gdn = dict(_GDN, layer_types=[("full_attention" if i % 4 == 3 else "linear_attention") for i in range(num_layers)])
    if arch == "qwen3_5":
        return AutoConfig.for_model(
            "qwen3_5", text_config=dict(common, intermediate_size=64, **gdn), vision_config=_VISION
        )
    if arch == "qwen3_5_moe":
        return AutoConfig.for_model(
            "qwen3_5_moe",
            text_config=dict(
                common,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=16,
                num_experts=8,
                num_experts_per_tok=2,
                **gdn,
            ),
            vision_config=_VISION,
        )
    if arch == "gemma4":
        kinds = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
        return AutoConfig.for_model(
            "gemma4",
            text_config=dict(
                common,
                intermediate_size=64,
                layer_types=kinds,
                sliding_window=16,
                vocab_size_per_layer_input=vocab_size,
                hidden_size_per_layer_input=8,
            ),
            vision_config=None,
            audio_config=None,
        )
    if arch == "llama":
        return AutoConfig.for_model("llama", intermediate_size=64, tie_word_embeddings=False, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> PreTrainedModel:
    """A random-weight model of ``arch`` (seeded), in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=dtype)
    return model.eval()


def save_tiny(arch: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> Path:
    """Save a tiny ``arch`` model (safetensors, config) to ``out_dir`` and return the path."""
    out = Path(out_dir)
    tiny_model(arch, seed=seed, dtype=dtype, **kw).save_pretrained(out)
    return out


def perturbed_copy(src: str | Path, out_dir: str | Path, scale: float = 0.01, seed: int = 1) -> Path:
    """Save a copy of the checkpoint at ``src`` with Gaussian noise of ``scale`` x each tensor's std added:
    a stand-in fine-tune of the same architecture."""
    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.float().std() if p.numel() > 1 else p.float().abs()
            noise = torch.randn(p.shape, generator=g) * (scale * float(std) + 1e-8)
            p.add_(noise.to(p.dtype))
    model.save_pretrained(out_dir)
    return Path(out_dir)
