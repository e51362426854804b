"""The search shared by many processes: one Optuna study in a database server, trials run by workers.

One run = one coordinator + N workers (docs/distributed.md). The coordinator (the search stage of
``darwin-hydra ... optimizer.storage=URL``) starts each phase, runs trials too unless told not to, and
reads the study into the ``SearchResult`` the single-process search returns; workers
(``darwin-hydra-worker RUN_DIR``) run trials until the study's budgets are met. Whatever decides the
search lives in the study, so that any process may die and any may join:

- **budget**: a phase is complete when its study holds ``n_trials`` COMPLETE trials. A process asks a
  trial only to take a queued one or while COMPLETE + RUNNING < ``n_trials``, and checks again after
  asking and before telling: a trial outranked by ``n_trials`` others (COMPLETE first, then re-runs of
  dead workers' trials, then by number) is withdrawn (FAIL, user attr ``withdrawn``), so asks that
  race never run one trial too many;
- **phases**: phase 2 starts once phase 1 is complete. Only the coordinator seeds a phase (the start
  genome; the top-k of phase 1) and then marks the study ``seeded``; workers wait for the mark;
- **CMA-ES**: every ask uses a fresh seeded sampler that restores CMA-ES from the study, so one
  generation spans all workers (its population is at least ``optimizer.workers``);
- **early stopping**: the single-process rule (``loop.Progress``) over the phase-2 trials in number
  order, taken on the settled ones (those before the first unfinished trial), so every process finds
  the same cut; the first to find it records it in the study (``early_stop``), later trials are
  withdrawn;
- **dead workers**: a process records a heartbeat of its running trial from a thread every
  ``heartbeat_s``; any process fails trials whose last heartbeat (the database's clock) is older than
  ``stale_after_s`` (Optuna's ``fail_stale_trials``: one process wins each FAIL) and queues their
  parameters again (user attr ``rerun_of``), so another worker runs them (``search/liveness.py``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from darwin_hydra.search.genome import GenomeSpace, phase1_seeds, to_unit
from darwin_hydra.search.liveness import (
    RERUN_OF,
    WORKER,
    Heartbeat,
    StaleTrials,
    give_back,
    open_storage,
)
from darwin_hydra.search.loop import (
    Progress,
    SearchResult,
    StudyHandle,
    TrialCallback,
    TrialRecord,
    make_study,
    suggest_genes,
    trial_genes,
    unit_params,
)

log = logging.getLogger(__name__)

# study and trial attributes the processes of one search read and write
SEEDED = "seeded"  # study: the coordinator has queued the phase's seed trials
EARLY_STOP = "early_stop"  # study (phase 2): {"trials": n, "last_trial": number}, where the rule stopped
WITHDRAWN = "withdrawn"  # trial (FAIL): why it did not count (the budget was met by others)
BENCHMARK = "benchmark"  # trial (phase 2): genome_hash, mean and per-task scores of its benchmark run

# a fitness returns the value, or the value and what to store with the trial (user attrs)
SharedFitness = Callable[[dict[str, float]], "float | tuple[float, dict[str, Any]]"]


@dataclass(frozen=True)
class SharedSearch:
    """One search on a shared storage: where its study lives and the rules every process follows."""

    storage: str  # an Optuna RDB URL
    study_name: str
    seed: int
    phase1_trials: int
    phase2_top_k: int
    phase2_trials: int
    patience: int
    min_delta: float
    popsize: int | None
    heartbeat_s: float
    stale_after_s: float
    uniform_seeds: int = 0  # phase 1's uniform-merge seeds after the start genome (genome.phase1_seeds)

    @property
    def poll_s(self) -> float:
        """How often an idle process looks at the study again (waiting for a phase, or for others' trials)."""
        return min(1.0, self.heartbeat_s)


def population_size(popsize: int | None, workers: int, n_genes: int) -> int | None:
    """CMA-ES's population for ``workers`` processes: ``popsize`` (None: CMA-ES's own default,
    4 + floor(3 ln n_genes)), raised to ``workers`` so that one generation spans every worker."""
    default = 4 + math.floor(3 * math.log(max(n_genes, 1)))
    return popsize if (popsize or default) >= workers else workers


def settled_values(trials: list[FrozenTrial]) -> list[float]:
    """The values of the COMPLETE trials in number order, up to the first unfinished one (FAIL trials,
    withdrawn or lost, are skipped): the part of the history no later event can change."""
    values = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            break
        if t.state == TrialState.COMPLETE:
            values.append(float(t.value))
    return values


def early_stop_cut(values: list[float], patience: int, min_delta: float, n_trials: int) -> int | None:
    """How many trials a single-process phase with these values (in trial order) runs before its
    early stop (``loop.run_phase``), or None when the rule does not fire within these values and
    ``n_trials``."""
    progress = Progress(min_delta)
    for i, value in enumerate(values):
        if i >= n_trials:
            return None
        if progress.exhausted(patience):
            return i
        progress.add(value)
    return len(values) if len(values) < n_trials and progress.exhausted(patience) else None


def _rank(t: FrozenTrial) -> tuple[bool, bool, int]:
    """Who keeps a place in the budget first: finished trials, then re-runs of dead workers' trials
    (their place was taken before), then by number."""
    return (t.state != TrialState.COMPLETE, RERUN_OF not in t.user_attrs, t.number)


def holds_place(trials: list[FrozenTrial], number: int, budget: int) -> bool:
    """Whether trial ``number`` is among the ``budget`` first-ranked trials that still count
    (COMPLETE, RUNNING or WAITING)."""
    live = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)]
    mine = next(t for t in live if t.number == number)
    return sum(_rank(t) < _rank(mine) for t in live) < budget


