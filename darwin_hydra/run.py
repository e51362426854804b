"""Starting a run or resuming one: which config it runs with, and its ``.hydra/`` record.

Hydra itself is told not to write ``.hydra/`` (``hydra.output_subdir: null``): a later call on a run
directory must not overwrite the record of the run that made it. Instead:

- a **fresh** run directory gets ``.hydra/config.yaml`` (the composed config, unresolved, as Hydra
  writes it), ``overrides.yaml`` and ``hydra.yaml``, written once;
- on an **existing** run (``darwin-hydra hydra.run.dir=RUN_DIR``) the saved config is the run's
  config. The overrides of this call must agree with it, except the settings that never change a
  result (``RESUME_FREE``: worker counts, threads, logging); a conflicting override is refused,
  naming the key, the saved value and the new one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from darwin_hydra.config import ConfigError, DarwinConfig, load_config

log = logging.getLogger(__name__)

# Overrides a resumed run may change: how it runs, never what it computes.
RESUME_FREE = ("merge.workers", "merge.processes", "threads", "logger.mode", "mri.progress", "memory.host_ram",
               "memory.enforce", "memory.max_memory")


class ResumeConflictError(ConfigError):
    """An override of a resuming call contradicts the run's saved config."""


def saved_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / ".hydra" / "config.yaml"


def prepare_run(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = (),
                hydra_cfg: Any = None) -> DarwinConfig:
    """The typed config this call runs with in ``run_dir`` (see the module doc); writes the ``.hydra``
    record of a fresh run. ``overrides``: this call's task overrides; ``hydra_cfg``: Hydra's own
    config (for ``hydra.yaml`` and the group choices)."""
    from darwin_hydra.io.atomic import write_text_atomic

    run_dir = Path(run_dir)
    saved_path = saved_config_path(run_dir)
    if not saved_path.exists():
        typed = load_config(cfg)  # refuse a bad config before anything is written
        write_text_atomic(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(list(overrides)))
        if hydra_cfg is not None:
            write_text_atomic(run_dir / ".hydra" / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
        write_text_atomic(saved_path, OmegaConf.to_yaml(cfg))  # last: its presence marks a started run
        return typed

    saved = OmegaConf.load(saved_path)
    saved_choices = _saved_choices(run_dir)
    choices = dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {}
    conflicts, free = [], []
    for key, deleted in _override_keys(overrides):
        if key.startswith("hydra.") or key == "hydra":
            continue
        if key in choices and key in saved_choices:  # a group option: compare the choices
            if choices[key] != saved_choices[key]:
                conflicts.append(f"{key}: the run used {saved_choices[key]!r}, this call says {choices[key]!r}")
            continue
        old, new = _value(saved, key), (None if deleted else _value(cfg, key))
        if old == new:
            continue
        if key in RESUME_FREE:
            free.append(key)
        else:
            conflicts.append(f"{key}: the run used {old!r}, this call says {new!r}")
    if conflicts:
        raise ResumeConflictError(
            f"{run_dir} is an existing run, resumed with its saved config ({saved_path}); this call's overrides "
            f"contradict it:\n  - " + "\n  - ".join(conflicts) + "\nResume without them, or start a new run "
            f"directory. Only {list(RESUME_FREE)} may change on resume."
        )
    for key in free:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
    # the run directory as this call sees it (the saved value is Hydra's interpolation)
    OmegaConf.update(saved, "paths.output_dir", str(run_dir), merge=False, force_add=True)
    log.info("resuming %s with its saved config%s", run_dir, f" (changed: {free})" if free else "")
    return load_config(saved)


def _override_keys(overrides: Sequence[str]) -> list[tuple[str, bool]]:
    """(key, is_delete) of each override (``+a.b=1`` -> ``a.b``; ``~a`` -> ``a``, deleted)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [(o.key_or_group, o.is_delete()) for o in parsed]


def _value(cfg: DictConfig, key: str) -> Any:
    """The value at ``key`` as plain data (Enums as their strings), None when absent."""
    from enum import Enum

    node = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    return node.value if isinstance(node, Enum) else node


def _saved_choices(run_dir: Path) -> dict:
    path = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    hydra = OmegaConf.load(path)
    return dict(OmegaConf.select(hydra, "hydra.runtime.choices", default={}) or {})


def run(overrides: Sequence[str] = (), run_dir: str | Path | None = None):
    """``darwin-hydra OVERRIDES hydra.run.dir=RUN_DIR`` in this process (notebooks, tests): compose,
    start or resume the run, run its stages; returns the ``RunContext``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from darwin_hydra.config import register_configs
    from darwin_hydra.pipeline import run_pipeline

    register_configs()
    overrides = list(overrides)
    if run_dir is not None:
        overrides.append(f"hydra.run.dir={run_dir}")
    if GlobalHydra.instance().is_initialized():
        raise RuntimeError("darwin_hydra.run.run: called inside a Hydra app; use run_pipeline with its config")
    with initialize_config_module(config_module="darwin_hydra_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    hydra_cfg = cfg.hydra
    run_dir = Path(hydra_cfg.run.dir)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.update(cfg, "paths.output_dir", str(run_dir), merge=False)
    task = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    typed = prepare_run(cfg, run_dir, task, hydra_cfg=hydra_cfg)
    return run_pipeline(typed, run_dir)

