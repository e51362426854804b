"""What the distributed search (issue #17) can rely on from Optuna's RDBStorage on a real PostgreSQL:

- workers in separate processes share one study; trial numbers stay unique (trial creation locks
  the study row);
- a worker killed mid-trial leaves its trial RUNNING until some process calls ``fail_stale_trials``
  more than ``grace_period`` seconds after the trial's last heartbeat; the retry callback then
  enqueues its parameters again and the next ``ask`` takes them;
- heartbeats are written only inside ``Study.optimize``: an ask/tell worker must record them itself,
  and a trial that never got a heartbeat is never found stale.

Workers are spawned processes (as separate machines would be) and are SIGKILLed, not stopped.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import warnings
from collections import Counter

import optuna
import pytest
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState


HEARTBEAT_S = 1
GRACE_S = 2
SPAWN = multiprocessing.get_context("spawn")
WAIT_S = 60  # generous bound on a worker starting up (imports) on a loaded 2-core machine


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _objective(trial: optuna.Trial, worker: int) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    trial.set_user_attr("worker", worker)
    time.sleep(0.02)  # long enough for the two workers' asks to interleave
    return x * x


def _optimize_worker(url: str, study_name: str, worker: int, n_trials: int, barrier) -> None:
    study = optuna.load_study(
        study_name=study_name, storage=RDBStorage(url), sampler=optuna.samplers.RandomSampler(seed=worker)
    )
    barrier.wait(WAIT_S)  # both workers connected: their trials now overlap
    study.optimize(lambda trial: _objective(trial, worker), n_trials=n_trials)


def _hanging_optimize_worker(url: str, study_name: str, started) -> None:
    """One trial under ``Study.optimize`` (which runs the heartbeat thread) that never finishes."""
    study = optuna.load_study(
        study_name=study_name, storage=RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    )

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", -1.0, 1.0)
        time.sleep(HEARTBEAT_S)  # the heartbeat thread has written by now
        started.set()
        time.sleep(600)
        return 0.0

    study.optimize(objective, n_trials=1)


def _hanging_ask_worker(url: str, study_name: str, record_heartbeat: bool, started, after=None) -> None:
    """One ask/tell trial that never finishes; its heartbeat written by hand, or not at all.
    With ``after``, it asks only once that event is set."""
    storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    study = optuna.load_study(study_name=study_name, storage=storage)
    if after is not None:
        after.wait(WAIT_S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Heartbeat of storage is supposed to be used with Study.optimize"
        trial = study.ask()
    trial.suggest_float("x", -1.0, 1.0)
    if record_heartbeat:
        # Public-API way to the trial id; a real worker repeats this every HEARTBEAT_S from a thread.
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study_name), trial.number
        )
        storage.record_heartbeat(trial_id)
    started.set()
    time.sleep(600)


def _start(target, *args) -> multiprocessing.Process:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _kill(*procs: multiprocessing.Process) -> None:
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(WAIT_S)


def _state(study: optuna.Study, number: int) -> TrialState:
    return study.get_trials(deepcopy=False)[number].state


def _fail_stale_until(study: optuna.Study, number: int, timeout_s: float) -> float:
    """Call ``fail_stale_trials`` as a live worker would before each ask, until trial ``number`` is
    FAIL; return the seconds that took."""
    t0 = time.monotonic()
    while _state(study, number) == TrialState.RUNNING:
        assert time.monotonic() - t0 < timeout_s, f"trial {number} still RUNNING after {timeout_s} s"
        time.sleep(0.25)
        fail_stale_trials(study)
    return time.monotonic() - t0


def test_server_answers_on_loopback(postgres_url):
    import sqlalchemy

    with sqlalchemy.create_engine(postgres_url).connect() as conn:
        version = conn.execute(sqlalchemy.text("SHOW server_version_num")).scalar_one()
    assert int(version) >= 130000  # DROP DATABASE ... WITH (FORCE)


def test_two_processes_share_one_study(postgres_url):
    """This process is worker 0, a spawned one worker 1: five trials each, at the same time."""
    study = optuna.create_study(study_name="shared", storage=RDBStorage(postgres_url))
    barrier = SPAWN.Barrier(2)
    other = _start(_optimize_worker, postgres_url, "shared", 1, 5, barrier)
    try:
        _optimize_worker(postgres_url, "shared", 0, 5, barrier)
        other.join(WAIT_S)
        assert other.exitcode == 0
    finally:
        _kill(other)

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 10
    assert sorted(t.number for t in trials) == list(range(10))  # no number given twice
    assert Counter(t.user_attrs["worker"] for t in trials) == {0: 5, 1: 5}


def test_killed_worker_trial_fails_and_is_retried(postgres_url):
    storage = RDBStorage(
        postgres_url,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    study = optuna.create_study(study_name="hb", storage=storage)
    started = SPAWN.Event()
    worker = _start(_hanging_optimize_worker, postgres_url, "hb", started)
    try:
        assert started.wait(WAIT_S), "worker never started its trial"
    finally:
        _kill(worker)
    killed = study.get_trials()[0]
    assert killed.state == TrialState.RUNNING  # a SIGKILLed worker reports nothing

    # The grace period is the checker's own setting, not the study's: with a long one, not stale yet.
    patient = RDBStorage(postgres_url, heartbeat_interval=HEARTBEAT_S, grace_period=60)
    fail_stale_trials(optuna.load_study(study_name="hb", storage=patient))
    assert _state(study, 0) == TrialState.RUNNING

    _fail_stale_until(study, 0, timeout_s=15)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # the retry, queued
    assert trials[1].params == killed.params

    # The next worker's first trial is the retry: same parameters, linked to the killed trial.
    study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=1)
    retried = study.get_trials()[1]
    assert retried.state == TrialState.COMPLETE
    assert retried.params == killed.params
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retried) == killed.number


def test_ask_tell_worker_needs_its_own_heartbeat(postgres_url):
    storage = RDBStorage(postgres_url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    study = optuna.create_study(study_name="asktell", storage=storage)
    # Trial 0 gets no heartbeat; trial 1 one heartbeat, written after trial 0 began.
    silent_started, beating_started = SPAWN.Event(), SPAWN.Event()
    workers = [
        _start(_hanging_ask_worker, postgres_url, "asktell", False, silent_started),
        _start(_hanging_ask_worker, postgres_url, "asktell", True, beating_started, silent_started),
    ]
    try:
        assert beating_started.wait(WAIT_S), "workers never started their trials"
    finally:
        _kill(*workers)

    _fail_stale_until(study, 1, timeout_s=15)
    # Trial 0 is older than trial 1's last heartbeat, yet never found stale: fail_stale_trials skips
    # RUNNING trials that have no heartbeat at all (such as one whose worker died right after ask).
    assert _state(study, 0) == TrialState.RUNNING
