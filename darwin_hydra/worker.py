"""``darwin-hydra-worker RUN_DIR``: one worker of a distributed search (docs/distributed.md).

A run with ``optimizer.storage=<database URL>`` is one coordinator (``darwin-hydra``: preflight,
scan, prescribe, its share of the trials, then merge, health and report) and any number of workers.
A worker needs only the run directory, on a filesystem it shares with the coordinator (as on SLURM
clusters): it reads the run's saved config (``.hydra/config.yaml``) and waits for the coordinator's
scan, builds its own trial session on its own device, then runs trials of the run's study, phase by
phase as the coordinator starts them, until the study's budgets are met. It never scans, merges or
writes the run's results; a worker killed at any moment loses nothing (another one re-runs its trial).

It is a Hydra app of its own (config ``WorkerConfig``) so that Hydra's launchers start many at once:

    darwin-hydra-worker RUN_DIR                                   # one worker, any scheduler
    darwin-hydra-worker -m run_dir=RUN_DIR 'index=range(1,4)' hydra/launcher=joblib hydra.launcher.n_jobs=3
    darwin-hydra-worker -m run_dir=RUN_DIR 'index=range(1,9)' hydra/launcher=submitit_slurm ...

Each worker's log goes to ``RUN_DIR/workers/<index>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from darwin_hydra.config import ConfigError

log = logging.getLogger("darwin_hydra.worker")


@dataclass
class WorkerConfig:
    """One worker of a distributed search."""

    # the run directory of the coordinator (``hydra.run.dir`` of its ``darwin-hydra`` command)
    run_dir: str = MISSING
    # this worker's number: its log directory, its name in the study and on W&B, its GPU (below)
    index: int = 0
    # torch threads (null: the run's ``threads``)
    threads: Optional[int] = None
    # null: the run's device; a run on ``cuda`` puts worker i on cuda:<i mod the GPUs it sees>
    device: Optional[str] = None
    # how long to wait for the coordinator's scan and for each phase to start (seconds)
    wait_s: float = 3600.0


def register_worker_config() -> None:
    """``darwin_worker`` in Hydra's ConfigStore: the schema, and where Hydra puts a worker's files."""
    cs = ConfigStore.instance()
    cs.store(name="darwin_worker_schema", node=WorkerConfig)
    cs.store(name="darwin_worker", node={
        "defaults": ["darwin_worker_schema", "_self_"],
        "hydra": {
            "run": {"dir": "${run_dir}/workers/${index}"},
            "sweep": {"dir": "${run_dir}/workers", "subdir": "${index}"},
            "job": {"name": "worker", "chdir": False},
            "output_subdir": None,
        },
    })


def worker_device(run_device: str, index: int, device: str | None) -> str:
    """The device worker ``index`` runs trials on: ``device`` when given; else the run's, where a plain
    ``cuda`` becomes cuda:<index mod the visible GPUs> (one worker per GPU on one machine; under SLURM
    each job sees its own GPU as cuda:0)."""
    if device:
        return device
    if run_device == "cuda":
        import torch

        count = torch.cuda.device_count()
        return f"cuda:{index % count}" if count else run_device
    return run_device


def run_config(run_dir: Path, threads: int | None = None):
    """The typed config of the run in ``run_dir`` (its saved ``.hydra/config.yaml``), with this worker's
    threads."""
    from omegaconf import OmegaConf

    from darwin_hydra.config import load_config
    from darwin_hydra.run import saved_config_path

    path = saved_config_path(run_dir)
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a darwin-hydra run directory ({path} is missing): give the "
                          "hydra.run.dir of the coordinator's darwin-hydra command, once it has started")
    saved = OmegaConf.load(path)
    OmegaConf.update(saved, "paths.output_dir", str(run_dir), merge=False, force_add=True)
    if threads is not None:
        OmegaConf.update(saved, "threads", threads, merge=False)
    cfg = load_config(saved)
    if not cfg.optimizer.storage:
        raise ConfigError(
            f"{path}: optimizer.storage is null, so the run's study is its own SQLite file, for one process; "
            "a distributed run names a database the workers share: darwin-hydra "
            "optimizer.storage=postgresql+psycopg://USER@HOST/DB ... (docs/distributed.md)"
        )
    return cfg


def _wait_for(what: str, get, run_dir: Path, wait_s: float):
    """``get()`` once it is not None, polled every second for up to ``wait_s`` (the coordinator's
    progress, seen through the run directory)."""
    deadline = time.monotonic() + wait_s
    while (found := get()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_dir}: no {what} after {wait_s:.0f} s; is the coordinator (darwin-hydra with "
                               "this hydra.run.dir) running?")
        time.sleep(1.0)
    return found


def _tracker(cfg, run_dir: Path, name: str):
    """The worker's W&B run: job_type ``worker``, in the coordinator's group (``tracking.json``), or
    in a group named after the coordinator's W&B run when it has none."""
    import json

    from darwin_hydra.tracking import Tracker

    saved = run_dir / "tracking.json"
    coordinator = json.loads(saved.read_text()) if saved.exists() else {}
    group = cfg.logger.group or coordinator.get("group") or coordinator.get("run_name")
    cfg = dataclasses.replace(cfg, logger=dataclasses.replace(cfg.logger, group=group))
    return Tracker(cfg, run_dir, job_type="worker")


