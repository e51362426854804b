"""The miniature world: a zoo of tiny parents trained here, with held-out skill benchmarks and probe sets.

``ensure_zoo(cfg, cache_dir)`` builds (once, cached by config hash) and returns the zoo root;
``resolve_zoo_uri("zoo://dense/father", cfg, cache_dir)`` maps zoo URIs to paths. See docs/zoo.md.
"""

from darwin_hydra.zoo.build import default_cache_dir, ensure_zoo, load_metadata, resolve_zoo_uri, zoo_root
from darwin_hydra.zoo.config import ModelSpec, TrainSpec, ZooConfig, zoo_hash


def uniform_merge_table(*args, **kwargs):
    """See ``darwin_hydra.zoo.table.uniform_merge_table`` (imported lazily: it pulls in lm-eval)."""
    from darwin_hydra.zoo.table import uniform_merge_table as _table

    return _table(*args, **kwargs)


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
