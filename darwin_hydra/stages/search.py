"""Search stage: CMA-ES over the genome from the prescribe stage's start, phase 1 on the proxy, phase 2
on the benchmark (dev split), then the uniform-ratio baseline with the same number of benchmark
evaluations. Writes ``genome.json`` (values + genome_hash) and ``search.json`` (history)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from darwin_hydra.faults import fault_point
from darwin_hydra.pipeline import RunContext, Stage
from darwin_hydra.search.fitness import benchmark_fitness, check_honest_split, uniform_grid

log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    """The search's result: ``genome`` (genome.json's content) and ``record`` (search.json's)."""

    genome: dict
    record: dict

    @property
    def history(self) -> list[dict]:
        return self.record["history"]

    @property
    def uniform_baseline(self) -> dict | None:
        return self.record.get("uniform_baseline")


def load_probe_prompts(ctx: RunContext, per_set: int) -> dict[str, list[str]]:
    from darwin_hydra.mri.probes import load_probe_prompts as _load

    prompts = _load(ctx.cfg.probes, resolve=ctx.resolve)
    return {k: list(v)[:per_set] for k, v in prompts.items()}


def storage_url(ctx: RunContext) -> tuple[str, float]:
    """The study storage and how long a RUNNING trial may be before it is called stale
    (``optimizer.stale_after_s``; null: every running trial in the default single-worker file, 3 h
    on a shared storage URL)."""
    opt = ctx.cfg.optimizer
    if opt.storage:
        return opt.storage, 3 * 3600.0 if opt.stale_after_s is None else opt.stale_after_s
    return f"sqlite:///{(ctx.run_dir / 'study.db').resolve()}", opt.stale_after_s or 0.0


def make_session(ctx: RunContext):
    from darwin_hydra.search.session import TrialSession

    return TrialSession(
        ctx.readers,
        ctx.breeding_plan(),
        dtype=ctx.torch_dtype(),
        device=ctx.cfg.device,
        trust_remote_code=ctx.cfg.parents.trust_remote_code,
    )


class SearchStage(Stage):
    name = "search"

    def __init__(self, optimizer, benchmark, probes):
        self.optimizer, self.benchmark, self.probes = optimizer, benchmark, probes

    def load(self, ctx: RunContext) -> SearchOutcome | None:
        """This run's finished search (``genome.json`` and ``search.json``), when the genome's hash still
        holds for these parents, prescription and settings."""
        import json

        gpath, spath = ctx.run_dir / "genome.json", ctx.run_dir / "search.json"
        if not (gpath.exists() and spath.exists()):
            return None
        genome = json.loads(gpath.read_text())
        plan = ctx.breeding_plan().for_genome(genome["genes"], str(gpath))
        if plan.hash(genome["genes"]) != genome.get("genome_hash"):
            log.warning("search: %s does not match these parents, prescription and settings; searching again", gpath)
            return None
        return SearchOutcome(genome, json.loads(spath.read_text()))

    def run(self, ctx: RunContext) -> SearchOutcome:
        from darwin_hydra.search.loop import search
        from darwin_hydra.search.proxy import TeacherKLProxy, logprobs

        opt = self.optimizer
        check_honest_split(self.benchmark)
        scan = ctx.require("scan")
        start = ctx.require("prescribe")
        space, x0 = start.space, start.start_genome
        session = ctx.trial_session()
        plan = session.plan

        # proxy teachers: the parents' outputs on the probe prompts, computed once
        prompts = load_probe_prompts(ctx, opt.proxy_prompts)

        def parent_logprobs(ratio):
            def fn(batch, keep=0):
                session.apply_uniform(ratio)
                return logprobs(session.model, batch, keep)

            return fn

        teacher_of = None
        if opt.proxy_teacher == "mri":
            owned = set(scan.prescription.mother_sets)
            teacher_of = {p: "mother" if p in owned else "father" for p in prompts}
        proxy = TeacherKLProxy(
            session.tokenizer, prompts, parent_logprobs(0.0), parent_logprobs(1.0), max_length=self.probes.max_length,
            teacher_of=teacher_of, answer_tokens=opt.proxy_answer_tokens,
        )

        def proxy_fitness(genes):
            session.apply_genome(genes)
            fault_point("trial")
            return proxy.score(session.model)

        include_path = ctx.resolve(self.benchmark.include_path)
        bench = benchmark_fitness(session.model, session.tokenizer, self.benchmark, include_path)
        bench_log: list[dict] = []

        def bench_fitness(genes):
            h = session.apply_genome(genes)
            fault_point("trial")
            res = bench()
            bench_log.append({"genome_hash": h, "mean": res.mean, "tasks": {t: r.accuracy for t, r in res.tasks.items()}})
            return res.mean

        def on_trial(rec):
            metrics = {"search/phase": rec["phase"], f"search/phase{rec['phase']}_value": rec["value"],
                       f"search/phase{rec['phase']}_best": rec["best"]}
            metrics.update({f"genes/{g}": v for g, v in rec["genes"].items()})
            ctx.tracker.log(metrics)

        storage, stale = storage_url(ctx)
        result = search(
            space,
            x0,
            proxy_fitness,
            bench_fitness if opt.phase2_trials > 0 else None,
            storage=storage,
            study_name=opt.study_name,
            seed=opt.seed,
            phase1_trials=opt.phase1_trials,
            phase2_top_k=opt.phase2_top_k,
            phase2_trials=opt.phase2_trials,
            patience=opt.patience,
            min_delta=opt.min_delta,
            popsize=opt.popsize,
            stale_after_s=stale,
            on_trial=on_trial,
        )
        best_hash = plan.hash(result.best_genes)
        genome = {
            "space": space.name,
            "genes": result.best_genes,
            "full_genome": space.full(result.best_genes),
            "genome_hash": best_hash,
            "fitness": result.best_value,
            "fitness_phase": result.best_phase,
            "start_genome": x0,
            "mri_seeded": start.mri_seeded,
            "parents": dict(plan.fingerprints),
            "transplant": [plan.t_lo, plan.t_hi],
            "router_source": list(plan.router_source) if plan.router_source else None,
            "revived_experts": {str(k): v for k, v in plan.revive.items()},
        }
        ctx.write_json("genome.json", genome)

        # the uniform-ratio baseline, searched with as many benchmark evaluations as phase 2 used
        baseline = None
        n_eval = result.benchmark_evaluations
        if n_eval > 0:
            grid = []
            for r in uniform_grid(n_eval):
                session.apply_uniform(r)
                grid.append({"ratio": r, "mean": bench().mean})
            best_u = max(grid, key=lambda g: g["mean"])
            baseline = {"evaluations": n_eval, "grid": grid, "best_ratio": best_u["ratio"], "best_dev": best_u["mean"]}

        history = [
            {"phase": h.phase, "trial": h.number, "value": h.value, "best": h.best_so_far, "genes": h.genes}
            for h in result.history
        ]
        record = {
            "history": history,
            "benchmark_log": bench_log,
            "benchmark_evaluations": n_eval,
            "stopped_early": result.stopped_early,
            "proxy_teachers": proxy.teacher_of,
            "uniform_baseline": baseline,
            "storage": storage if not storage.startswith("sqlite") else Path(storage[10:]).name,
        }
        ctx.write_json("search.json", record)
        genes_cols = list(space.genes)
        ctx.tracker.log_table(
            "search/genomes",
            ["phase", "trial", "value"] + genes_cols,
            [[h["phase"], h["trial"], h["value"]] + [h["genes"][g] for g in genes_cols] for h in history],
        )
        ctx.tracker.log_artifact(f"genome-{best_hash}", "genome", [ctx.run_dir / "genome.json"])
        ctx.tracker.log_summary({"search/best_fitness": result.best_value, "search/genome_hash": best_hash,
                                 "search/benchmark_evaluations": n_eval})
        log.info("search: best fitness %.4f (phase %d), genome_hash %s", result.best_value, result.best_phase, best_hash)
        return SearchOutcome(genome, record)
