"""Kill a darwin-hydra run at random moments, many times, resuming it after each kill (issue 15).

    python scripts/fault_inject.py --kills 30 [--seed 0] [--out /tmp/faults] [-- extra overrides]

One reference run first (never killed). Then one run directory is started and SIGKILLed after a
random delay (uniform over the reference's wall time), resumed with README's resume command
(``darwin-hydra hydra.run.dir=RUN_DIR``) and killed again, until ``--kills`` kills have landed; then
it is resumed to the end. After every kill it checks that nothing half-done looks finished (the child
verifies against its checksums if it exists; no report.md before health.json); at the end that the
genome_hash and every tensor equal the reference's and that darwin-hydra-reproduce passes.
Prints where the kills landed (the stage running at the time, from the run's log) and the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

DEFAULT = ["experiment=test_tiny", "logger=none", "mri.cache=false"]


def command() -> list[str]:
    exe = Path(sys.executable).with_name("darwin-hydra")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from darwin_hydra.cli import main; main()"]


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    e.pop("DARWIN_HYDRA_FAULT", None)
    return e


def stage_of(log: str) -> str:
    """The stage the run was in when it died: the last 'stage X: start' without a 'done'."""
    started = re.findall(r"stage (\w+): start", log)
    done = set(re.findall(r"stage (\w+): (?:done|done earlier)", log))
    running = [s for s in started if s not in done]
    return running[-1] if running else ("between stages" if started else "start-up")


def check_partial(run_dir: Path) -> None:
    from darwin_hydra.reproduce import verify_dir

    child = run_dir / "child"
    if child.exists():
        sums = json.loads((child / "checksums.json").read_text())["tensors"]
        assert verify_dir(child, sums) == [], "a child that does not verify looks finished"
    if (run_dir / "report.md").exists():
        assert (run_dir / "health.json").exists(), "report.md before health.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/darwin_fault_inject"))
    ap.add_argument("overrides", nargs="*", help="run overrides (default: experiment=test_tiny logger=none mri.cache=false)")
    args = ap.parse_args()
    overrides = args.overrides or DEFAULT
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    reference, run_dir = args.out / f"reference-{stamp}", args.out / f"killed-{stamp}"

    t0 = time.perf_counter()
    p = subprocess.run(command() + overrides + [f"hydra.run.dir={reference}"], env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"reference run: {wall:.1f} s")

    landed: Counter = Counter()
    kills = attempts = 0
    first = True
    while kills < args.kills:
        log_path = run_dir / f"attempt-{attempts}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = command() + (overrides if first else []) + [f"hydra.run.dir={run_dir}"]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT)
            delay = rng.uniform(0.5, wall)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        attempts += 1
        text = log_path.read_text()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            first = False
            landed[stage_of(text)] += 1
            check_partial(run_dir)
        elif proc.returncode == 0:  # finished before the kill: start a new run directory to kill
            run_dir = args.out / f"killed-{stamp}-{attempts}"
            first = True
            landed["(finished first)"] += 1
        else:
            print(text[-3000:], file=sys.stderr)
            return 1
    p = subprocess.run(command() + [f"hydra.run.dir={run_dir}"], env=env(), capture_output=True, text=True)
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
        return 1
    check_partial(run_dir)
    genome, ref = (json.loads((d / "genome.json").read_text()) for d in (run_dir, reference))
    same_child = (json.loads((run_dir / "child" / "checksums.json").read_text())
                  == json.loads((reference / "child" / "checksums.json").read_text()))
    from darwin_hydra.reproduce import reproduce

    problems, changes = reproduce(run_dir)
    leftovers = list(run_dir.glob("child.tmp-*"))
    print(f"kills landed: {kills} in {attempts} attempts: {dict(landed)}")
    print(f"final genome_hash {genome['genome_hash']} (reference {ref['genome_hash']}), same tensors: {same_child}, "
          f"reproduce: {'passed' if not problems and not changes else problems + changes}, leftovers: {leftovers}")
    ok = genome["genome_hash"] == ref["genome_hash"] and same_child and not problems and not leftovers
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
