"""The one place a checkpoint becomes a transformers model or tokenizer, for every stage.

A checkpoint is loaded with the class its config names (``architectures[0]``, e.g.
``Qwen3_5ForConditionalGeneration`` with its vision tower), not with ``AutoModelForCausalLM``, which
drops a multimodal wrapper's towers (Qwen3.5) and would then disagree with the parents' tensors.
A class transformers does not ship is taken through the config's ``auto_map`` only with
``trust_remote_code=True`` (``parents.trust_remote_code``, off by default), the same way everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def model_class(path: str | Path, trust_remote_code: bool = False):
    """The transformers class of the checkpoint at ``path``: its config's ``architectures[0]`` when
    transformers ships it; else the config's ``auto_map`` (remote code, only when trusted); else the
    image-text-to-text auto class for a multimodal config, the causal-LM one otherwise."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map:
        if not trust_remote_code:
            raise ValueError(
                f"{path}: its config names code of its own (auto_map: {sorted(auto_map)}), which runs only with "
                "parents.trust_remote_code=true; read that code first"
            )
        return AutoModelForCausalLM
    return AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM


def load_model(
    path: str | Path,
    dtype="float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
):
    """The checkpoint at ``path`` as its own transformers class, in ``dtype``, eval mode: whole on
    ``device``, or, with ``device_map`` (accelerate's ``"auto"`` / ``"balanced"`` / ``"sequential"``, or
    ``{module name: device}``), spread over the devices layer by layer within ``max_memory``
    (``{0: bytes or "70GiB", 1: ..., "cpu": ...}``; ``memory.placement`` builds both from the
    ``memory`` config). Weights in the checkpoint's own dtype on the CPU stay views of a private map of
    its files until written (transformers' loader): untouched pages cost no memory of their own."""
    from darwin_hydra.dtypes import torch_dtype

    cls = model_class(path, trust_remote_code)
    kwargs = {}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = dict(max_memory)
    try:
        model = cls.from_pretrained(str(path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        raise RuntimeError(f"{path}: could not load the model as {cls.__name__} ({type(e).__name__}: {e})") from e
    if device_map is None:
        model = model.to(device)
    return model.eval()


def model_devices(model) -> list[str]:
    """The devices the model's parameters are on, in order of first appearance (``meta``: offloaded)."""
    seen: dict[str, None] = {}
    for p in model.parameters():
        seen.setdefault(str(p.device), None)
    return list(seen)


def load_tokenizer(*paths: str | Path, trust_remote_code: bool = False):
    """The first tokenizer found among ``paths`` (the father's, else the mother's), with a pad token
    (the EOS token when the tokenizer has none: batches are padded)."""
    from transformers import AutoTokenizer

    errors = []
    for p in paths:
        if p is None:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except Exception as e:  # no tokenizer files here: try the next parent
            errors.append(f"{p}: {type(e).__name__}: {e}")
            continue
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    raise FileNotFoundError("no tokenizer found; tried " + "; ".join(errors))


def ignored_on_load(model) -> list[str]:
    """Regex patterns of checkpoint tensors the model's class does not hold and ignores when loading
    (e.g. Qwen3.5's multi-token-prediction head ``^mtp.*``): they are merged into the child on export
    but take no part in a forward pass."""
    return list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