@dataclass
class Phase:
    """One phase of the shared search, as one process sees it."""

    number: int
    handle: StudyHandle
    n_trials: int
    patience: int | None = None
    min_delta: float = 0.0
    _cut_recorded: bool = field(default=False, repr=False)

    @property
    def study(self) -> optuna.Study:
        return self.handle.study

    def budget(self, trials: list[FrozenTrial]) -> int:
        """How many COMPLETE trials end the phase: ``n_trials``, or fewer once the early-stopping rule
        fired on the settled trials (recorded in the study by the first process that sees it)."""
        if self.patience is None:
            return self.n_trials
        values = settled_values(trials)
        cut = early_stop_cut(values, self.patience, self.min_delta, self.n_trials)
        if cut is None:
            return self.n_trials
        if not self._cut_recorded:
            done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
            last = done[cut - 1].number if cut else None
            if self.study.user_attrs.get(EARLY_STOP) is None:
                log.info("phase %d: early stop after %d trials (trial %s), %d without improvement > %g",
                         self.number, cut, last, self.patience, self.min_delta)
                self.study.set_user_attr(EARLY_STOP, {"trials": cut, "last_trial": last})
            self._cut_recorded = True
        return cut

    def seeded(self) -> bool:
        return bool(self.study.user_attrs.get(SEEDED))

    def seed(self, seeds: list[tuple[dict[str, float], dict[str, Any]]]) -> None:
        """Queue the phase's seed trials (parameters, user attrs), those not queued yet, and mark the phase
        seeded. The coordinator's alone: run again after a crash, it queues only what is missing."""
        if self.seeded():
            return
        have = [t.user_attrs for t in self.study.get_trials(deepcopy=False)]
        for params, attrs in seeds:
            if not any(all(a.get(k) == v for k, v in attrs.items()) for a in have):
                self.study.enqueue_trial(params, user_attrs=attrs)
        self.study.set_user_attr(SEEDED, True)

    def wait_seeded(self, poll_s: float, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not self.seeded():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"study {self.study.study_name!r}: no coordinator started phase {self.number} in {wait_s:.0f} s; "
                    "start the run (darwin-hydra with this optimizer.storage) or give the worker a longer wait_s"
                )
            time.sleep(poll_s)


def _outcome(trial: optuna.Trial, phase: Phase, budget_trials: list[FrozenTrial]) -> str:
    """``keep`` (tell it), ``withdraw`` (the budget is met by others) or ``lost`` (another process
    failed it as stale: its parameters are queued again)."""
    mine = next(t for t in budget_trials if t.number == trial.number)
    if mine.state != TrialState.RUNNING:
        return "lost"
    return "keep" if holds_place(budget_trials, trial.number, phase.budget(budget_trials)) else "withdraw"


