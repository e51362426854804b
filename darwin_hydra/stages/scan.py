"""Scan stage: the Model MRI of both parents (static, probe and MoE scans), cached by fingerprint."""

from __future__ import annotations

import logging

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


def ensure_scan(ctx: RunContext):
    """The MRI of the run's parents: from this run (memory or scan/scan.json), else the scan cache,
    else scanned now."""
    if "scan" not in ctx.artifacts:
        from darwin_hydra.mri.config import mri_config, probes_config
        from darwin_hydra.mri.scan import MriResult, run_scan

        saved = ctx.run_dir / "scan" / "scan.json"
        if saved.exists():  # this run's own scan (a stage run on its own, a resume, a reproduction)
            ctx.artifacts["scan"] = MriResult.load(saved)
            return ctx.artifacts["scan"]

        skill = ctx.cfg.parents.mother_skill
        if skill and skill not in ctx.cfg.probes.sets:
            raise ValueError(
                f"parents.mother_skill={skill!r} is not a probe set of probes={ctx.cfg.probes.name} "
                f"({sorted(ctx.cfg.probes.sets)}): choose probes with that set (e.g. probes=darwin_v6 for "
                f"the Hub presets), one of those sets, or parents.mother_skill=null to infer it"
            )
        ctx.check_parents()
        ctx.artifacts["scan"] = run_scan(
            ctx.parent_path("father"),
            ctx.parent_path("mother"),
            probes_config(ctx.cfg.probes),
            mri_config(ctx.cfg.mri),
            resolve=ctx.resolve,
            cache_dir=ctx.cache_dir / "scans",
            out_dir=ctx.run_dir / "scan",
            # what the user knows beats what the scan infers: the mother's skill, the common base
            mother_sets=[str(skill)] if (skill := ctx.cfg.parents.mother_skill) else None,
            base_path=ctx.parent_path("base"),
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
        ctx.tracker.log_summary({"mri/scan_seconds": result.scan_seconds, "mri/from_cache": result.from_cache})
