"""The two-phase CMA-ES search, driven by Optuna ask/tell.

Phase 1 runs many cheap trials on a proxy fitness; phase 2 scores the best phase-1 genomes and
further CMA-ES steps (warm-started from phase 1) on the benchmark, with early stopping.

Both phases live in one Optuna storage (two studies, ``<name>-phase1`` / ``<name>-phase2``), a
SQLite file in the run directory by default. Started again on the same storage, the search keeps
every finished trial and continues the budget where it stopped:

- in the run's own file (one worker at a time, ``stale_after_s <= 0``) a trial left RUNNING by a dead
  process is re-run under its own number, with its own parameters, before any new trial is asked;
- given ``stale_after_s > 0``, a trial RUNNING longer than that is marked FAIL and its parameters
  enqueued again. (Many processes on one study: ``search/distributed.py``, with heartbeats.)

Every ask uses a fresh ``CmaEsSampler`` (seeded, its state restored from the study by Optuna), so a
trial's parameters depend on the study's history and the trial's number only, not on what the
asking process did before: a search killed at any point and resumed gives the trials, and the
genome, of a search never killed.

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

from darwin_hydra.search.genome import GenomeSpace, from_unit, phase1_seeds, to_unit

log = logging.getLogger(__name__)

# a genome's value, or (value, attributes stored with its trial)
Fitness = Callable[[dict[str, float]], "float | tuple[float, dict[str, Any]]"]
TrialCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrialRecord:
    phase: int
    number: int
    genes: dict[str, float]
    value: float
    best_so_far: float
    attrs: dict[str, Any] = field(default_factory=dict)  # what the trial's process stored with it (user attrs)


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


@dataclass
class StudyHandle:
    """A study, its storage object and how to make its sampler (a fresh one for every ask)."""

    study: optuna.Study
    storage: Any
    new_sampler: Callable[[], optuna.samplers.BaseSampler]

    def ask(self) -> optuna.Trial:
        self.study.sampler = self.new_sampler()  # parameters = f(study history, trial number)
        return self.study.ask()

    def reopen(self, number: int) -> optuna.Trial:
        """The RUNNING trial ``number`` as a live trial again (its suggested parameters kept)."""
        self.study.sampler = self.new_sampler()
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        return optuna.trial.Trial(self.study, self.storage.get_trial_id_from_study_id_trial_number(study_id, number))


def _recover_stale(handle: StudyHandle, stale_after_s: float) -> list[int]:
    """Trials left RUNNING by a dead process.

    ``stale_after_s <= 0`` (one worker: the run's own file): every RUNNING trial is the dead process's;
    their numbers are returned, to be re-run in place. Otherwise trials RUNNING for longer than
    ``stale_after_s`` are marked FAIL and their parameters enqueued again (``rerun_of``).
    """
    study = handle.study
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if stale_after_s <= 0:
        if running:
            log.info("study %s: re-running %d trial(s) left running by a dead process: %s", study.study_name,
                     len(running), [t.number for t in running])
        return sorted(t.number for t in running)
    now = datetime.now()
    n = 0
    for t in running:
        if t.datetime_start and now - t.datetime_start < timedelta(seconds=stale_after_s):
            continue
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"rerun_of": t.number})
        n += 1
    if n:
        log.info("study %s: %d trial(s) left running by a dead process re-enqueued", study.study_name, n)
    return []


def suggest_genes(trial: optuna.Trial, space: GenomeSpace, x0: Mapping[str, float]) -> dict[str, float]:
    """The trial's genome: one centred coordinate u in [-1, 1] per gene (``u_<gene>``), mapped to its value."""
    return from_unit({g: trial.suggest_float(f"u_{g}", -1.0, 1.0) for g in space.genes}, x0, space)


def unit_params(u: Mapping[str, float]) -> dict[str, float]:
    """Optuna parameters (``u_<gene>``) of centred coordinates, as ``enqueue_trial`` takes them."""
    return {f"u_{g}": float(v) for g, v in u.items()}


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def trial_genes(t: optuna.trial.FrozenTrial, space: GenomeSpace, x0: Mapping[str, float], study_name: str):
    """A finished trial's genome; a ValueError naming the genes it lacks when it was run in another space."""
    missing = [g for g in space.genes if f"u_{g}" not in t.params]
    if missing:
        raise ValueError(
            f"study {study_name!r}: trial {t.number} has no value for gene(s) {missing}: it was run in "
            "another genome space (e.g. before genome.revive_dead_experts added revive_gain); resume with that "
            "space (+genome.fixed.revive_gain=0 keeps the old one) or start a new study (optimizer.study_name)"
        )
    return from_unit({g: t.params[f"u_{g}"] for g in space.genes}, x0, space)


@dataclass
class Progress:
    """The early-stopping rule of phase 2, fed one trial value at a time in trial order: a value counts as
    an improvement when it beats the best so far by more than ``min_delta``; the phase stops once
    ``patience`` trials in a row were not improvements."""

    min_delta: float = 0.0
    best: float = float("-inf")
    since_best: int = 0

    def add(self, value: float) -> None:
        if value > self.best + self.min_delta:
            self.since_best = 0
        else:
            self.since_best += 1
        self.best = max(self.best, value)

    def exhausted(self, patience: int | None) -> bool:
        return patience is not None and self.since_best >= patience


def run_phase(
    handle: StudyHandle,
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
    reopen: list[int] | None = None,
) -> list[TrialRecord]:
    """Ask/tell until ``n_trials`` trials of this study are complete (finished ones count), or until
    ``patience`` trials in a row fail to improve the best value by more than ``min_delta``.
    ``reopen``: numbers of trials a dead process left RUNNING, re-run first under their own numbers."""
    from tqdm.auto import tqdm

    study = handle.study
    reopen = list(reopen or [])
    history: list[TrialRecord] = []
    progress = Progress(min_delta)
    for t in sorted(complete_trials(study), key=lambda t: t.number):  # replay finished trials (resume)
        genes = trial_genes(t, space, x0, study.study_name)
        progress.add(t.value)
        history.append(TrialRecord(phase, t.number, genes, float(t.value), progress.best, dict(t.user_attrs)))
    done = len(history)
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=progress_desc, leave=False)
    try:
        while done < n_trials:
            if progress.exhausted(patience):
                log.info("phase %d: early stop after %d trials without improvement > %g", phase, progress.since_best,
                         min_delta)
                break
            trial = handle.reopen(reopen.pop(0)) if reopen else handle.ask()
            genes = suggest_genes(trial, space, x0)
            value, attrs = fitness(genes), {}
            if isinstance(value, tuple):  # (value, what to store with the trial): kept across a resume
                value, attrs = value
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
            value = float(value)
            study.tell(trial, value)
            progress.add(value)
            best = progress.best
            rec = TrialRecord(phase, trial.number, genes, value, best, dict(attrs))
            history.append(rec)
            done += 1
            bar.update(1)
            bar.set_postfix(best=f"{best:.4f}")
            if on_trial is not None:
                on_trial({"phase": phase, "trial": trial.number, "value": value, "best": best, "genes": genes})
    finally:
        bar.close()
    return history


