"""Distributed search on one machine (issue 17): the default zoo search with 1 worker vs 2 workers.

Each configuration is a run of ``darwin-hydra`` defaults (the dense zoo pair, the default genome and
budgets) whose study lives in a throwaway PostgreSQL on loopback (darwin_hydra/testing/postgres.py):

1. preflight, scan and prescribe run in this process (the scan comes from the cache after the first);
2. N ``darwin-hydra-worker RUN_DIR threads=1`` processes start, build their trial sessions and say they
   are ready in the study; this script waits for all N, so that no worker starts late;
3. the coordinator's search stage runs in this process with ``optimizer.coordinator_trials=false``:
   it seeds phase 1, waits while the workers run every trial, seeds phase 2 (``--phase2``), reads
   the study and writes genome.json / search.json.

Phase-1 wall time is taken from the study itself: the first phase-1 trial's start to the last one's
end. Also reported: finished trials, parameters run twice (duplicates), trials lost (FAIL that is
neither withdrawn nor re-run), withdrawn trials, each worker's share, and the load average (the
machine is shared). A single-process reference (no storage URL: the run's own SQLite file, 1 thread)
runs the same search in this process.

    python scripts/bench_distributed.py                 # phase 1 only, 1 vs 2 workers, 2 rounds
    python scripts/bench_distributed.py --phase2 --rounds 1 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_distributed")


def worker_command(run_dir: Path, index: int) -> list[str]:
    exe = Path(sys.executable).with_name("darwin-hydra-worker")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from darwin_hydra.worker import main; main()"]
    return cmd + [str(run_dir), f"index={index}", "threads=1", "wait_s=600"]


def wait_ready(url: str, study: str, n: int, procs, timeout_s: float = 600) -> None:
    import optuna

    from darwin_hydra.search.liveness import WORKER

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            attrs = optuna.load_study(study_name=study, storage=url).user_attrs
            if sum(k.startswith(f"{WORKER}:") for k in attrs) >= n:
                return
        except KeyError:
            pass
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a worker exited with {p.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError("workers not ready")
        time.sleep(0.1)


def _cpu_s(pid: int) -> float:
    """CPU seconds of a live process itself (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the workers and the database server (postmaster and its backends) since
    ``start()``, sampled every 0.1 s (a process's last sample before it exits counts)."""

    def __init__(self, worker_pids: list[int], data_dir: Path):
        self.worker_pids = worker_pids
        self.server_pid = next(int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _is_postmaster(d, data_dir))
        self.last: dict[int, float] = {}
        self.base: dict[int, float] = {}
        self._stop = False

    def _pids(self) -> list[int]:
        children = Path(f"/proc/{self.server_pid}/task/{self.server_pid}/children").read_text().split()
        return self.worker_pids + [self.server_pid] + [int(c) for c in children]

    def _sample(self) -> None:
        for pid in self._pids():
            try:
                self.last[pid] = _cpu_s(pid)
            except (OSError, IndexError):
                pass

    def start(self) -> None:
        import threading

        self._sample()
        self.base = dict(self.last)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop:
            self._sample()
            time.sleep(0.1)

    def stop(self) -> dict:
        self._stop = True
        # backends that exited count with their last sample
        workers = sum(self.last.get(p, 0) - self.base.get(p, 0) for p in self.worker_pids)
        server = sum(v - self.base.get(p, 0) for p, v in self.last.items() if p not in self.worker_pids)
        return {"workers_cpu_s": round(workers, 2), "database_cpu_s": round(server, 2)}


def _is_postmaster(proc_dir: Path, data_dir: Path) -> bool:
    try:
        return str(data_dir) in (proc_dir / "cmdline").read_text() and "postgres" in (proc_dir / "comm").read_text()
    except OSError:
        return False


def study_figures(url: str, name: str) -> dict:
    """Wall time and trial accounting of one phase's study."""
    import optuna
    from optuna.trial import TrialState

    from darwin_hydra.search.distributed import WITHDRAWN
    from darwin_hydra.search.liveness import RERUN_OF, WORKER

    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    params = Counter(tuple(sorted(t.params.items())) for t in done)
    rerun = {t.user_attrs[RERUN_OF] for t in trials if RERUN_OF in t.user_attrs}
    lost = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(WITHDRAWN) and t.number not in rerun]
    return {
        "wall_s": round((max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds(), 3),
        "finished": len(done),
        "duplicates": sum(c - 1 for c in params.values()),
        "lost": len(lost),
        "withdrawn": sum(bool(t.user_attrs.get(WITHDRAWN)) for t in trials),
        "left_running_or_waiting": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        "per_worker": dict(Counter(t.user_attrs.get(WORKER, "?").split("@")[0] for t in done)),
    }


def distributed_round(server, workers: int, phase2: bool, base: Path, own_sessions: bool) -> dict:
    from darwin_hydra.pipeline import RunContext
    from darwin_hydra.run import run
    from darwin_hydra.worker import run_config

    url = server.url(server.create_database())
    run_dir = base / f"workers{workers}-{time.monotonic_ns()}"
    overrides = ["logger=none", "threads=1", f"optimizer.storage={url}", f"optimizer.workers={workers}",
                 "optimizer.coordinator_trials=false", "pipeline.stages=[preflight,scan,prescribe]"]
    if not phase2:
        overrides.append("optimizer.phase2_trials=0")
    run(overrides, run_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # each worker in a session of its own, as a scheduler starts jobs: with the kernel's autogroup
    # scheduling a busy machine shares its cores between sessions, not processes
    procs = [subprocess.Popen(worker_command(run_dir, i), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=own_sessions)
             for i in range(1, workers + 1)]
    try:
        wait_ready(url, "darwin-phase1", workers, procs)
        load_before = os.getloadavg()
        cfg = run_config(run_dir, threads=1)
        ctx = RunContext(cfg, run_dir)
        ctx.results.scan = ctx.stage("scan").load(ctx)
        meter = CpuMeter([p.pid for p in procs], server.data_dir)
        meter.start()
        t0 = time.perf_counter()
        outcome = ctx.stage("search").run(ctx)
        search_s = time.perf_counter() - t0
        codes = [p.wait(120) for p in procs]
        cpu = meter.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    figures = {"workers": workers, "threads_per_worker": 1, "own_sessions": own_sessions, "exit_codes": codes, "search_stage_s": round(search_s, 2),
               "loadavg_1min_before": round(load_before[0], 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
               "phase1": study_figures(url, "darwin-phase1"), "best_fitness": outcome.genome["fitness"], **cpu}
    # CPU the run got, in cores, over the search stage (phase 1 and the workers' last seconds)
    figures["cores_used"] = round((cpu["workers_cpu_s"] + cpu["database_cpu_s"]) / search_s, 2)
    if phase2:
        figures["phase2"] = study_figures(url, "darwin-phase2")
    server.drop_database(url.rsplit("/", 1)[1])
    return figures


def single_process_round(phase2: bool, base: Path) -> dict:
    """The default path: no storage URL, the run's own SQLite file, one process with 1 thread."""
    import optuna

    from darwin_hydra.run import run

    run_dir = base / f"single-{time.monotonic_ns()}"
    overrides = ["logger=none", "threads=1", "pipeline.stages=[preflight,scan,prescribe,search]"]
    if not phase2:
        overrides.append("optimizer.phase2_trials=0")
    ctx = run(overrides, run_dir)
    trials = optuna.load_study(study_name="darwin-phase1", storage=f"sqlite:///{run_dir}/study.db").trials
    wall = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return {"workers": "single process (sqlite)", "phase1_wall_s": round(wall, 3), "phase1_finished": len(trials),
            "search_stage_s": round(ctx.results.seconds["search"], 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (1 worker, 2 workers), alternating")
    ap.add_argument("--phase2", action="store_true", help="both phases (default: phase 1 only)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--one-session", action="store_true",
                    help="start the workers in this script's session (default: each in its own)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from darwin_hydra.testing.postgres import postgres_server

    torch.set_num_threads(1)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp, postgres_server() as server:
        base = Path(tmp)
        reference = single_process_round(args.phase2, base)
        log.info("single process: %s", reference)
        for r in range(args.rounds):
            for workers in (1, 2):
                fig = distributed_round(server, workers, args.phase2, base, own_sessions=not args.one_session)
                log.info("round %d, %d worker(s): %s", r + 1, workers, json.dumps(fig))
                rounds.append(fig)
    one = [f["phase1"]["wall_s"] for f in rounds if f["workers"] == 1]
    two = [f["phase1"]["wall_s"] for f in rounds if f["workers"] == 2]
    summary = {
        "autogroup_scheduling": Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        if Path("/proc/sys/kernel/sched_autogroup_enabled").exists() else None,
        "phase1_wall_s_1_worker": one,
        "phase1_wall_s_2_workers": two,
        "ratio_per_round": [round(b / a, 3) for a, b in zip(one, two)],
        "ratio_of_medians": round(statistics.median(two) / statistics.median(one), 3),
        "cpus": os.cpu_count(),
    }
    result = {"reference": reference, "rounds": rounds, "summary": summary}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
