"""The miniature world: a zoo of tiny parents trained here, with held-out skill benchmarks and probe sets.

``ensure_zoo(cfg, cache_dir)`` builds (once, cached by config hash) and returns the zoo root;
``resolve_zoo_uri("zoo://dense/father", cfg, cache_dir)`` maps zoo URIs to paths. See docs/zoo.md.
"""

from importlib import import_module

from darwin_hydra.zoo.config import ModelSpec, TrainSpec, ZooConfig, zoo_hash

# The builder pulls in transformers (and the table lm-eval): imported on first use, so that the
# config schema (darwin_hydra.config imports zoo.config) costs no start-up time of every command.
_LAZY = {
    "default_cache_dir": "darwin_hydra.zoo.build",
    "ensure_zoo": "darwin_hydra.zoo.build",
    "load_metadata": "darwin_hydra.zoo.build",
    "resolve_zoo_uri": "darwin_hydra.zoo.build",
    "zoo_root": "darwin_hydra.zoo.build",
    "uniform_merge_table": "darwin_hydra.zoo.table",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'darwin_hydra.zoo' has no attribute {name!r}")


__all__ = [
    "ModelSpec",
    "TrainSpec",
    "ZooConfig",
    "default_cache_dir",
    "ensure_zoo",
    "load_metadata",
    "resolve_zoo_uri",
    "uniform_merge_table",
    "zoo_hash",
    "zoo_root",
]
