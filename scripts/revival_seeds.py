#!/usr/bin/env python
"""The same search with and without dead-expert revival, over several seeds (issue 8's figures).

For each seed runs ``darwin-hydra zoo=<zoo> parents=zoo_moe genome.revive_dead_experts=<true|false>
optimizer.seed=<seed> logger=none`` into ``--out/s<seed>_<with|without>`` (a finished run, one with
a benchmark.json, is reused), then prints per run the dead experts of father, mother and child (the
health check's MoE scan: the MRI rule on the probe prompts) and the child's test-split skill mean,
and per seed the paired-bootstrap difference with - without over the test items; last the same
difference on the per-item mean over the seeds.

    python scripts/revival_seeds.py --zoo revival --seeds 0 1 2 --out outputs/revival_seeds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run(zoo: str, seed: int, revive: bool, out: Path, extra: list[str]) -> None:
    if (out / "benchmark.json").is_file():
        print(f"{out}: reused", flush=True)
        return
    cmd = ["darwin-hydra", f"zoo={zoo}", "parents=zoo_moe", f"genome.revive_dead_experts={str(revive).lower()}",
           f"optimizer.seed={seed}", "logger=none", f"hydra.run.dir={out}", *extra]
    t0 = time.perf_counter()
    with open(str(out) + ".log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest run so far
    print(f"{out}: {time.perf_counter() - t0:.0f} s (peak RSS of the runs so far {peak:.0f} MB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="revival", help="conf/zoo/<name>.yaml (default: revival)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("outputs/revival_seeds"))
    ap.add_argument("extra", nargs="*", help="more darwin-hydra overrides for every run")
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from darwin_hydra.evaluate.benchmark import evaluate_model
    from darwin_hydra.evaluate.stats import paired_bootstrap
    from darwin_hydra.search.genome import revive_gain
    from darwin_hydra.zoo import default_cache_dir, ensure_zoo
    from darwin_hydra.zoo.config import load_zoo_config

    args.out.mkdir(parents=True, exist_ok=True)
    tasks = str(ensure_zoo(load_zoo_config(args.zoo), default_cache_dir()) / "tasks")

    def items(child: Path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(child, dtype=torch.float32).eval()
        res = evaluate_model(model, AutoTokenizer.from_pretrained(child), ["zoo_skills_test"], tasks)
        return {k: np.asarray(v.correct, dtype=float) for k, v in res.tasks.items()}

    scores: dict[bool, list[dict]] = {True: [], False: []}
    for seed in args.seeds:
        for revive in (True, False):
            d = args.out / f"s{seed}_{'with' if revive else 'without'}"
            run(args.zoo, seed, revive, d, args.extra)
            moe = json.loads((d / "health.json").read_text())["moe"]
            genome = json.loads((d / "genome.json").read_text())
            s = items(d / "child")
            scores[revive].append(s)
            mean = 100 * np.mean([v.mean() for v in s.values()])
            gain = genome.get("genes", {}).get("revive_gain")
            print(f"seed {seed} {'with' if revive else 'without':7s} revival: dead experts father {moe['father']['dead']}, "
                  f"mother {moe['mother']['dead']}, child {moe['child']['dead']}; child test mean {mean:.1f}"
                  + (f"; revived {genome.get('revived_experts')}, revive_gain {gain:.3f} (x{revive_gain(gain):.2f})"
                     if revive and gain is not None else ""), flush=True)
        diff, lo, hi = paired_bootstrap(scores[True][-1], scores[False][-1])
        print(f"seed {seed}: with - without {100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", flush=True)
    if len(args.seeds) > 1:
        pooled = {rv: {k: np.mean([s[k] for s in scores[rv]], axis=0) for k in scores[rv][0]} for rv in (True, False)}
        diff, lo, hi = paired_bootstrap(pooled[True], pooled[False])
        print(f"{len(args.seeds)} seeds, per-item mean over the seeds: with - without {100 * diff:+.1f} "
              f"[{100 * lo:+.1f}, {100 * hi:+.1f}]")


if __name__ == "__main__":
    sys.exit(main())
