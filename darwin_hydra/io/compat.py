"""The pre-merge compatibility check: run it before any heavy work, from headers only.

Parents can be merged tensor by tensor only when they are one architecture: same model type, same
tensor names, shapes and dtypes, same vocabulary (same size, and the same token for every id, or
the embedding rows would mix different tokens). ``check_compatible`` compares every role against
the first one (the father) and raises one error listing the first differences.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darwin_hydra.arch import text_config

if TYPE_CHECKING:
    from darwin_hydra.io.reader import CheckpointReader

log = logging.getLogger(__name__)

MAX_LISTED = 10


class IncompatibleParentsError(ValueError):
    """The parents are not one architecture; the message lists the first differences."""

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences


def _cfg(config: dict, key: str) -> Any:
    tc = text_config(config) if isinstance(config, dict) else {}
    return tc.get(key, config.get(key)) if isinstance(tc, dict) else config.get(key)


def tokenizer_vocab(path: Path) -> tuple[int | None, str, str] | None:
    """``(size, digest, source file)`` of the vocabulary in a checkpoint directory, or None without one.

    From ``tokenizer.json`` (model vocab plus added tokens; id -> token), else ``vocab.json``
    (+ ``added_tokens.json``), else the bytes of ``tokenizer.model`` (size unknown).
    """
    tj, vj, sp = path / "tokenizer.json", path / "vocab.json", path / "tokenizer.model"
    id_to_token: dict[int, str] = {}
    if tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, dict):
            id_to_token.update({int(i): tok for tok, i in vocab.items()})
        else:  # Unigram: [[piece, score], ...], id = position
            id_to_token.update({i: (item[0] if isinstance(item, list) else str(item)) for i, item in enumerate(vocab)})
        for tok in data.get("added_tokens") or []:
            id_to_token[int(tok["id"])] = tok["content"]
        source = tj.name
    elif vj.is_file():
        id_to_token.update({int(i): tok for tok, i in json.loads(vj.read_text(encoding="utf-8")).items()})
        added = path / "added_tokens.json"
        if added.is_file():
            id_to_token.update({int(i): tok for tok, i in json.loads(added.read_text(encoding="utf-8")).items()})
        source = vj.name
    elif sp.is_file():
        return None, hashlib.sha256(sp.read_bytes()).hexdigest(), sp.name
    else:
        return None
    digest = hashlib.sha256(json.dumps(sorted(id_to_token.items()), ensure_ascii=False).encode()).hexdigest()
    size = (max(id_to_token) + 1) if id_to_token else 0
    return size, digest, source


def _shape(s: tuple) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def compare(readers: dict[str, CheckpointReader], tokenizers: bool = True, optional=None) -> list[str]:
    """All differences of each role against the first, config-level first, as readable lines.
    ``optional(name)``: tensors of the first that the others may lack (taken from the first whole). A
    reader renamed into the first's layout (``io.layouts``, a text-only causal LM beside a multimodal
    father) is compared by its text decoder's config."""
    roles = list(readers)
    if len(roles) < 2:
        return []
    ref_role = roles[0]
    ref = readers[ref_role]
    ref_names = set(ref.names)
    ref_vocab = tokenizer_vocab(ref.path) if tokenizers else None
    config_diffs: list[str] = []
    tensor_diffs: list[str] = []
    for role in roles[1:]:
        other = readers[role]
        mixed = bool(getattr(other, "renamed_from", None))
        if not mixed:
            for key in ("model_type", "architectures"):
                a, b = ref.config.get(key), other.config.get(key)
                if a != b:
                    config_diffs.append(f"config {key}: {ref_role} {a!r} vs {role} {b!r}")
        a, b = _cfg(ref.config, "model_type"), _cfg(other.config, "model_type")
        if a != b and (mixed or ref.config.get("model_type") == other.config.get("model_type")):
            config_diffs.append(f"config text_config.model_type: {ref_role} {a!r} vs {role} {b!r}")
        a, b = _cfg(ref.config, "vocab_size"), _cfg(other.config, "vocab_size")
        if a != b:
            config_diffs.append(f"config vocab_size: {ref_role} {a} vs {role} {b}")
        if tokenizers and ref_vocab is not None:
            vocab = tokenizer_vocab(other.path)
            if vocab is not None and vocab[2] == ref_vocab[2]:
                if vocab[0] != ref_vocab[0]:
                    config_diffs.append(
                        f"tokenizer vocabulary ({vocab[2]}): {ref_role} {ref_vocab[0]} tokens vs {role} {vocab[0]}"
                    )
                elif vocab[1] != ref_vocab[1]:
                    config_diffs.append(
                        f"tokenizer vocabulary ({vocab[2]}): {ref_role} and {role} map token ids to different tokens"
                    )
            elif vocab is not None:
                log.debug("tokenizers of %s (%s) and %s (%s) not compared", ref_role, ref_vocab[2], role, vocab[2])
        names = set(other.names)
        missing = [n for n in ref.names if n not in names and not (optional and optional(n))]
        extra = [n for n in other.names if n not in ref_names]
        shapes, dtypes = [], []
        for name in ref.names:
            if name not in names:
                continue
            sa, sb = ref.shape(name), other.shape(name)
            if tuple(sa) != tuple(sb):
                shapes.append(f"tensor {name}: shape {_shape(sa)} in {ref_role} vs {_shape(sb)} in {role}")
                continue
            da, db = ref.dtype(name), other.dtype(name)
            if da != db:
                dtypes.append(
                    f"tensor {name}: dtype {str(da).removeprefix('torch.')} in {ref_role} vs "
                    f"{str(db).removeprefix('torch.')} in {role}"
                )
        storage = _expert_storage(missing, extra)
        if storage:
            fused, per_expert, ref_fused = storage
            (f_role, p_role, p_reader) = (ref_role, role, other) if ref_fused else (role, ref_role, ref)
            config_diffs.append(
                f"expert storage: {f_role} fused ({fused}), {p_role} one key per expert ({per_expert}); "
                f"fuse the {p_role}'s experts once into a new directory and use that: darwin-hydra-fuse-experts "
                f"{p_reader.path} {p_reader.path}-fused"
            )
        if len(missing) + len(extra) + len(shapes) + len(dtypes) > MAX_LISTED // 2:
            config_diffs.append(
                f"tensors of {role} vs {ref_role}: {len(missing)} of {len(ref.names)} missing, {len(extra)} extra, "
                f"{len(shapes)} with another shape, {len(dtypes)} with another dtype"
            )
        tensor_diffs += [f"tensor {n}: in {ref_role}, missing from {role}" for n in missing]
        tensor_diffs += [f"tensor {n}: in {role}, missing from {ref_role}" for n in extra]
        tensor_diffs += shapes + dtypes
    return config_diffs + tensor_diffs


