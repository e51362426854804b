"""The two-phase CMA-ES search, driven by Optuna ask/tell.

Phase 1 runs many cheap trials on a proxy fitness; phase 2 scores the best phase-1 genomes and
further CMA-ES steps (warm-started from phase 1) on the benchmark, with early stopping.

Both phases live in one Optuna storage (two studies, ``<name>-phase1`` / ``<name>-phase2``), a
SQLite file in the run directory by default. Started again on the same storage, the search keeps
every finished trial, re-runs the genome of a trial that was running when the process died (it is
marked FAIL and its parameters enqueued again), and continues the budget where it stopped.

CMA-ES works in centred coordinates (``genome.to_unit``): u = 0 is the starting genome (the MRI
prescription, or the centre of the bounds), so Optuna's deprecated x0 is not needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState

from darwin_hydra.search.genome import GenomeSpace, from_unit, to_unit

log = logging.getLogger(__name__)

Fitness = Callable[[dict[str, float]], float]
TrialCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrialRecord:
    phase: int
    number: int
    genes: dict[str, float]
    value: float
    best_so_far: float


@dataclass
class SearchResult:
    best_genes: dict[str, float]
    best_value: float
    best_phase: int
    history: list[TrialRecord] = field(default_factory=list)
    benchmark_evaluations: int = 0
    stopped_early: bool = False


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _recover_stale(study: optuna.Study, stale_after_s: float) -> int:
    """Mark trials left RUNNING by a dead process as FAIL and enqueue their parameters again.

    ``stale_after_s <= 0`` treats every RUNNING trial as stale (one worker: the default file storage).
    """
    now = datetime.now()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if stale_after_s > 0 and t.datetime_start and now - t.datetime_start < timedelta(seconds=stale_after_s):
            continue
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"rerun_of": t.number})
        n += 1
    if n:
        log.info("study %s: %d trial(s) left running by a dead process re-enqueued", study.study_name, n)
    return n


def _suggest(trial: optuna.Trial, space: GenomeSpace) -> dict[str, float]:
    return {g: trial.suggest_float(f"u_{g}", -1.0, 1.0) for g in space.genes}


def _unit_params(u: Mapping[str, float]) -> dict[str, float]:
    return {f"u_{g}": float(v) for g, v in u.items()}


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_phase(
    study: optuna.Study,
    space: GenomeSpace,
    x0: Mapping[str, float],
    fitness: Fitness,
    n_trials: int,
    phase: int,
    *,
    patience: int | None = None,
    min_delta: float = 0.0,
    on_trial: TrialCallback | None = None,
    progress_desc: str = "search",
) -> list[TrialRecord]:
    """Ask/tell until ``n_trials`` trials of this study are complete (finished ones count), or until
    ``patience`` trials in a row fail to improve the best value by more than ``min_delta``."""
    from tqdm.auto import tqdm

    history: list[TrialRecord] = []
    best = float("-inf")
    since_best = 0
    for t in sorted(_complete(study), key=lambda t: t.number):  # replay finished trials (resume)
        missing = [g for g in space.genes if f"u_{g}" not in t.params]
        if missing:
            raise ValueError(
                f"study {study.study_name!r}: trial {t.number} has no value for gene(s) {missing}: it was run in "
                "another genome space (e.g. before genome.revive_dead_experts added revive_gain); resume with that "
                "space (+genome.fixed.revive_gain=0 keeps the old one) or start a new study (optimizer.study_name)"
            )
        genes = from_unit({g: t.params[f"u_{g}"] for g in space.genes}, x0, space)
        if t.value > best + min_delta:
            best, since_best = t.value, 0
        else:
            since_best += 1
        best = max(best, t.value)
        history.append(TrialRecord(phase, t.number, genes, float(t.value), best))
    done = len(history)
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=progress_desc, leave=False)
    try:
        while done < n_trials:
            if patience is not None and since_best >= patience:
                log.info("phase %d: early stop after %d trials without improvement > %g", phase, since_best, min_delta)
                break
            trial = study.ask()
            genes = from_unit(_suggest(trial, space), x0, space)
            value = float(fitness(genes))
            study.tell(trial, value)
            if value > best + min_delta:
                since_best = 0
            else:
                since_best += 1
            best = max(best, value)
            rec = TrialRecord(phase, trial.number, genes, value, best)
            history.append(rec)
            done += 1
            bar.update(1)
            bar.set_postfix(best=f"{best:.4f}")
            if on_trial is not None:
                on_trial({"phase": phase, "trial": trial.number, "value": value, "best": best, "genes": genes})
    finally:
        bar.close()
    return history


def make_study(storage: str, name: str, seed: int, popsize: int | None, source_trials=None) -> optuna.Study:
    _quiet_optuna()
    sampler = optuna.samplers.CmaEsSampler(
        seed=seed, popsize=popsize, source_trials=source_trials, warn_independent_sampling=False
    )
    return optuna.create_study(
        storage=storage, study_name=name, direction="maximize", sampler=sampler, load_if_exists=True
    )


def search(
    space: GenomeSpace,
    x0: Mapping[str, float],
    proxy: Fitness,
    benchmark: Fitness | None,
    *,
    storage: str,
    study_name: str,
    seed: int,
    phase1_trials: int,
    phase2_top_k: int,
    phase2_trials: int,
    patience: int,
    min_delta: float,
    popsize: int | None = None,
    stale_after_s: float = 0.0,
    on_trial: TrialCallback | None = None,
) -> SearchResult:
    """Run (or resume) both phases and return the best genome (phase 2's when it ran)."""
    study1 = make_study(storage, f"{study_name}-phase1", seed, popsize)
    _recover_stale(study1, stale_after_s)
    if not study1.get_trials(deepcopy=False):
        study1.enqueue_trial(_unit_params(to_unit(x0, x0, space)), user_attrs={"start": True})
    hist1 = run_phase(study1, space, x0, proxy, phase1_trials, 1, on_trial=on_trial, progress_desc="phase 1 (proxy)")
    best1 = max(hist1, key=lambda r: r.value)
    result = SearchResult(best1.genes, best1.value, 1, list(hist1))
    if benchmark is None or phase2_trials <= 0:
        return result

    done1 = sorted(_complete(study1), key=lambda t: t.value, reverse=True)
    # warm-start phase 2's CMA-ES from phase 1's distribution (cmaes needs >= 10 source solutions)
    source = done1 if len(done1) >= 10 else None
    study2 = make_study(storage, f"{study_name}-phase2", seed + 1, popsize, source_trials=source)
    _recover_stale(study2, stale_after_s)
    if not study2.get_trials(deepcopy=False):
        for t in done1[:phase2_top_k]:
            study2.enqueue_trial(dict(t.params), user_attrs={"from_phase1": t.number})
    hist2 = run_phase(
        study2,
        space,
        x0,
        benchmark,
        phase2_trials,
        2,
        patience=patience,
        min_delta=min_delta,
        on_trial=on_trial,
        progress_desc="phase 2 (benchmark)",
    )
    best2 = max(hist2, key=lambda r: r.value)
    result = SearchResult(best2.genes, best2.value, 2, list(hist1) + list(hist2))
    result.benchmark_evaluations = len(hist2)
    result.stopped_early = len(hist2) < phase2_trials
    return result