def work(wcfg: WorkerConfig) -> int:
    """Run one worker on ``wcfg.run_dir``; returns the trials it told."""
    import torch

    from darwin_hydra.pipeline import RunContext
    from darwin_hydra.run import saved_config_path
    from darwin_hydra.stages.search import process_name

    run_dir = Path(wcfg.run_dir).expanduser().resolve()
    _wait_for("saved config (.hydra/config.yaml)", lambda: saved_config_path(run_dir).exists() or None, run_dir,
              wcfg.wait_s)
    cfg = run_config(run_dir, wcfg.threads)
    cfg = dataclasses.replace(cfg, device=worker_device(str(cfg.device), wcfg.index, wcfg.device))
    name = process_name(f"worker-{wcfg.index}")
    if (run_dir / "genome.json").exists():
        log.info("%s: the search of %s is finished (genome.json); nothing to do", name, run_dir)
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ctx = RunContext(cfg, run_dir)
    log.info("%s: waiting for the scan of %s", name, run_dir)
    scan_stage = ctx.stage("scan")
    ctx.results.scan = _wait_for("scan of these parents in scan/", lambda: scan_stage.load(ctx), run_dir, wcfg.wait_s)
    ctx.tracker = _tracker(cfg, run_dir, name)
    try:
        search = ctx.stage("search")
        if not hasattr(search, "work"):
            raise TypeError(f"pipeline.registry.search is {type(search).__name__}, which has no work(ctx, worker): "
                            "it cannot run as a distributed worker")
        log.info("%s: device %s, %d torch thread(s), study %s", name, cfg.device, torch.get_num_threads(),
                 cfg.optimizer.study_name)
        return search.work(ctx, name, wait_s=wcfg.wait_s)
    finally:
        ctx.tracker.finish()


register_worker_config()


@hydra.main(version_base="1.3", config_path=None, config_name="darwin_worker")
def _app(cfg) -> None:
    from omegaconf import OmegaConf

    work(OmegaConf.to_object(cfg))


def main() -> None:
    """``darwin-hydra-worker RUN_DIR [overrides]`` or ``darwin-hydra-worker run_dir=RUN_DIR [overrides]``
    (``-m`` with a launcher starts several)."""
    import signal

    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):  # the positional RUN_DIR
        sys.argv[1] = f"run_dir={Path(args[0]).expanduser().resolve()}"
    signal.signal(signal.SIGTERM, _unwind)
    _app()


def _unwind(signum, frame) -> None:
    """A scheduler's SIGTERM unwinds like Ctrl-C: the W&B run is finished. (The trial in progress is
    left RUNNING; once its heartbeat is stale another worker runs it.)"""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
