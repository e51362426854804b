"""Search stage: MRI-seeded CMA-ES over the genome, phase 1 on the proxy, phase 2 on the benchmark
(dev split), then the uniform-ratio baseline with the same number of benchmark evaluations.
Writes ``genome.json`` (values + genome_hash) and ``search.json`` (history)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from darwin_hydra.pipeline import RunContext, Stage
from darwin_hydra.search.fitness import benchmark_fitness, check_honest_split, uniform_grid
from darwin_hydra.search.genome import GenomeSpace, fit_genome_to_prescription

log = logging.getLogger(__name__)


def load_probe_prompts(ctx: RunContext, per_set: int) -> dict[str, list[str]]:
    from darwin_hydra.mri.config import probes_config
    from darwin_hydra.mri.probes import load_probe_prompts as _load

    prompts = _load(probes_config(ctx.cfg.probes), resolve=ctx.resolve)
    return {k: list(v)[:per_set] for k, v in prompts.items()}


def storage_url(ctx: RunContext) -> tuple[str, float]:
    """The study storage and how long a RUNNING trial may be before it is called stale: every
    running trial is stale in the default single-worker file; 3 h on a shared storage URL."""
    if ctx.cfg.optimizer.storage:
        return str(ctx.cfg.optimizer.storage), 3 * 3600.0
    return f"sqlite:///{(ctx.run_dir / 'study.db').resolve()}", 0.0


def make_session(ctx: RunContext, space: GenomeSpace, r_mri, scan=None):
    from darwin_hydra.mri.config import mri_config
    from darwin_hydra.search.recipe import moe_rules
    from darwin_hydra.search.session import TrialSession

    mri = mri_config(ctx.cfg.mri)
    router_source, revive = moe_rules(ctx.cfg.genome, scan) if scan is not None else (None, {})
    return TrialSession(
        ctx.readers(),
        space,
        r_mri,
        mri.t_lo,
        mri.t_hi,
        dtype=ctx.torch_dtype(),
        device=str(ctx.cfg.device),
        trust_remote_code=bool(ctx.cfg.parents.trust_remote_code),
        router_source=router_source,
        revive=revive,
    )


class SearchStage(Stage):
    name = "search"

    def run(self, ctx: RunContext) -> None:
        from darwin_hydra.arch import num_layers
        from darwin_hydra.search.loop import search
        from darwin_hydra.search.proxy import TeacherKLProxy, logprobs
        from darwin_hydra.stages.scan import ensure_scan

        cfg, opt = ctx.cfg, ctx.cfg.optimizer
        if opt.proxy != "teacher_kl":
            raise ValueError(f"optimizer.proxy={opt.proxy!r}: the proxy implemented is 'teacher_kl'")
        if opt.proxy_teacher not in ("mri", "nll"):
            raise ValueError(f"optimizer.proxy_teacher={opt.proxy_teacher!r}: use 'mri' or 'nll'")
        if int(opt.proxy_answer_tokens) < 0:
            raise ValueError(f"optimizer.proxy_answer_tokens={opt.proxy_answer_tokens}: use 0 (prompt tokens) or more")
        check_honest_split(cfg.benchmark)
        scan = ensure_scan(ctx)
        father = ctx.readers()["father"]
        L = num_layers(father.config)
        space = GenomeSpace.from_config(cfg.genome, L)
        r_mri = dict(scan.r_mri)
        x0 = fit_genome_to_prescription(space, r_mri, L) if opt.mri_seeded else space.centre()
        session = make_session(ctx, space, r_mri, scan)

        # proxy teachers: the parents' outputs on the probe prompts, computed once
        prompts = load_probe_prompts(ctx, int(opt.proxy_prompts))

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
            session.tokenizer, prompts, parent_logprobs(0.0), parent_logprobs(1.0), max_length=int(cfg.probes.max_length),
            teacher_of=teacher_of, answer_tokens=int(opt.proxy_answer_tokens),
        )

        def proxy_fitness(genes):
            session.apply_genome(genes)
            return proxy.score(session.model)

        include_path = ctx.resolve(str(cfg.benchmark.include_path))
        bench = benchmark_fitness(session.model, session.tokenizer, cfg.benchmark, include_path)
        bench_log: list[dict] = []

        def bench_fitness(genes):
            h = session.apply_genome(genes)
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
            study_name=str(opt.study_name),
            seed=int(opt.seed),
            phase1_trials=int(opt.phase1_trials),
            phase2_top_k=int(opt.phase2_top_k),
            phase2_trials=int(opt.phase2_trials),
            patience=int(opt.patience),
            min_delta=float(opt.min_delta),
            popsize=opt.popsize,
            stale_after_s=stale,
            on_trial=on_trial,
        )
        best_hash = session.genome_hash(result.best_genes)
        genome = {
            "space": space.name,
            "genes": result.best_genes,
            "full_genome": space.full(result.best_genes),
            "genome_hash": best_hash,
            "fitness": result.best_value,
            "fitness_phase": result.best_phase,
            "start_genome": x0,
            "mri_seeded": bool(opt.mri_seeded),
            "parents": session.fingerprints,
            "transplant": [session.t_lo, session.t_hi],
            "router_source": session.router_source,
            "revived_experts": {str(k): v for k, v in session.revive.items()},
        }
        ctx.write_json("genome.json", genome)
        ctx.artifacts["genome"] = genome
        ctx.artifacts["session"] = session

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
            ctx.artifacts["uniform_baseline"] = baseline

        history = [
            {"phase": h.phase, "trial": h.number, "value": h.value, "best": h.best_so_far, "genes": h.genes}
            for h in result.history
        ]
        ctx.write_json(
            "search.json",
            {
                "history": history,
                "benchmark_log": bench_log,
                "benchmark_evaluations": n_eval,
                "stopped_early": result.stopped_early,
                "proxy_teachers": proxy.teacher_of,
                "uniform_baseline": baseline,
                "storage": storage if not storage.startswith("sqlite") else Path(storage[10:]).name,
            },
        )
        ctx.artifacts["search_history"] = history
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
        log.info("search config: %s", OmegaConf.to_container(opt, resolve=True))
