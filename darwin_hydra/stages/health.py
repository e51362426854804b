"""Health stage: probe-scan the exported child and compare it with both parents, layer by layer."""

from __future__ import annotations

import logging

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


def child_path(ctx: RunContext):
    path = ctx.artifacts.get("child_dir", ctx.child_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"health: no exported child at {path}; run the merge stage first (pipeline.stages=[...,merge,health])"
        )
    return path


def run_health(ctx: RunContext, model_dir) -> dict:
    """Probe-scan ``model_dir`` with the run's probes and settings; flag it against the parents' scans."""
    from darwin_hydra.health import health_from_config
    from darwin_hydra.mri.config import mri_config, probes_config
    from darwin_hydra.mri.probes import layer_importance, load_probe_prompts
    from darwin_hydra.mri.scan import load_model, load_tokenizer
    from darwin_hydra.report.charts import health_curves
    from darwin_hydra.stages.scan import ensure_scan

    scan = ensure_scan(ctx)
    mri = mri_config(ctx.cfg.mri)
    probes = probes_config(ctx.cfg.probes)
    prompts = load_probe_prompts(probes, ctx.resolve)
    model = load_model(model_dir, dtype=mri.dtype, device=mri.device)
    tok = load_tokenizer(model_dir, ctx.parent_path("father"))
    child = layer_importance(model, tok, prompts, max_length=probes.max_length, batch_size=probes.batch_size,
                             reduce=mri.probe_reduce, progress=mri.progress)
    father, mother = scan.probe_father.importance, scan.probe_mother.importance
    report = health_from_config(child.importance, father, mother, ctx.cfg.health)
    moe = None
    if mri.moe and scan.moe_mother is not None:
        from darwin_hydra.arch import is_moe
        from darwin_hydra.mri.moe import moe_scan
        from darwin_hydra.mri.scan import calibration_prompts

        if is_moe(model.config):  # the child on the same calibration data as the parents
            child_moe = moe_scan(model, tok, calibration_prompts(prompts, mri.moe_calibration), probes.max_length,
                                 probes.batch_size, mri.moe_dead_rule, mri.moe_dead_threshold,
                                 mri.moe_dead_abs_threshold, progress=mri.progress)
            moe = {
                role: {"dead": sum(len(v) for v in s.dead_experts().values()),
                       "experts": s.num_experts * len(s.layers),
                       "per_layer": {str(k): v for k, v in s.per_layer().items()}}
                for role, s in (("father", scan.moe_father), ("mother", scan.moe_mother), ("child", child_moe))
                if s is not None
            }
    chart = health_curves(child.importance, father, mother, report.flagged_layers, ctx.run_dir / "charts" / "health.png")
    out = {
        "verdict": report.verdict,
        "flagged_layers": report.flagged_layers,
        "flags": [f.__dict__ | {"text": f.describe()} for f in report.flags],
        "thresholds": report.thresholds,
        "importance": {"child": child.importance, "father": father, "mother": mother},
        "chart": str(chart),
        "moe": moe,
    }
    return out


class HealthStage(Stage):
    name = "health"

    def run(self, ctx: RunContext) -> None:
        out = run_health(ctx, child_path(ctx))
        ctx.write_json("health.json", out)
        ctx.artifacts["health"] = out
        ctx.tracker.log_images({"health/curves": out["chart"]})
        ctx.tracker.log_summary({"health/verdict": out["verdict"], "health/flags": len(out["flags"])})
        if out["moe"]:
            ctx.tracker.log_summary({f"moe/dead_{role}": v["dead"] for role, v in out["moe"].items()})
            log.info("MoE dead experts: %s", {role: f"{v['dead']}/{v['experts']}" for role, v in out["moe"].items()})
        if out["verdict"] == "healthy":
            log.info("health: child is healthy (no interference or function loss at the configured thresholds)")
        else:
            log.warning("health: %d flag(s) on layers %s:\n  %s", len(out["flags"]), out["flagged_layers"],
                        "\n  ".join(f["text"] for f in out["flags"]))