def work_phase(
    phase: Phase,
    space: GenomeSpace,
    x0: Mapping[str, float],
    fitness: SharedFitness | None,
    search: SharedSearch,
    *,
    worker: str,
    on_trial: TrialCallback | None = None,
) -> int:
    """Run trials of ``phase`` until its study holds its budget of COMPLETE trials (with ``fitness``
    None: only wait for that, failing stale trials meanwhile). Returns the trials this process told."""
    from tqdm.auto import tqdm

    study, storage = phase.study, phase.handle.storage
    study_id = storage.get_study_id_from_name(study.study_name)
    stale = StaleTrials(storage, search.poll_s)
    told = 0
    noted = time.monotonic()
    bar = tqdm(total=phase.n_trials, desc=f"phase {phase.number} (study)", leave=False)
    try:
        while True:
            stale(study, study_id)
            trials = study.get_trials(deepcopy=False)
            budget = phase.budget(trials)
            n = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.RUNNING,
                                                                 TrialState.WAITING)}
            bar.update(min(n[TrialState.COMPLETE], phase.n_trials) - bar.n)
            if n[TrialState.COMPLETE] >= budget:
                return told
            if fitness is None or (not n[TrialState.WAITING]
                                   and n[TrialState.COMPLETE] + n[TrialState.RUNNING] >= budget):
                if time.monotonic() - noted > 60:
                    noted = time.monotonic()
                    log.info("phase %d: %d/%d trials complete, %d running elsewhere; waiting%s", phase.number,
                             n[TrialState.COMPLETE], budget, n[TrialState.RUNNING],
                             " for workers (darwin-hydra-worker RUN_DIR)" if fitness is None else "")
                time.sleep(search.poll_s)  # others' trials may still finish, or die and be queued again
                continue
            trial = phase.handle.ask()
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                with Heartbeat(storage, trial_id, search.heartbeat_s):
                    trial.set_user_attr(WORKER, worker)
                    outcome = _outcome(trial, phase, study.get_trials(deepcopy=False))
                    if outcome == "withdraw":
                        _withdraw(study, trial, "asked after the budget was met")
                    if outcome != "keep":
                        continue
                    genes = suggest_genes(trial, space, x0)
                    scored = fitness(genes)
                    value, attrs = scored if isinstance(scored, tuple) else (scored, {})
                    value = float(value)
                    trials = study.get_trials(deepcopy=False)
                    outcome = _outcome(trial, phase, trials)
                    if outcome == "lost":
                        log.warning("%s: trial %d was failed as stale while it ran here (heartbeats late?): its "
                                    "value %.6g is dropped, its parameters run again", study.study_name,
                                    trial.number, value)
                        continue
                    if outcome == "withdraw":
                        _withdraw(study, trial, "the budget was met while it ran", value)
                        continue
                    for key, attr in attrs.items():
                        trial.set_user_attr(key, attr)
                    study.tell(trial, value)
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning("%s: trial %d was finished by another process (taken as stale)", study.study_name,
                            trial.number)
                continue
            except BaseException as e:
                give_back(study, storage, trial_id, e)
                raise
            told += 1
            if on_trial is not None:
                best = max([value] + [t.value for t in trials if t.state == TrialState.COMPLETE])
                on_trial({"phase": phase.number, "trial": trial.number, "value": value, "best": best, "genes": genes,
                          "worker": worker})
    finally:
        bar.close()


def _withdraw(study: optuna.Study, trial: optuna.Trial, why: str, value: float | None = None) -> None:
    trial.set_user_attr(WITHDRAWN, why if value is None else f"{why} (value {value:.6g})")
    study.tell(trial, state=TrialState.FAIL)
    log.info("%s: trial %d withdrawn: %s", study.study_name, trial.number, why)


def _phase1(search: SharedSearch, storage) -> Phase:
    handle = make_study(storage, f"{search.study_name}-phase1", search.seed, search.popsize)
    return Phase(1, handle, search.phase1_trials)


def _phase2(search: SharedSearch, storage, phase1: Phase) -> tuple[Phase, list[FrozenTrial]]:
    """Phase 2's study, its CMA-ES warm-started from phase 1 as in the single-process search; and
    phase 1's trials, best first."""
    done1 = sorted(phase1.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                   key=lambda t: (-t.value, t.number))
    source = done1 if len(done1) >= 10 else None  # cmaes needs >= 10 source solutions
    handle = make_study(storage, f"{search.study_name}-phase2", search.seed + 1, search.popsize, source_trials=source)
    return Phase(2, handle, search.phase2_trials, search.patience, search.min_delta), done1


def _register(phase: Phase, worker: str) -> None:
    """Say in the study that ``worker`` is ready (for people, dashboards and the benchmark script)."""
    phase.study.set_user_attr(f"{WORKER}:{worker}", {"ready": datetime.now().isoformat(timespec="seconds")})


