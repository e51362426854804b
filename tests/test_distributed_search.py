"""The distributed search (issue #17) against a real PostgreSQL on loopback (tests/conftest.py):
workers in separate processes share one study; the budget is the study's, exactly; a worker killed
with SIGKILL in the middle of a trial loses nothing (another worker re-runs its parameters); early
stopping follows the single-process rule; and a whole run with a coordinator and two workers, one of
them killed, ends with a child the single-process rules accept, which darwin-hydra-reproduce rebuilds.

Workers are spawned processes or the installed ``darwin-hydra-worker`` command, as on separate machines.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from darwin_hydra.config import compose, plain_config
from darwin_hydra.search import distributed as d
from darwin_hydra.search.genome import GenomeSpace
from darwin_hydra.search.loop import search
from darwin_hydra.testing import console_script

SPAWN = multiprocessing.get_context("spawn")
WAIT_S = 120  # a spawned worker imports torch; the machine has 2 busy cores
TARGET = 0.3


def space() -> GenomeSpace:
    return GenomeSpace.from_config(compose(["genome=darwin_v5"]).genome, 4)


def shared(url: str, **kw) -> d.SharedSearch:
    args = dict(storage=url, study_name="s", seed=0, phase1_trials=16, phase2_top_k=3, phase2_trials=6,
                patience=100, min_delta=0.0, popsize=None, heartbeat_s=0.5, stale_after_s=2.5)
    args.update(kw)
    return d.SharedSearch(**args)


def sphere(genes: dict[str, float]) -> float:
    time.sleep(0.03)  # long enough for the workers' trials to interleave
    return -sum((v - TARGET) ** 2 for v in genes.values())


def flat(genes: dict[str, float]) -> float:
    time.sleep(0.03)
    return 1.0


def _worker(search: d.SharedSearch, name: str, die_at: int | None, flat_phase2: bool) -> None:
    """A worker process; with ``die_at`` it SIGKILLs itself inside its die_at-th trial (parameters
    drawn, heartbeat running, value not told)."""
    calls = 0

    def fitness(genes):
        nonlocal calls
        calls += 1
        if calls == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return sphere(genes)

    sp = space()
    d.join(search, sp, sp.centre(), fitness, flat if flat_phase2 else fitness, worker=name, wait_s=WAIT_S)


def start_workers(search: d.SharedSearch, n: int, die_at: dict[int, int] | None = None, flat_phase2=False):
    procs = [SPAWN.Process(target=_worker, args=(search, f"w{i}", (die_at or {}).get(i), flat_phase2), daemon=True)
             for i in range(n)]
    for p in procs:
        p.start()
    # every worker is ready (registered in the study) before the coordinator starts phase 1
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            attrs = optuna.load_study(study_name=f"{search.study_name}-phase1", storage=search.storage).user_attrs
            if sum(k.startswith(f"{d.WORKER}:") for k in attrs) >= n:
                return procs
        except KeyError:  # the study does not exist yet
            pass
        assert time.monotonic() < deadline, "workers never became ready"
        assert all(p.is_alive() for p in procs), "a worker died while starting"
        time.sleep(0.2)


def stop(procs) -> list[int | None]:
    for p in procs:
        p.join(WAIT_S)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
    return [p.exitcode for p in procs]


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def assert_budget_exact(ts, budget: int):
    """``budget`` COMPLETE trials, none left RUNNING or WAITING, no parameters run twice, and every other
    trial FAIL either withdrawn (asked when others had met the budget) or lost with its worker."""
    states = Counter(t.state for t in ts)
    assert states[TrialState.COMPLETE] == budget, states
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING], states
    done = [tuple(sorted(t.params.items())) for t in ts if t.state == TrialState.COMPLETE]
    assert len(set(done)) == len(done), "a trial's parameters were run twice"
    assert set(states) <= {TrialState.COMPLETE, TrialState.FAIL}


# ---- rules, without a server --------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[0.1, 0.2, 0.2, 0.2, 0.2, 0.9], [0.5] * 8, [0.1, 0.2, 0.3, 0.4], [0.3, 0.1, 0.2, 0.3]])
def test_the_early_stop_cut_is_where_the_single_process_loop_stops(tmp_path, values):
    it = iter(values)
    res = search(space(), space().centre(), lambda g: 0.0, lambda g: next(it), storage=f"sqlite:///{tmp_path}/s.db",
                 study_name="e", seed=0, phase1_trials=2, phase2_top_k=1, phase2_trials=len(values), patience=3,
                 min_delta=0.0)
    cut = d.early_stop_cut(values, 3, 0.0, len(values))
    assert (cut if cut is not None else len(values)) == res.benchmark_evaluations
    assert (cut is not None) == res.stopped_early


def _frozen(number, state, value=None, **attrs):
    return optuna.trial.FrozenTrial(number=number, state=state, value=value, values=None, datetime_start=None,
                                    datetime_complete=None, params={}, distributions={}, user_attrs=attrs,
                                    system_attrs={}, intermediate_values={}, trial_id=number)


def test_who_keeps_a_place_in_the_budget_when_asks_race():
    C, R, W, F = TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL
    # budget 4: trials 0 and 3 finished; 1 lost its worker (FAIL) and runs again as 5; 2, 4 and 6 were asked
    ts = [_frozen(0, C, 1.0), _frozen(1, F), _frozen(2, R), _frozen(3, C, 2.0), _frozen(4, R),
          _frozen(5, W, rerun_of=1), _frozen(6, R)]
    assert d.holds_place(ts, 5, 4)  # the re-run first: its place was taken before the new asks
    assert d.holds_place(ts, 2, 4)  # then by number
    assert not d.holds_place(ts, 4, 4) and not d.holds_place(ts, 6, 4)
    # what no later event can change: finished trials before the first unfinished one (FAIL skipped)
    assert d.settled_values(ts) == [1.0]
    assert d.settled_values([_frozen(0, C, 1.0), _frozen(1, F), _frozen(2, C, 3.0), _frozen(3, W)]) == [1.0, 3.0]


def test_population_spans_the_workers():
    assert d.population_size(None, 1, 6) is None and d.population_size(None, 9, 6) is None  # CMA-ES's 9 for 6 genes
    assert d.population_size(None, 12, 6) == 12 and d.population_size(16, 4, 6) == 16 and d.population_size(4, 8, 6) == 8


# ---- workers sharing a study on PostgreSQL -----------------------------------------------------------


def test_two_workers_finish_exactly_the_budget_with_no_trial_duplicated_or_lost(postgres_url):
    s = shared(postgres_url)
    procs = start_workers(s, 2)
    sp = space()
    try:
        result = d.coordinate(s, sp, sp.centre(), sphere, sphere, run_trials=False)  # the workers run every trial
    finally:
        codes = stop(procs)
    assert codes == [0, 0]
    phase1, phase2 = trials(postgres_url, "s-phase1"), trials(postgres_url, "s-phase2")
    assert_budget_exact(phase1, 16)
    assert_budget_exact(phase2, 6)
    assert all(t.user_attrs.get(d.WITHDRAWN) for t in phase1 + phase2 if t.state == TrialState.FAIL)
    by_worker = Counter(t.user_attrs[d.WORKER] for t in phase1 if t.state == TrialState.COMPLETE)
    assert set(by_worker) == {"w0", "w1"}  # both did part of the work
    assert phase1[0].user_attrs.get("start") and phase1[0].state == TrialState.COMPLETE  # the start genome
    seeds = sorted((t for t in phase1 if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))[:3]
    assert [t.user_attrs.get("from_phase1") for t in sorted(phase2, key=lambda t: t.number)[:3]] == \
        [t.number for t in seeds]  # phase 2 seeded once, with phase 1's best
    # the result is the study read by the single-process rules
    assert len(result.history) == 16 + 6 and result.benchmark_evaluations == 6 and not result.stopped_early
    done2 = sorted((t for t in phase2 if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    best = max(done2, key=lambda t: t.value)
    assert result.best_phase == 2 and result.best_value == best.value
    assert result.best_genes == pytest.approx(d.trial_genes(best, sp, sp.centre(), "s-phase2"))


def test_a_worker_killed_in_a_trial_loses_nothing_and_its_trial_is_run_again(postgres_url):
    s = shared(postgres_url, phase2_trials=0)
    procs = start_workers(s, 2, die_at={0: 3})  # w0 dies in its third trial
    sp = space()
    try:
        t0 = time.monotonic()
        result = d.coordinate(s, sp, sp.centre(), sphere, None, run_trials=False)
        took = time.monotonic() - t0
    finally:
        codes = stop(procs)
    assert codes == [-signal.SIGKILL, 0]
    phase1 = trials(postgres_url, "s-phase1")
    assert_budget_exact(phase1, 16)
    lost = [t for t in phase1 if t.state == TrialState.FAIL and not t.user_attrs.get(d.WITHDRAWN)]
    assert len(lost) == 1 and lost[0].user_attrs[d.WORKER] == "w0"
    rerun = [t for t in phase1 if t.user_attrs.get(d.RERUN_OF) == lost[0].number]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE
    assert rerun[0].params == lost[0].params and rerun[0].user_attrs[d.WORKER] == "w1"
    assert len(result.history) == 16
    assert took > s.stale_after_s  # it waited for the dead worker's heartbeat to go stale, no longer than needed
    assert took < 60


def test_a_trial_that_raises_is_given_back_at_once_and_the_restarted_search_runs_it(postgres_url):
    """An error (or a scheduler's SIGTERM) inside a trial: the trial is failed and its parameters queued
    at once, not after its heartbeat goes stale; the coordinator run again continues the same study."""
    s = shared(postgres_url, phase1_trials=6, phase2_trials=0, stale_after_s=600)
    sp = space()
    calls = 0

    def breaks_once(genes):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return sphere(genes)

    with pytest.raises(RuntimeError, match="simulated"):
        d.coordinate(s, sp, sp.centre(), breaks_once, None)
    failed = [t for t in trials(postgres_url, "s-phase1") if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "simulated" in failed[0].user_attrs["error"]
    result = d.coordinate(s, sp, sp.centre(), breaks_once, None)  # started again: no stale window to wait for
    phase1 = trials(postgres_url, "s-phase1")
    assert_budget_exact(phase1, 6)
    rerun = [t for t in phase1 if t.user_attrs.get(d.RERUN_OF) == failed[0].number]
    assert len(rerun) == 1 and rerun[0].params == failed[0].params and rerun[0].state == TrialState.COMPLETE
    assert len(result.history) == 6


def test_early_stopping_is_decided_once_by_the_single_process_rule(postgres_url, tmp_path):
    """A flat benchmark: the single-process search stops phase 2 after patience + 1 trials; so does the
    shared one, with the coordinator and two workers running trials, and it records the cut once."""
    s = shared(postgres_url, phase1_trials=6, phase2_top_k=2, phase2_trials=20, patience=3)
    procs = start_workers(s, 2, flat_phase2=True)
    sp = space()
    try:
        result = d.coordinate(s, sp, sp.centre(), sphere, flat, run_trials=True)
    finally:
        codes = stop(procs)
    assert codes == [0, 0]
    single = search(sp, sp.centre(), sphere, flat, storage=f"sqlite:///{tmp_path}/single.db", study_name="s", seed=0,
                    phase1_trials=6, phase2_top_k=2, phase2_trials=20, patience=3, min_delta=0.0)
    assert result.benchmark_evaluations == single.benchmark_evaluations == 4
    assert result.stopped_early and single.stopped_early
    study2 = optuna.load_study(study_name="s-phase2", storage=postgres_url)
    assert study2.user_attrs[d.EARLY_STOP]["trials"] == 4
    phase2 = study2.get_trials(deepcopy=False)
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in phase2)
    # trials asked before the cut was known may have finished; the result holds the first four only
    assert [h.number for h in result.history if h.phase == 2] == sorted(
        t.number for t in phase2 if t.state == TrialState.COMPLETE)[:4]


# ---- a whole run: coordinator + two darwin-hydra-worker processes, one killed ---------------------------

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=test_tiny", "logger=none", "optimizer.phase1_trials=8"]


def _worker_command(run_dir: Path, index: int, fault: str | None = None) -> subprocess.Popen:
    cmd = console_script("darwin-hydra-worker")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.pop("DARWIN_HYDRA_FAULT", None)
    if fault:
        env["DARWIN_HYDRA_FAULT"] = fault
    return subprocess.Popen(cmd + [str(run_dir), f"index={index}", "wait_s=600"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _when_ready(url: str, worker: str, then) -> threading.Thread:
    """Call ``then`` once ``worker`` has registered in the run's phase-1 study."""

    def wait():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                attrs = optuna.load_study(study_name="darwin-phase1", storage=url).user_attrs
                if any(k.startswith(f"{d.WORKER}:{worker}@") for k in attrs):
                    return then()
            except KeyError:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_run_with_two_workers_one_killed_ends_with_a_child_the_single_process_rules_accept(postgres_url, tmp_path):
    from darwin_hydra.reproduce import reproduce
    from darwin_hydra.run import run

    run_dir = tmp_path / "distributed"
    overrides = TINY + [f"optimizer.storage={postgres_url}", "optimizer.heartbeat_s=0.5", "optimizer.stale_after_s=3",
                        "optimizer.workers=2", "optimizer.coordinator_trials=false"]
    # worker 1 starts first and is SIGKILLed in its first trial (the start genome, trial 0); worker 2
    # starts once worker 1 is ready, so that worker 1 surely gets that trial
    killed = _worker_command(run_dir, 1, fault="trial:1")
    workers = [killed]
    starter = _when_ready(postgres_url, "worker-1", lambda: workers.append(_worker_command(run_dir, 2)))
    try:
        run(overrides, run_dir)  # the coordinator: preflight, scan, prescribe, search (waiting), merge, health, report
    finally:
        starter.join(5)
        codes = []
        for w in workers:
            try:
                codes.append(w.wait(120))
            except subprocess.TimeoutExpired:
                w.kill()
                codes.append(None)
    assert codes == [-signal.SIGKILL, 0], [w.stderr.read()[-3000:] for w in workers]

    phase1 = trials(postgres_url, "darwin-phase1")
    assert_budget_exact(phase1, 8)
    assert phase1[0].state == TrialState.FAIL and phase1[0].user_attrs[d.WORKER].startswith("worker-1@")
    rerun = [t for t in phase1 if t.user_attrs.get(d.RERUN_OF) == 0]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE and rerun[0].params == phase1[0].params
    assert rerun[0].user_attrs[d.WORKER].startswith("worker-2@")

    # the same files, of the same shape, as a single-process search on these parents writes
    single_dir = tmp_path / "single"
    run(TINY + ["pipeline.stages=[preflight,scan,prescribe,search]"], single_dir)
    genome, ref_genome = (json.loads((p / "genome.json").read_text()) for p in (run_dir, single_dir))
    record, ref_record = (json.loads((p / "search.json").read_text()) for p in (run_dir, single_dir))
    assert set(genome) == set(ref_genome) and set(record) == set(ref_record)
    assert set(record["history"][0]) == set(ref_record["history"][0])
    assert set(record["benchmark_log"][0]) == set(ref_record["benchmark_log"][0])
    # chosen by the same rule: the first best phase-2 value, phase 1 complete, phase 2 up to its budget or cut
    history = record["history"]
    assert [h["phase"] for h in history].count(1) == 8
    phase2 = [h for h in history if h["phase"] == 2]
    assert len(phase2) == record["benchmark_evaluations"] == len(record["benchmark_log"])
    best = max(phase2, key=lambda h: h["value"])
    assert genome["genes"] == best["genes"] and genome["fitness"] == best["value"] and genome["fitness_phase"] == 2
    assert record["uniform_baseline"]["evaluations"] == len(phase2)
    assert reproduce(run_dir) == ([], [])


def test_a_worker_refuses_a_run_without_a_shared_storage(tmp_path):
    from omegaconf import OmegaConf

    from darwin_hydra.config import ConfigError
    from darwin_hydra.worker import run_config, worker_device

    saved = tmp_path / ".hydra" / "config.yaml"
    saved.parent.mkdir(parents=True)
    OmegaConf.save(plain_config(compose(["experiment=test_tiny"])), saved)
    with pytest.raises(ConfigError, match=r"optimizer.storage is null.*darwin-hydra-worker|optimizer.storage is null"):
        run_config(tmp_path)
    OmegaConf.save(plain_config(compose(["experiment=test_tiny", "optimizer.storage=postgresql+psycopg://u@h/db"])), saved)
    assert run_config(tmp_path, threads=1).threads == 1
    assert worker_device("cpu", 3, None) == "cpu" and worker_device("cpu", 3, "cuda:1") == "cuda:1"


def test_search_json_names_the_storage_without_its_password():
    from darwin_hydra.stages.search import shown_storage

    assert shown_storage("postgresql+psycopg://me:s3cret@db.example:5432/runs") == \
        "postgresql+psycopg://me:***@db.example:5432/runs"
    assert shown_storage("sqlite:////runs/r1/study.db") == "study.db"


def test_hydras_joblib_launcher_starts_one_worker_per_index(tmp_path):
    """README's one-machine command: ``darwin-hydra-worker -m ... hydra/launcher=joblib`` starts a worker
    per index, each in its own log directory (here they time out waiting for a coordinator's scan)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from omegaconf import OmegaConf

    saved = tmp_path / ".hydra" / "config.yaml"
    saved.parent.mkdir(parents=True)
    OmegaConf.save(plain_config(compose(["experiment=test_tiny",
                                         "optimizer.storage=postgresql+psycopg://u@127.0.0.1:9/db"])), saved)
    cmd = console_script("darwin-hydra-worker")
    out = subprocess.run(cmd + ["-m", f"run_dir={tmp_path}", "index=range(1,3)", "hydra/launcher=joblib",
                                "hydra.launcher.n_jobs=2", "wait_s=1"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert out.returncode != 0 and "no scan" in out.stderr
    for i in (1, 2):
        log_text = (tmp_path / "workers" / str(i) / "worker.log").read_text()
        assert f"worker-{i}@" in log_text and "waiting for the scan" in log_text


def test_the_coordinator_and_its_workers_share_one_wandb_group_with_a_job_type_each(tmp_path, monkeypatch):
    from darwin_hydra.tracking import Tracker
    from darwin_hydra.worker import _tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose(["experiment=test_tiny", "logger=wandb", "logger.mode=offline",
                   "optimizer.storage=postgresql+psycopg://u@127.0.0.1:9/db"])
    run_dir = tmp_path / "2026-12-08" / "10-00-00"
    run_dir.mkdir(parents=True)
    coordinator = Tracker(cfg, run_dir)
    worker = _tracker(cfg, run_dir, "worker-1")
    try:
        assert coordinator.run.group and worker.run.group == coordinator.run.group
        assert (coordinator.run.job_type, worker.run.job_type) == ("run", "worker")
        assert json.loads((run_dir / "tracking.json").read_text())["job_type"] == "run"  # the worker leaves it
    finally:
        worker.finish()
        coordinator.finish()


def test_optuna_dashboard_reads_a_distributed_runs_study(postgres_url):
    pytest.importorskip("optuna_dashboard")
    from optuna_dashboard import wsgi

    study = optuna.create_study(study_name="darwin-phase1", storage=postgres_url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    app = wsgi(postgres_url)

    def get(path):
        status = []
        body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "localhost",
                             "SERVER_PORT": "8080", "wsgi.url_scheme": "http", "wsgi.input": __import__("io").BytesIO(b""),
                             "wsgi.errors": sys.stderr}, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), (path, status)
        return json.loads(body)

    summaries = get("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == ["darwin-phase1"]
    detail = get(f"/api/studies/{summaries[0]['study_id']}")
    assert len(detail["trials"]) == 3
