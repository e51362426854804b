"""Dead workers in a shared search (docs/distributed.md): the study storage with heartbeats, the
heartbeat of a running trial, failing the trials of dead processes and queueing their parameters again.

A process records a heartbeat of its running trial from a thread every ``heartbeat_s``; any process
fails trials whose last heartbeat (the database's clock) is older than ``stale_after_s`` (Optuna's
``fail_stale_trials``: one process wins each FAIL) and queues their parameters again (user attr
``rerun_of``), so another worker runs them; a trial that lost its worker ``MAX_RERUNS + 1`` times is
not run again.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from darwin_hydra.search.distributed import SharedSearch

log = logging.getLogger(__name__)

# trial attributes the processes of one search read and write about liveness
WORKER = "worker"  # trial: who runs it (set right after its first heartbeat)
RERUN_OF = "rerun_of"  # trial: the number of the dead worker's trial whose parameters it runs again
RERUNS = "reruns"  # trial: how many times these parameters were queued again
MAX_RERUNS = 2  # parameters whose trial lost its worker 3 times are dropped (they may be what kills workers)
_SEED_ATTRS = ("start", "from_phase1")  # what a seed trial is known by (kept on its re-runs)


def open_storage(search: SharedSearch, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study storage with heartbeats on. Processes starting together may race to create Optuna's
    tables in an empty database: the loser tries again."""
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # ask/tell records its own heartbeats (Heartbeat below), which Optuna warns only Study.optimize does
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(
                search.storage,
                heartbeat_interval=search.heartbeat_s,
                grace_period=search.stale_after_s,
                heartbeat_stale_trial_callback=requeue,
            )
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == attempts:
                raise RuntimeError(f"optimizer.storage: cannot open the study storage ({e.__class__.__name__}: "
                                   f"{e}); is the database server up and the URL right?") from e
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's stale-trial callback, called by the one process whose FAIL of ``trial`` won: the dead
    worker's parameters go back in the queue, for the next ask of any process."""
    origin = trial.user_attrs.get(RERUN_OF, trial.number)
    reruns = trial.user_attrs.get(RERUNS, 0)
    worker = trial.user_attrs.get(WORKER, "(unknown)")
    if not trial.params:  # it died before drawing its parameters: nothing to run again
        log.warning("%s: trial %d lost its worker %s before it had parameters", study.study_name, trial.number, worker)
        return
    if reruns >= MAX_RERUNS:
        log.error("%s: trial %d (parameters of trial %d) lost its worker %s, %d times now: not run again; a new "
                  "trial takes its place", study.study_name, trial.number, origin, worker, reruns + 1)
        return
    attrs = {k: trial.user_attrs[k] for k in _SEED_ATTRS if k in trial.user_attrs}
    study.enqueue_trial(dict(trial.params), user_attrs={**attrs, RERUN_OF: origin, RERUNS: reruns + 1})
    log.warning("%s: trial %d lost its worker %s (%s); its parameters are queued to run again", study.study_name,
                trial.number, worker, trial.user_attrs.get("error", "no heartbeat"))


def give_back(study: optuna.Study, storage, trial_id: int, error: BaseException) -> None:
    """A trial this process cannot finish (SIGTERM from a scheduler, Ctrl-C, an error in its fitness):
    FAIL it and queue its parameters now, rather than after its heartbeat goes stale."""
    try:
        storage.set_trial_user_attr(trial_id, "error", f"{type(error).__name__}: {error}"[:500])
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            requeue(study, storage.get_trial(trial_id))
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # told already, or failed as stale by another process
    except Exception as e:  # the storage is out of reach: the heartbeat goes stale and another process re-runs it
        log.warning("%s: could not give trial id %d back (%s); it is re-run once its heartbeat is stale",
                    study.study_name, trial_id, e)


class Heartbeat:
    """Records the heartbeat of one running trial now, then every ``interval_s`` from a thread, until
    the block ends. (Optuna records heartbeats only inside ``Study.optimize``; an ask/tell loop must.)"""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval_s: float):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a database hiccup: the next beat may pass; a long outage makes it stale
                log.warning("heartbeat of trial id %d not recorded: %s", self.trial_id, e)


class StaleTrials:
    """Fails the trials of dead processes (their parameters are queued again by ``requeue``), at most
    once per ``every_s``.

    A trial with a heartbeat is stale once its last one is ``stale_after_s`` old (Optuna's
    ``fail_stale_trials``). A process that died between asking and its first heartbeat (milliseconds)
    leaves a trial Optuna never finds stale: this process records one heartbeat on its behalf, once,
    so that the same rule applies to it."""

    def __init__(self, storage: optuna.storages.RDBStorage, every_s: float):
        self.storage, self.every_s = storage, every_s
        self._last = float("-inf")
        self._adopted: set[int] = set()

    def __call__(self, study: optuna.Study, study_id: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        optuna.storages.fail_stale_trials(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if WORKER not in t.user_attrs and t.number not in self._adopted:
                self._adopted.add(t.number)
                self.storage.record_heartbeat(self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number))
