"""MRI-seeded versus centre-started CMA-ES: benchmark evaluations needed to reach 95% of the best score.

Runs the search (scan, prescribe, search stages) with ``optimizer.mri_seeded=true`` and ``false`` for
each seed, reads every run's ``search.json`` and prints, per run, the phase-2 benchmark evaluation at
which the dev score first reached 95% of the best dev score seen in any run (the phase-1 proxy trials
are the same budget for both arms). Example:

    python scripts/compare_seeding.py --seeds 0 1 2 -- parents=zoo_dense

Extra Hydra overrides after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, seeded: bool, seed: int, extra: list[str]) -> dict:
    run_dir = out / f"{'mri' if seeded else 'centre'}-seed{seed}"
    if not (run_dir / "search.json").exists():
        cmd = [sys.executable, "-c", "from darwin_hydra.cli import main; main()",
               "pipeline.stages=[scan,prescribe,search]", f"optimizer.mri_seeded={str(seeded).lower()}",
               f"seed={seed}", "logger=none", f"hydra.run.dir={run_dir}", *extra]
        subprocess.run(cmd, check=True)
    return json.loads((run_dir / "search.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temp dir)")
    ap.add_argument("--fraction", type=float, default=0.95)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="compare_seeding-"))
    runs = {(arm, s): run(out, arm == "mri", s, args.overrides) for arm in ("mri", "centre") for s in args.seeds}
    curves = {k: [e["mean"] for e in v["benchmark_log"] if "mean" in e][: v["benchmark_evaluations"]] for k, v in runs.items()}
    best = max(max(c) for c in curves.values() if c)
    target = args.fraction * best
    print(f"best dev score over all runs: {best:.4f}; target {args.fraction:.0%} of it: {target:.4f}\n")
    print(f"{'arm':<8}{'seed':>5}{'evals to target':>17}{'best dev':>10}{'evals run':>11}")
    summary = {"mri": [], "centre": []}
    for (arm, s), c in sorted(curves.items()):
        hit = next((i + 1 for i, v in enumerate(c) if v >= target), None)
        summary[arm].append(hit)
        print(f"{arm:<8}{s:>5}{(str(hit) if hit else 'not reached'):>17}{max(c):>10.4f}{len(c):>11}")
    print()
    for arm, hits in summary.items():
        reached = [h for h in hits if h is not None]
        mean = f"{statistics.mean(reached):.1f}" if reached else "-"
        print(f"{arm}: reached in {len(reached)}/{len(hits)} runs, mean evaluations to target {mean}")
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
