"""Search stage: CMA-ES over the genome from the prescribe stage's start, phase 1 on the proxy, phase 2
on the benchmark (dev split), then the uniform-ratio baseline with the same number of benchmark
evaluations. Writes ``genome.json`` (values + genome_hash) and ``search.json`` (history).

With ``optimizer.storage`` a database URL the stage is the coordinator of a distributed search
(``search/distributed.py``): workers started on the same run directory (``darwin-hydra-worker
RUN_DIR``, which calls ``SearchStage.work``) run trials of the same study beside it, and the stage
reads the finished study into the same two files."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    """The study storage and when a RUNNING trial is called stale (``optimizer.stale_after_s``; null:
    every running trial in the default single-process file, re-run in place; 4 heartbeats on a
    storage URL, where the time since its last heartbeat counts)."""
    opt = ctx.cfg.optimizer
    if opt.storage:
        return opt.storage, 4 * opt.heartbeat_s if opt.stale_after_s is None else opt.stale_after_s
    return f"sqlite:///{(ctx.run_dir / 'study.db').resolve()}", opt.stale_after_s or 0.0


def shown_storage(storage: str) -> str:
    """The storage as search.json records it: the file name of the run's own SQLite file, a URL without
    its password."""
    if storage.startswith("sqlite"):
        return Path(storage[10:]).name
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def process_name(role: str) -> str:
    """``role@host:pid``: who ran a trial, in the study's trial attributes."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def make_session(ctx: RunContext):
    from darwin_hydra.search.session import TrialSession

    return TrialSession(
        ctx.readers,
        ctx.breeding_plan(),
        dtype=ctx.torch_dtype(),
        device=ctx.cfg.device,
        trust_remote_code=ctx.cfg.parents.trust_remote_code,
        memory=ctx.cfg.memory,
    )


@dataclass
class TrialFitness:
    """What one process scores trials with: its trial session, the proxy (phase 1) and the benchmark
    (phase 2 and the uniform baseline). ``bench_log``: this process's benchmark runs, in order."""

    session: Any
    proxy: Any  # TeacherKLProxy
    bench: Callable[[], Any]
    bench_log: list[dict] = field(default_factory=list)

    def proxy_fitness(self, genes: dict[str, float]) -> float:
        self.session.apply_genome(genes)
        fault_point("trial")
        return self.proxy.score(self.session.model)

    def bench_fitness(self, genes: dict[str, float]) -> float:
        h = self.session.apply_genome(genes)
        fault_point("trial")
        res = self.bench()
        # the proxy of every benchmarked genome: how well phase 1's ranking predicts phase 2's (search.json)
        self.bench_log.append({"genome_hash": h, "mean": res.mean, "proxy": self.proxy.score(self.session.model),
                               "tasks": {t: r.accuracy for t, r in res.tasks.items()}})
        return res.mean

    def candidate(self, name: str, apply: Callable[[], None]) -> dict:
        """A child candidate that is not a searched genome, merged by ``apply`` and scored on the benchmark
        (dev) and the proxy."""
        apply()
        res = self.bench()
        return {"candidate": name, "mean": res.mean, "proxy": self.proxy.score(self.session.model),
                "tasks": {t: r.accuracy for t, r in res.tasks.items()}}

    def scored_bench_fitness(self, genes: dict[str, float]) -> tuple[float, dict]:
        """The benchmark value and its log entry, stored with the trial (a shared study's reader needs it)."""
        from darwin_hydra.search.distributed import BENCHMARK

        value = self.bench_fitness(genes)
        return value, {BENCHMARK: self.bench_log[-1]}