def coordinate(
    search: SharedSearch,
    space: GenomeSpace,
    x0: Mapping[str, float],
    proxy: SharedFitness,
    benchmark: SharedFitness | None,
    *,
    worker: str = "coordinator",
    run_trials: bool = True,
    on_trial: TrialCallback | None = None,
) -> SearchResult:
    """The coordinator's search: seed phase 1 (the start genome), run trials with the workers (or only
    wait for them, ``run_trials=False``), seed phase 2 (phase 1's top-k) once phase 1 is complete, run
    or wait again; then the study's result (``read_result``). Run again after a crash, it continues."""
    storage = open_storage(search)
    phase1 = _phase1(search, storage)
    if run_trials:
        _register(phase1, worker)
    phase1.seed([(unit_params(to_unit(genes, x0, space)), attrs)
                 for genes, attrs in phase1_seeds(space, x0, min(search.uniform_seeds, search.phase1_trials - 1))])
    work_phase(phase1, space, x0, proxy if run_trials else None, search, worker=worker, on_trial=on_trial)
    if benchmark is not None and search.phase2_trials > 0:
        phase2, done1 = _phase2(search, storage, phase1)
        phase2.seed([(dict(t.params), {"from_phase1": t.number}) for t in done1[: search.phase2_top_k]])
        work_phase(phase2, space, x0, benchmark if run_trials else None, search, worker=worker, on_trial=on_trial)
    return read_result(search, storage, space, x0, with_phase2=benchmark is not None)


def join(
    search: SharedSearch,
    space: GenomeSpace,
    x0: Mapping[str, float],
    proxy: SharedFitness,
    benchmark: SharedFitness | None,
    *,
    worker: str,
    on_trial: TrialCallback | None = None,
    wait_s: float = 3600.0,
) -> int:
    """A worker's search: wait for the coordinator to seed each phase, run its trials until the phase is
    complete; return how many trials this worker told."""
    storage = open_storage(search)
    phase1 = _phase1(search, storage)
    _register(phase1, worker)
    phase1.wait_seeded(search.poll_s, wait_s)
    told = work_phase(phase1, space, x0, proxy, search, worker=worker, on_trial=on_trial)
    if benchmark is not None and search.phase2_trials > 0:
        phase2, _ = _phase2(search, storage, phase1)
        phase2.wait_seeded(search.poll_s, wait_s)
        told += work_phase(phase2, space, x0, benchmark, search, worker=worker, on_trial=on_trial)
    log.info("worker %s: done, %d trial(s) told", worker, told)
    return told


def _records(trials: list[FrozenTrial], space, x0, phase: int, study_name: str) -> list[TrialRecord]:
    progress, out = Progress(), []
    for t in trials:
        progress.add(t.value)
        out.append(TrialRecord(phase, t.number, trial_genes(t, space, x0, study_name), float(t.value), progress.best,
                               attrs=dict(t.user_attrs)))
    return out


def read_result(search: SharedSearch, storage, space: GenomeSpace, x0: Mapping[str, float], *,
                with_phase2: bool = True) -> SearchResult:
    """The finished study read as the single-process search reports it: every COMPLETE trial of
    phase 1, phase 2's COMPLETE trials in number order up to its budget or the early-stopping cut, the
    best genome by the same selection (the first best value, phase 2's when it ran)."""
    name1, name2 = f"{search.study_name}-phase1", f"{search.study_name}-phase2"
    study1 = optuna.load_study(study_name=name1, storage=storage)
    done1 = sorted(study1.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    hist1 = _records(done1, space, x0, 1, name1)
    best1 = max(hist1, key=lambda r: r.value)
    result = SearchResult(best1.genes, best1.value, 1, list(hist1))
    if not with_phase2 or search.phase2_trials <= 0:
        return result
    study2 = optuna.load_study(study_name=name2, storage=storage)
    done2 = sorted(study2.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    cut = early_stop_cut([float(t.value) for t in done2], search.patience, search.min_delta, search.phase2_trials)
    hist2 = _records(done2[: search.phase2_trials if cut is None else cut], space, x0, 2, name2)
    best2 = max(hist2, key=lambda r: r.value)
    result = SearchResult(best2.genes, best2.value, 2, list(hist1) + list(hist2))
    result.benchmark_evaluations = len(hist2)
    result.stopped_early = len(hist2) < search.phase2_trials
    return result
