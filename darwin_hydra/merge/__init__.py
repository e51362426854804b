"""The merge engine: pure per-tensor methods (``methods``, their kernels in ``kernels`` over the
chunks of ``chunks``, random masks in ``masks``), recipes and ratio maps (``recipe``), the streamed
and in-memory modes (``engine``, the export's ``workers``, the in-memory fast path ``batched``).
See docs/merge.md.

Names are imported lazily, so that the config schema (``merge.config``) loads without torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MergeConfig": "config",
    "METHODS": "config",
    "RatioMap": "recipe",
    "TensorRecipe": "recipe",
    "plain_ratio_map": "recipe",
    "tensor_seed": "recipe",
    "merge_tensor": "methods",
    "NonFiniteTensorError": "methods",
    "merge_to_disk": "engine",
    "merge_named": "engine",
    "InMemoryMerger": "engine",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"darwin_hydra.merge.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'darwin_hydra.merge' has no attribute {name!r}")
