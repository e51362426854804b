"""Scan stage: the Model MRI of both parents (static, probe and MoE scans), cached by fingerprint."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


def ensure_scan(ctx: RunContext):
    """The MRI of the run's parents: from this run's artifacts, else the scan cache, else scanned now."""
    if "scan" not in ctx.artifacts:
        from darwin_hydra.mri.config import mri_config, probes_config
        from darwin_hydra.mri.scan import run_scan

        ctx.check_parents()
        ctx.artifacts["scan"] = run_scan(
            ctx.parent_path("father"),
            ctx.parent_path("mother"),
            probes_config(ctx.cfg.probes),
            mri_config(ctx.cfg.mri),
            resolve=ctx.resolve,
            cache_dir=ctx.cache_dir / "scans",
            out_dir=ctx.run_dir / "scan",
        )
    return ctx.artifacts["scan"]


class ScanStage(Stage):
    name = "scan"

    def run(self, ctx: RunContext) -> None:
        result = ensure_scan(ctx)
        table = result.summary_table()
        log.info("Model MRI of %s:\n%s", ctx.cfg.parents.name, table)
        ctx.tracker.log_images({f"mri/{k}": v for k, v in result.chart_paths.items()})
        ctx.tracker.log_artifact("scan", "mri", [ctx.run_dir / "scan" / "scan.json"])
        ctx.tracker.log_summary({"mri/probe_sets": OmegaConf.to_container(ctx.cfg.probes.sets).__len__()})
