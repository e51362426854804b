"""Health stage: probe-scan the exported child and compare it with both parents, layer by layer."""

from __future__ import annotations

import json
import logging

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


def exported_child(ctx: RunContext):
    """The run's exported child (``Exported``): this process's merge, else the one on disk."""
    exported = ctx.results.merge or ctx.stage("merge").load(ctx)
    if exported is None:
        raise FileNotFoundError(
            f"no exported child at {ctx.child_dir} that verifies; run the merge stage first "
            "(pipeline.stages=[...,merge,health])"
        )
    return exported


def run_health(ctx: RunContext, model_dir, health_cfg, mri, probes) -> dict:
    """Probe-scan ``model_dir`` with the run's probes and settings; flag it against the parents' scans."""
    from darwin_hydra.health import health_check
    from darwin_hydra.mri.probes import layer_importance, load_probe_prompts
    from darwin_hydra.models import load_model, load_tokenizer
    from darwin_hydra.report.charts import health_curves

    scan = ctx.require("scan")
    prompts = load_probe_prompts(probes, ctx.resolve)
    trust = ctx.cfg.parents.trust_remote_code
    from darwin_hydra.memory import placement

    model = load_model(model_dir, dtype=mri.dtype, trust_remote_code=trust, **placement(ctx.cfg.memory, mri.device))
    tok = load_tokenizer(model_dir, ctx.parent_path("father"), trust_remote_code=trust)
    child = layer_importance(model, tok, prompts, max_length=probes.max_length, batch_size=probes.batch_size,
                             reduce=mri.probe_reduce, progress=mri.progress)
    father, mother = scan.probe_father.importance, scan.probe_mother.importance
    report = health_check(child.importance, father, mother, health_cfg)
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
    return {
        "verdict": report.verdict,
        "flagged_layers": report.flagged_layers,
        "flags": [f.__dict__ | {"text": f.describe()} for f in report.flags],
        "thresholds": report.thresholds,
        "importance": {"child": child.importance, "father": father, "mother": mother},
        "chart": str(chart),
        "moe": moe,
    }


class HealthStage(Stage):
    name = "health"

    def __init__(self, health, mri, probes):
        self.health, self.mri, self.probes = health, mri, probes

    def load(self, ctx: RunContext) -> dict | None:
        """This run's ``health.json`` when it is the check of the child now exported."""
        path = ctx.run_dir / "health.json"
        if not path.exists():
            return None
        out = json.loads(path.read_text())
        exported = ctx.results.merge or ctx.stage("merge").load(ctx)
        if exported is None or out.get("genome_hash") != exported.recipe.genome_hash:
            return None
        return out

    def run(self, ctx: RunContext) -> dict:
        exported = exported_child(ctx)
        out = run_health(ctx, exported.dir, self.health, self.mri, self.probes)
        out["genome_hash"] = exported.recipe.genome_hash
        ctx.write_json("health.json", out)
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
        return out
