#!/usr/bin/env python
"""Stage times and peak memory of the whole pipeline on the faithful tiny seed pairs (issue 20).

For each pair of tests/test_seed_pairs.py (Qwen3.5-9B, Gemma-4-31B-it and Qwen3.5-35B-A3B in their Hub
layouts with a perturbed mother; Qwen3.5-9B with a text-only mother; Qwen3.5-35B-A3B with a per-expert
text-only mother fused by darwin-hydra-fuse-experts), builds the checkpoints, runs

    darwin-hydra experiment=test_tiny logger=none parents=local parents.father=F parents.mother=M
                 probes=darwin_v6 parents.mother_skill=REASONING optimizer.proxy_prompts=2

as a child process and prints a markdown table: each stage's seconds (from the run's log), the wall
time and the peak RSS of the command (``os.wait4``'s resource usage of that process).

    python scripts/seed_pair_figures.py [--out /tmp/seed_pairs]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PAIRS = [("qwen3.5-9b", "perturbed"), ("gemma-4-31b-it", "perturbed"), ("qwen3.5-35b-a3b", "perturbed"),
         ("qwen3.5-9b", "text_only"), ("qwen3.5-35b-a3b", "text_only_fused")]
STAGES = ("preflight", "scan", "prescribe", "search", "merge", "health", "report")


def build(name: str, kind: str, root: Path) -> tuple[Path, Path]:
    from darwin_hydra.io.experts import fuse_experts
    from darwin_hydra.testing.hub import perturbed_mother, save_hub_model, text_only_mother

    father = save_hub_model(name, root / "father")
    if kind == "perturbed":
        return father, perturbed_mother(father, root / "mother")
    mother = text_only_mother(father, root / "mother")
    return father, (fuse_experts(mother, root / "mother-fused") if kind == "text_only_fused" else mother)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="seed_pairs-"))
    exe = Path(sys.executable).with_name("darwin-hydra")
    cmd0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "darwin_hydra.cli"]
    rows = []
    for name, kind in PAIRS:
        root = out / f"{name}-{kind}"
        father, mother = build(name, kind, root)
        run_dir = root / "run"
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd0 + ["experiment=test_tiny", "logger=none", "parents=local",
                                        f"parents.father={father}", f"parents.mother={mother}", "probes=darwin_v6",
                                        "parents.mother_skill=REASONING", "optimizer.proxy_prompts=2",
                                        f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage (its peak RSS)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            print(stderr[-3000:], file=sys.stderr)
            return 1
        log = (run_dir / "cli.log").read_text()
        secs = {m[1]: float(m[2]) for m in re.finditer(r"stage (\w+): done in ([\d.]+) s", log)}
        rows.append((name, kind, secs, wall, usage.ru_maxrss / 2**20))
    print(f"| pair | {' | '.join(STAGES)} | wall | peak RSS |")
    print("|" + "---|" * (len(STAGES) + 4))
    for name, kind, secs, wall, peak in rows:
        cells = " | ".join(f"{secs[s]:.1f}" if s in secs else "-" for s in STAGES)
        print(f"| {name} ({kind}) | {cells} | {wall:.1f} s | {peak:.2f} GB |")
    print(f"\nseconds per stage from each run's cli.log; runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
