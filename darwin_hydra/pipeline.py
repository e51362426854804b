"""The stage pipeline: a list of stage names in config, each built by ``_target_`` and run in order.

A stage is a small class with ``run(ctx)``. Stages talk through the ``RunContext``: results of
earlier stages (``ctx.artifacts``) and files in the run directory. A stage run on its own
(``pipeline.stages=[merge]``) finds what it needs on disk or falls back to a documented default.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Stage:
    """Base class of pipeline stages. Subclasses set ``name`` and implement ``run``."""

    name: str = "stage"

    def run(self, ctx: "RunContext") -> None:  # pragma: no cover - interface
        raise NotImplementedError


class RunContext:
    """Everything a stage needs: the composed config, the run directory, resolved parent paths and
    the artifacts earlier stages produced."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(str(cfg.paths.cache_dir)).expanduser()
        self.artifacts: dict[str, Any] = {}
        self._paths: dict[str, Path | None] = {}
        self.tracker = None  # set by run_pipeline (darwin_hydra.tracking.Tracker)

    # ---- locations -------------------------------------------------------------------------
    def resolve(self, uri: str) -> str:
        """Map ``zoo://`` URIs to real paths (building the zoo on first use); leave others alone."""
        if isinstance(uri, str) and uri.startswith("zoo://"):
            from darwin_hydra.zoo import resolve_zoo_uri

            zoo_cfg = OmegaConf.to_object(self.cfg.zoo)
            return str(resolve_zoo_uri(uri, zoo_cfg, self.cache_dir))
        return uri

    def parent_path(self, role: str) -> Path | None:
        """Local directory of ``father``, ``mother`` or ``base`` (None when base is not given)."""
        if role not in self._paths:
            spec = self.cfg.parents.get(role)
            if spec is None:
                self._paths[role] = None
            else:
                from darwin_hydra.io.resolve import resolve_model

                self._paths[role] = resolve_model(
                    str(spec),
                    allow_download=bool(self.cfg.parents.allow_download),
                    revision=self.cfg.parents.revision,
                    zoo_resolver=lambda u: Path(self.resolve(u)),
                )
        return self._paths[role]

    def readers(self) -> dict:
        """Streaming readers of the parents present (father, mother, and base when given)."""
        if "_readers" not in self.artifacts:
            from darwin_hydra.io.checkpoint import CheckpointReader

            allow_pickle = bool(self.cfg.parents.allow_pickle)
            self.artifacts["_readers"] = {
                role: CheckpointReader(path, allow_pickle=allow_pickle)
                for role in ("father", "mother", "base")
                if (path := self.parent_path(role)) is not None
            }
        return self.artifacts["_readers"]

    def check_parents(self) -> None:
        """The pre-merge compatibility check (headers only): run once, before any heavy work."""
        if not self.artifacts.get("_parents_checked"):
            from darwin_hydra.io.checkpoint import check_compatible

            check_compatible(self.readers())
            self.artifacts["_parents_checked"] = True

    @property
    def child_dir(self) -> Path:
        return self.run_dir / str(self.cfg.export.dir_name)

    def torch_dtype(self) -> torch.dtype:
        name = str(self.cfg.parents.dtype)
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"parents.dtype={name!r} is not a torch dtype (use float32, bfloat16 or float16)")
        return dtype

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as JSON into the run directory atomically (temp file, then rename)."""
        path = self.run_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
        tmp.replace(path)
        return path


def build_stages(cfg: DictConfig) -> list[Stage]:
    """Instantiate the stages named in ``pipeline.stages`` from ``pipeline.registry``."""
    registry = cfg.pipeline.registry
    unknown = [s for s in cfg.pipeline.stages if s not in registry]
    if unknown:
        raise ValueError(
            f"pipeline.stages names {unknown} which are not in pipeline.registry; known stages: {list(registry)}"
        )
    stages = []
    for name in cfg.pipeline.stages:
        stage = instantiate(registry[name], _recursive_=False)
        if not isinstance(stage, Stage):
            raise TypeError(f"pipeline.registry.{name} built {type(stage).__name__}, which is not a darwin_hydra Stage")
        stages.append(stage)
    return stages


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> RunContext:
    """Run the configured stages in order; return the context with every artifact."""
    from darwin_hydra.tracking import Tracker

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    stages = build_stages(cfg)  # fail on a bad stage list before any heavy work
    if "search" in cfg.pipeline.stages:
        from darwin_hydra.search.fitness import check_honest_split

        check_honest_split(cfg.benchmark)  # refuse before the scan, not after it
    ctx = RunContext(cfg, run_dir)
    ctx.tracker = Tracker(cfg, ctx.run_dir)
    try:
        for stage in stages:
            t0 = time.perf_counter()
            log.info("stage %s: start", stage.name)
            stage.run(ctx)
            seconds = time.perf_counter() - t0
            ctx.artifacts.setdefault("stage_seconds", {})[stage.name] = seconds
            ctx.tracker.log_summary({f"time/{stage.name}_s": seconds})
            log.info("stage %s: done in %.1f s", stage.name, seconds)
    finally:
        ctx.tracker.finish()
    return ctx
