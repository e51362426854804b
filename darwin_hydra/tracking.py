"""Weights & Biases tracking: one W&B run per pipeline run, its files inside the run directory.

Disabled (``logger=none``) every call is a no-op, so stages log unconditionally. Multirun sweeps
share a W&B group named after the sweep directory, so ``-m`` runs sit together on the dashboard.
A resumed run (``tracking.json`` in the run directory) continues its W&B run instead of opening a new
one. Credentials come from the environment (``WANDB_API_KEY``) only, never from config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _sweep_group() -> str | None:
    """The multirun sweep directory's name when running under ``-m``, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"sweep-{Path(hc.sweep.dir).name}-{Path(hc.sweep.dir).parent.name}"
    except Exception:  # not inside a Hydra app (tests, library use)
        return None
    return None


class Tracker:
    """Thin wrapper over a wandb run."""

    def __init__(self, cfg, run_dir: Path, job_type: str = "run"):
        from darwin_hydra.config import plain_config

        self.run = None
        lcfg = cfg.logger
        if not lcfg.enabled or lcfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        saved = run_dir / "tracking.json"
        previous = json.loads(saved.read_text()) if saved.exists() else {}
        resume_id = previous.get("run_id") if previous.get("job_type", "run") == job_type else None
        # a distributed run's coordinator and workers share a group named after the run (the workers
        # use the same fallback: search/distributed.py)
        group = lcfg.group or previous.get("group") or _sweep_group() or (
            f"{cfg.parents.name}-{run_dir.parent.name}-{run_dir.name}" if cfg.optimizer.storage else None)
        self.run = wandb.init(
            project=lcfg.project,
            entity=lcfg.entity,
            group=group,
            job_type=job_type,
            mode=str(lcfg.mode),
            dir=str(run_dir),
            name=f"{cfg.parents.name}-{run_dir.parent.name}-{run_dir.name}",
            tags=list(lcfg.tags),
            config=plain_config(cfg),
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="finish_previous",
        )
        log.info("W&B run %s (%s mode, group %s%s) in %s", self.run.id, lcfg.mode, group,
                 ", resumed" if resume_id else "", run_dir)
        if job_type == "run":  # where to find this run on the dashboard, for people and for tests
            from darwin_hydra.io.atomic import write_text_atomic

            write_text_atomic(saved, json.dumps(
                {"project": lcfg.project, "entity": lcfg.entity, "group": group, "run_id": self.run.id,
                 "run_name": self.run.name, "mode": str(lcfg.mode), "job_type": job_type}, indent=2))

    started = True  # a real tracker (even a disabled one); NullTracker says False

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def log_images(self, images: dict[str, str | Path]) -> None:
        if self.run is not None and images:
            import wandb

            self.run.log({k: wandb.Image(str(p)) for k, p in images.items()})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_artifact(self, name: str, kind: str, paths: list[str | Path]) -> None:
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name, type=kind)
            for p in paths:
                art.add_file(str(p))
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class NullTracker(Tracker):
    """A tracker that logs nothing (before the run's tracker starts, in library use)."""

    started = False

    def __init__(self):
        self.run = None