def make_study(storage: str, name: str, seed: int, popsize: int | None, source_trials=None) -> StudyHandle:
    _quiet_optuna()
    rdb = optuna.storages.RDBStorage(storage) if isinstance(storage, str) else storage

    def new_sampler() -> optuna.samplers.BaseSampler:
        return optuna.samplers.CmaEsSampler(
            seed=seed, popsize=popsize, source_trials=source_trials, warn_independent_sampling=False
        )

    study = optuna.create_study(
        storage=rdb, study_name=name, direction="maximize", sampler=new_sampler(), load_if_exists=True
    )
    return StudyHandle(study, rdb, new_sampler)


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
    uniform_seeds: int = 0,
) -> SearchResult:
    """Run (or resume) both phases and return the best genome (phase 2's when it ran). Phase 1 starts
    with ``phase1_seeds``: the start genome, then ``uniform_seeds`` uniform-merge genomes."""
    h1 = make_study(storage, f"{study_name}-phase1", seed, popsize)
    reopen1 = _recover_stale(h1, stale_after_s)
    if not h1.study.get_trials(deepcopy=False):
        for genes, attrs in phase1_seeds(space, x0, min(uniform_seeds, phase1_trials - 1)):
            h1.study.enqueue_trial(unit_params(to_unit(genes, x0, space)), user_attrs=attrs)
    hist1 = run_phase(h1, space, x0, proxy, phase1_trials, 1, on_trial=on_trial, progress_desc="phase 1 (proxy)",
                      reopen=reopen1)
    best1 = max(hist1, key=lambda r: r.value)
    result = SearchResult(best1.genes, best1.value, 1, list(hist1))
    if benchmark is None or phase2_trials <= 0:
        return result

    done1 = sorted(complete_trials(h1.study), key=lambda t: (-t.value, t.number))
    # warm-start phase 2's CMA-ES from phase 1's distribution (cmaes needs >= 10 source solutions)
    source = done1 if len(done1) >= 10 else None
    h2 = make_study(storage, f"{study_name}-phase2", seed + 1, popsize, source_trials=source)
    reopen2 = _recover_stale(h2, stale_after_s)
    if not h2.study.get_trials(deepcopy=False):
        for t in done1[:phase2_top_k]:
            h2.study.enqueue_trial(dict(t.params), user_attrs={"from_phase1": t.number})
    hist2 = run_phase(
        h2,
        space,
        x0,
        benchmark,
        phase2_trials,
        2,
        patience=patience,
        min_delta=min_delta,
        on_trial=on_trial,
        progress_desc="phase 2 (benchmark)",
        reopen=reopen2,
    )
    best2 = max(hist2, key=lambda r: r.value)
    result = SearchResult(best2.genes, best2.value, 2, list(hist1) + list(hist2))
    result.benchmark_evaluations = len(hist2)
    result.stopped_early = len(hist2) < phase2_trials
    return result
