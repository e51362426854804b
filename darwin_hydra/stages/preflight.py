"""Preflight stage: everything that can fail cheaply fails here, in seconds, before the scan.

The config's keys and values were checked when the run started (``config.load_config``). Here, with
nothing but headers, task definitions and probe files read:

- every parent (father, mother, base) is found, all missing ones named at once;
- their layouts agree (names, shapes, dtypes; ``io.compat``) and code an ``auto_map`` names is there;
- the genome space fits the parents (bounds, genes; ``GenomeSpace.from_config``);
- fitness and report tasks exist, are disjoint, and report a per-item metric (when a stage uses them);
- every probe set loads and holds text;
- the run directory is writable, with room for the child;
- the memory plan fits (``darwin_hydra.memory``: every part's bytes against each device's budget).

All problems are collected and raised together (``PreflightError``), naming each file, task or option.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """One or more problems found before any heavy work; the message lists them all."""


@dataclass
class PreflightReport:
    checks: list[str] = field(default_factory=list)


class PreflightStage(Stage):
    name = "preflight"

    def __init__(self, parents, probes, genome, benchmark, pipeline, export):
        self.parents, self.probes, self.genome = parents, probes, genome
        self.benchmark, self.pipeline, self.export = benchmark, pipeline, export

    def run(self, ctx: RunContext) -> PreflightReport:
        problems: list[str] = []
        report = PreflightReport()
        stages = set(self.pipeline.stages)

        def check(what: str, fn) -> None:
            try:
                fn()
                report.checks.append(what)
            except Exception as e:  # noqa: BLE001 - every problem is collected, then raised together
                problems.append(f"{what}: {e}")

        for role in ("father", "mother", "base"):
            if getattr(self.parents, role) is not None:
                check(f"parents.{role}={getattr(self.parents, role)}", lambda role=role: ctx.parent_path(role))
        parents_found = not problems
        if parents_found:
            check("parents' layouts agree (names, shapes, dtypes, tokenizers)", lambda: ctx.checked_readers)
            check("father's auto_map code", self._check_remote_code(ctx))
            if stages & {"prescribe", "search"}:
                check(f"genome={self.genome.name}", lambda: self._genome_space(ctx))
            if "merge" in stages:
                check("room for the child", lambda: self._check_disk(ctx))
            check("memory plan", lambda: self._check_memory(ctx))
        if stages & {"search", "report"}:
            self._check_benchmark(ctx, stages, problems, report)
        if stages & {"scan", "search", "health"}:
            for name in self.probes.sets:
                check(f"probes.sets.{name}", lambda name=name: self._probe_set(ctx, name))
        check(f"run directory {ctx.run_dir} writable", lambda: self._check_writable(ctx))
        if problems:
            raise PreflightError(f"preflight found {len(problems)} problem(s) before any heavy work:\n  - "
                                 + "\n  - ".join(problems))
        log.info("preflight: %d checks passed (%s)", len(report.checks), "; ".join(report.checks))
        return report

    # ---- the checks --------------------------------------------------------------------------
    def _genome_space(self, ctx: RunContext) -> None:
        from darwin_hydra.search.genome import GenomeSpace

        GenomeSpace.from_config(self.genome, ctx.num_layers)

    def _check_remote_code(self, ctx: RunContext):
        def fn():
            from darwin_hydra.io.support_files import remote_code_files

            remote_code_files(ctx.parent_path("father"))

        return fn

    def _check_benchmark(self, ctx: RunContext, stages: set, problems: list[str], report: PreflightReport) -> None:
        from darwin_hydra.evaluate.benchmark import check_tasks
        from darwin_hydra.search.fitness import check_honest_split

        try:
            check_honest_split(self.benchmark)
        except ValueError as e:
            problems.append(str(e))
        try:
            include = ctx.resolve(self.benchmark.include_path)
        except Exception as e:  # noqa: BLE001
            problems.append(f"benchmark.include_path={self.benchmark.include_path}: {e}")
            return
        groups = []
        if "search" in stages:
            groups.append(("benchmark.fitness_tasks", list(self.benchmark.fitness_tasks)))
        if "report" in stages:
            groups.append(("benchmark.report_tasks", list(self.benchmark.report_tasks)))
        for what, tasks in groups:
            found = check_tasks(tasks, include, what, metric=self.benchmark.metric,
                                lm_eval_defaults=self.benchmark.lm_eval_defaults)
            problems += found
            if not found:
                report.checks.append(f"{what}={tasks}")

    def _probe_set(self, ctx: RunContext, name: str) -> None:
        from dataclasses import replace

        from darwin_hydra.mri.probes import load_probe_prompts

        one = replace(self.probes, sets={name: self.probes.sets[name]})
        load_probe_prompts(one, ctx.resolve)

    def _check_memory(self, ctx: RunContext) -> None:
        from darwin_hydra.stages.plan import run_plan

        plan = run_plan(ctx, list(self.pipeline.stages))
        log.info("%s", plan.table())
        plan.check()

    def _check_disk(self, ctx: RunContext) -> None:
        need = ctx.readers["father"].total_bytes
        free = shutil.disk_usage(ctx.run_dir).free
        if free < need:
            raise OSError(f"the child needs ~{need / 2**30:.1f} GiB and {ctx.run_dir} has {free / 2**30:.1f} GiB free")

    def _check_writable(self, ctx: RunContext) -> None:
        probe = ctx.run_dir / ".preflight-write-test"
        probe.write_text("ok")
        probe.unlink()
