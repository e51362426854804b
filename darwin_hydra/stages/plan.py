"""Plan stage: the run's memory plan (``darwin_hydra.memory``), printed, and refused when it cannot fit.

``darwin-hydra 'pipeline.stages=[plan]'`` plans every stage of the pipeline's registry (what a full run
would do) from the parents' headers alone, in seconds; preflight runs the same plan for the stages of
the run and refuses a run that does not fit before any heavy work."""

from __future__ import annotations

import logging

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


def run_plan(ctx: RunContext, stages: list[str]):
    """The plan of ``stages`` for this run's config and parents (headers only)."""
    from darwin_hydra.memory import plan_run

    return plan_run(ctx.cfg, ctx.readers, stages)


class PlanStage(Stage):
    name = "plan"

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def run(self, ctx: RunContext):
        others = [s for s in self.pipeline.stages if s != self.name]
        plan = run_plan(ctx, others or [s for s in self.pipeline.registry if s != self.name])
        log.info("%s", plan.table())
        plan.check()
        return plan