def _expert_storage(missing: list[str], extra: list[str]) -> tuple[str, str, bool] | None:
    """(a fused expert tensor one side has, a per-expert one the other has, whether the reference side is
    the fused one) when MoE experts are stored fused (``mlp.experts.gate_up_proj``) in one checkpoint and
    one key per expert in the other. ``missing``: the reference's names the other lacks; ``extra``: the
    other's names the reference lacks."""
    import re

    fused = next((n for n in missing if re.search(r"\.experts\.(gate_up_proj|down_proj)$", n)), None)
    per_expert = next((n for n in extra if re.search(r"\.experts\.\d+\.", n)), None)
    if fused and per_expert:
        return fused, per_expert, True
    fused = next((n for n in extra if re.search(r"\.experts\.(gate_up_proj|down_proj)$", n)), None)
    per_expert = next((n for n in missing if re.search(r"\.experts\.\d+\.", n)), None)
    return (fused, per_expert, False) if fused and per_expert else None


def check_compatible(readers: dict[str, CheckpointReader], tokenizers: bool = True, optional=None) -> None:
    """Raise ``IncompatibleParentsError`` unless all readers (``{"father": r, "mother": r, "base": r}``)
    are one architecture: same ``model_type``/``architectures``, tensor names, shapes, dtypes,
    ``vocab_size``, and (``tokenizers=True``, where both have tokenizer files of one kind) the same
    vocabulary. Reads headers and small JSON files only, never tensor data."""
    diffs = compare(readers, tokenizers=tokenizers, optional=optional)
    if not diffs:
        roles = ", ".join(f"{r} ({rd.path})" for r, rd in readers.items())
        log.info("parents compatible: %s", roles)
        return
    listed = diffs[:MAX_LISTED]
    more = f"\n  ... and {len(diffs) - len(listed)} more difference(s)" if len(diffs) > len(listed) else ""
    where = "\n".join(f"  {role}: {rd.path}" for role, rd in readers.items())
    msg = (
        f"the parents cannot be merged tensor by tensor ({len(diffs)} difference(s)); first ones:\n  - "
        + "\n  - ".join(listed)
        + more
        + f"\nparents:\n{where}\n"
        "They must share tensor names, shapes, dtypes and vocabulary (e.g. a base model and its fine-tunes). "
        "Pick parents of the same base model (parents.father / parents.mother / parents.base), or convert "
        "one to the other's dtype before merging."
    )
    raise IncompatibleParentsError(msg, diffs)