def dev_candidates(kinds, result, genome_hash: str, best_uniform: dict, fit: "TrialFitness", plan,
                   bench_log: list[dict]) -> dict:
    """The child's candidates, each scored on the dev split, and the one chosen: the search's best genome
    (the best phase-2 value), the MRI's own child (one more benchmark evaluation) and the best uniform
    ratio of the baseline, as ``optimizer.child_candidates`` lists them. The highest dev score wins; a tie
    goes to the simpler kind (uniform, then mri, then genome). So the child is never below the uniform
    baseline on dev."""
    from darwin_hydra.search.fitness import choose_child

    rows = []
    for kind in [str(k) for k in kinds]:
        if kind == "genome":
            n2 = sum(1 for h in result.history if h.phase == 2)
            proxy = next((e.get("proxy") for e in bench_log if e.get("genome_hash") == genome_hash), None)
            rows.append({"kind": "genome", "dev": result.best_value, "proxy": proxy, "genome_hash": genome_hash,
                         "how": f"the best of {n2} genome(s) CMA-ES scored on dev (phase 2)"})
        elif kind == "mri":
            scored = fit.candidate("mri", fit.session.apply_mri_only)
            rows.append({"kind": "mri", "dev": scored["mean"], "proxy": scored["proxy"], "tasks": scored["tasks"],
                         "genome_hash": plan.candidate_hash("mri"),
                         "how": "the MRI's ratios r_mri(T) and transplants alone, no genome (one evaluation)"})
        elif kind == "uniform":
            r = best_uniform["ratio"]
            rows.append({"kind": "uniform", "ratio": r, "dev": best_uniform["mean"], "proxy": best_uniform["proxy"],
                         "genome_hash": plan.candidate_hash("uniform", r),
                         "how": f"the best of the uniform baseline's ratios (r = {r:.4f})"})
    chosen = choose_child(rows)
    return {"rows": rows, "chosen": chosen,
            "rule": "the highest dev score; a tie goes to the simpler kind (uniform, then mri, then genome)"}


def proxy_vs_dev(bench_log: list[dict], baseline: dict | None, candidates: dict | None) -> dict | None:
    """Spearman's rank correlation of the proxy (phase 1's fitness) with the dev score over every model
    scored on both: phase 2's genomes, the uniform grid, the MRI-only child."""
    pairs = [(e["proxy"], e["mean"]) for e in bench_log if e.get("proxy") is not None]
    pairs += [(g["proxy"], g["mean"]) for g in (baseline or {}).get("grid", []) if g.get("proxy") is not None]
    pairs += [(c["proxy"], c["dev"]) for c in (candidates or {}).get("rows", [])
              if c["kind"] == "mri" and c.get("proxy") is not None]
    if len(pairs) < 3:
        return None
    proxies, devs = [p for p, _ in pairs], [d for _, d in pairs]
    if len(set(proxies)) < 2 or len(set(devs)) < 2:  # a constant column has no ranks to correlate
        return {"spearman": None, "n": len(pairs)}
    from scipy.stats import spearmanr

    return {"spearman": float(spearmanr(proxies, devs).statistic), "n": len(pairs)}


