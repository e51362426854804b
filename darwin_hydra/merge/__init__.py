"""The merge engine: pure per-tensor methods (``methods``), recipes and ratio maps (``recipe``),
the streamed and in-memory modes (``engine``). See docs/merge.md."""

from darwin_hydra.merge.config import MergeConfig
from darwin_hydra.merge.recipe import METHODS, RatioMap, TensorRecipe, plain_ratio_map, tensor_seed

__all__ = ["METHODS", "MergeConfig", "RatioMap", "TensorRecipe", "plain_ratio_map", "tensor_seed"]
