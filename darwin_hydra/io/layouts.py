"""Mixed layouts: one text decoder saved two ways.

A reasoning distill is often saved as a text-only causal LM (``Qwen3_5ForCausalLM``: ``model.layers.*``,
``model.embed_tokens``, ``model.norm``, ``lm_head``) while its father is the multimodal checkpoint
(``Qwen3_5ForConditionalGeneration``: ``model.language_model.layers.*`` ... plus ``model.visual.*`` and
``mtp.*``), or the reverse. The decoder is the same; only the names differ. ``layout_mapping`` finds
the rename that puts the other checkpoint's decoder under the father's names (the child has the
father's layout), leaving out a multimodal other parent's tensors outside the decoder when the father
has none. Whatever the mapping cannot place stays as it is, so that a real difference of the decoder
is still refused by the compatibility check, by name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from darwin_hydra.arch import outside_decoder

# (prefix in one layout, prefix in the other): the text decoder of a multimodal wrapper vs a causal LM
_PREFIXES = (("model.", "model.language_model."),)


def layout_mapping(father_names: Collection[str], other_names: Collection[str]) -> Callable[[str], str | None] | None:
    """The rename of ``other_names`` into the father's layout, or None when they already share it (or
    no prefix swap brings more of them into it)."""
    father = set(father_names)
    other = list(other_names)
    at_home = sum(n in father for n in other)
    if at_home == len(other) and at_home == len(father):
        return None
    best, best_hits = None, at_home
    for a, b in _PREFIXES:
        for src, dst in ((a, b), (b, a)):
            rename = _swap(src, dst, father)
            hits = sum(rename(n) in father for n in other)
            if hits > best_hits:
                best, best_hits = rename, hits
    return best


def _swap(src: str, dst: str, father: set[str]) -> Callable[[str], str | None]:
    def rename(name: str) -> str | None:
        if name in father:
            return name
        if name.startswith(src) and not (dst.startswith(src) and name.startswith(dst)):
            mapped = dst + name[len(src):]
            if mapped in father:
                return mapped
        if outside_decoder(name):  # a tower or MTP head the father's layout has no place for
            return None
        return name  # left as it is: the compatibility check names it

    return rename