def shared_search(opt, storage: str, stale_after_s: float, n_genes: int):
    """The rules of a distributed search (``optimizer.storage`` a URL) from the optimizer's config."""
    from darwin_hydra.search.distributed import SharedSearch, population_size

    return SharedSearch(
        storage=storage, study_name=opt.study_name, seed=opt.seed, phase1_trials=opt.phase1_trials,
        phase2_top_k=opt.phase2_top_k, phase2_trials=opt.phase2_trials, patience=opt.patience,
        min_delta=opt.min_delta, popsize=population_size(opt.popsize, opt.workers, n_genes),
        heartbeat_s=opt.heartbeat_s, stale_after_s=stale_after_s, uniform_seeds=opt.uniform_seeds,
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
        ctx.breeding_plan().for_genome(genome["genes"], str(gpath))  # says when it predates a gene
        if ctx.breeding_plan().child(genome)[1] != genome.get("genome_hash"):
            log.warning("search: %s does not match these parents, prescription and settings; searching again", gpath)
            return None
        return SearchOutcome(genome, json.loads(spath.read_text()))

    def trial_fitness(self, ctx: RunContext) -> TrialFitness:
        """This process's trial session, proxy (its teachers' answers computed once) and benchmark."""
        from darwin_hydra.search.proxy import TeacherKLProxy, logprobs

        opt = self.optimizer
        scan = ctx.require("scan")
        session = ctx.trial_session()

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
        include_path = ctx.resolve(self.benchmark.include_path)
        bench = benchmark_fitness(session.model, session.tokenizer, self.benchmark, include_path)
        return TrialFitness(session, proxy, bench)

    @staticmethod
    def _tracked(ctx: RunContext):
        def on_trial(rec):
            metrics = {"search/phase": rec["phase"], f"search/phase{rec['phase']}_value": rec["value"],
                       f"search/phase{rec['phase']}_best": rec["best"]}
            metrics.update({f"genes/{g}": v for g, v in rec["genes"].items()})
            ctx.tracker.log(metrics)

        return on_trial

    def work(self, ctx: RunContext, worker: str, wait_s: float = 3600.0) -> int:
        """A worker's part of this run's distributed search: trials of the shared study, phase by phase as
        the coordinator starts them, until the study's budgets are met. Returns the trials it told."""
        from darwin_hydra.search.distributed import join

        check_honest_split(self.benchmark)
        start = ctx.require("prescribe")
        fit = self.trial_fitness(ctx)
        bench = fit.scored_bench_fitness if self.optimizer.phase2_trials > 0 else None
        rules = shared_search(self.optimizer, *storage_url(ctx), len(start.space.genes))
        return join(rules, start.space, start.start_genome, fit.proxy_fitness, bench, worker=worker,
                    on_trial=self._tracked(ctx), wait_s=wait_s)

    def run(self, ctx: RunContext) -> SearchOutcome:
        from darwin_hydra.search.loop import search

        opt = self.optimizer
        check_honest_split(self.benchmark)
        ctx.require("scan")
        start = ctx.require("prescribe")
        space, x0 = start.space, start.start_genome
        fit = self.trial_fitness(ctx)
        session, proxy, bench = fit.session, fit.proxy, fit.bench
        plan = session.plan
        on_trial = self._tracked(ctx)

        storage, stale = storage_url(ctx)
        if opt.storage:  # the coordinator of a distributed search
            from darwin_hydra.search.distributed import BENCHMARK, coordinate

            result = coordinate(
                shared_search(opt, storage, stale, len(space.genes)), space, x0, fit.proxy_fitness,
                fit.scored_bench_fitness if opt.phase2_trials > 0 else None,
                worker=process_name("coordinator"), run_trials=opt.coordinator_trials, on_trial=on_trial,
            )
            bench_log = [h.attrs[BENCHMARK] for h in result.history if h.phase == 2]
        else:
            result = search(
                space,
                x0,
                fit.proxy_fitness,
                fit.scored_bench_fitness if opt.phase2_trials > 0 else None,
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
                uniform_seeds=opt.uniform_seeds,
            )
            from darwin_hydra.search.distributed import BENCHMARK

            # stored with each trial, so a resumed search has the log of trials run before the kill too
            bench_log = [h.attrs[BENCHMARK] for h in result.history if h.phase == 2 and BENCHMARK in h.attrs]
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

        # the uniform-ratio baseline, searched with as many benchmark evaluations as phase 2 used
        baseline, candidates = None, None
        n_eval = result.benchmark_evaluations
        if n_eval > 0:
            grid = [fit.candidate(f"uniform r={r:.4f}", lambda r=r: session.apply_uniform(r)) | {"ratio": r}
                    for r in uniform_grid(n_eval)]
            best_u = max(grid, key=lambda g: g["mean"])
            baseline = {"evaluations": n_eval, "grid": grid, "best_ratio": best_u["ratio"], "best_dev": best_u["mean"]}
            candidates = dev_candidates(opt.child_candidates, result, best_hash, best_u, fit, plan, bench_log)
            chosen = candidates["chosen"]
            if chosen["kind"] != "genome":
                genome["child"] = {"kind": chosen["kind"], **({"ratio": chosen["ratio"]} if "ratio" in chosen else {})}
                genome["genome_hash"] = chosen["genome_hash"]
                log.info("search: the %s candidate scored best on dev (%.4f, the search's best genome %.4f): it is "
                         "the child", chosen["kind"], chosen["dev"], result.best_value)
        ctx.write_json("genome.json", genome)
        best_hash = genome["genome_hash"]

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
            "candidates": candidates,
            "proxy_vs_dev": proxy_vs_dev(bench_log, baseline, candidates),
            "storage": shown_storage(storage),
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
        log.info("search: best fitness %.4f (phase %d), child genome_hash %s", result.best_value, result.best_phase,
                 best_hash)
        return SearchOutcome(genome, record)
