#!/usr/bin/env python
"""The search on every zoo family, three seeds each: child vs parents, base and the best uniform merge.

For each family (``conf/experiment/family_<name>.yaml``) and seed, runs the whole pipeline

    darwin-hydra experiment=family_<name> seed=<seed> logger=none hydra.run.dir=<out>/<name>/s<seed>

(a finished run, one with a ``report.md``, is reused; a killed one resumes), then reads the run's
``benchmark.json`` (test split: scores with 95% intervals, paired-bootstrap child-minus-other
differences) and ``search.json`` (the uniform baseline: the best of N ratios on dev, N = phase 2's
benchmark evaluations; the trial history). Prints per family a markdown table (one row per seed) and:

- the verdict "child >= best uniform merge on test" per seed, and pooled over the seeds: the paired
  bootstrap of the per-item mean over the seeds (``--pooled``, default on: the child and the uniform
  merge of every run are scored again on the test items, a few seconds each);
- the dev candidates (the search's genome, the MRI's child, the best uniform ratio) and which became
  the child;
- proxy vs benchmark: the Spearman rank correlation between proxy value and dev score over every model
  the search scored on dev (phase 2's genomes, the uniform grid, the MRI child: ``search.json``'s
  benchmark log); for runs made before the search recorded those, over the genomes both phases scored
  (phase 2 starts from phase 1's top-k genomes, the same parameters; matched by genes), per run and
  pooled per family.

    python scripts/family_results.py                                   # 4 families x seeds 0 1 2
    python scripts/family_results.py --families full distill --seeds 0 --out outputs/families
    python scripts/family_results.py --collect-only                    # tables from finished runs
    python scripts/family_results.py -- optimizer.phase1_trials=30     # more overrides for every run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FAMILIES = ("split", "full", "distill", "uniform")
log = logging.getLogger("family_results")


# ------------------------------------------------------------------------------------------ running


def code_state() -> str:
    """The commit and the working tree the runs were measured with (the search code may change between runs)."""
    import hashlib

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout

    changed = git("status", "--short").splitlines()
    diff = hashlib.sha256(git("diff", "HEAD").encode()).hexdigest()[:12]
    return (f"code: {git('log', '-1', '--oneline').strip() or 'unknown commit'}; working tree: {len(changed)} "
            f"changed path(s), sha256 of `git diff HEAD` {diff}")


def run_dir(out: Path, family: str, seed: int) -> Path:
    return out / family / f"s{seed}"


def run(family: str, seed: int, out: Path, extra: list[str]) -> float | None:
    """Run (or resume) one family/seed; the wall seconds, or None when a finished run was reused."""
    d = run_dir(out, family, seed)
    if (d / "report.md").is_file():
        log.info("%s: finished run reused", d)
        return None
    d.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["darwin-hydra", f"experiment=family_{family}", f"seed={seed}", "logger=none", f"hydra.run.dir={d}", *extra]
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    with open(str(d) + ".log", "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{family} seed {seed}: darwin-hydra exited {proc.returncode}; see {d}.log")
    log.info("%s: %.0f s", d, seconds)
    (d / "family_run_seconds.txt").write_text(f"{seconds:.1f}\n")
    (d / "family_run_code.txt").write_text(code_state() + "\n")
    return seconds


# --------------------------------------------------------------------------------------- collecting


def _uniform_key(models: dict) -> str | None:
    return next((m for m in models if m.startswith("uniform")), None)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 pairs or a constant side."""
    if len(x) < 3:
        return None
    from scipy.stats import spearmanr

    rho = float(spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho  # NaN: one side constant


def proxy_vs_dev(search: dict) -> tuple[list[float], list[float], dict]:
    """(proxy values, dev scores) of the genomes scored in both phases, and counts of what is missing.

    A phase-2 record that carries its own proxy value (``proxy``) is used as is; otherwise it is matched
    to the phase-1 record with the same genes (phase 2 is seeded with phase 1's top-k parameters, which
    map to the same genes)."""
    hist = search.get("history", [])
    p1 = [h for h in hist if h["phase"] == 1]
    p2 = [h for h in hist if h["phase"] == 2]
    bench_log = search.get("benchmark_log") or []
    if any(e.get("proxy") is not None for e in bench_log):
        # recorded by the search for every model it scored on dev: phase 2's genomes, the uniform grid, the MRI child
        pairs = [(e["proxy"], e["mean"]) for e in bench_log if e.get("proxy") is not None]
        pairs += [(g["proxy"], g["mean"]) for g in (search.get("uniform_baseline") or {}).get("grid", [])
                  if g.get("proxy") is not None]
        pairs += [(c["proxy"], c["dev"]) for c in (search.get("candidates") or {}).get("rows", [])
                  if c["kind"] == "mri" and c.get("proxy") is not None]
        return [float(x) for x, _ in pairs], [float(y) for _, y in pairs], {
            "phase1": len(p1), "phase2": len(p2), "both": len(pairs), "all_dev_models": True}

    def key(genes: dict) -> tuple:
        return tuple(sorted((g, round(float(v), 12)) for g, v in genes.items()))

    by_genes = {key(h["genes"]): h["value"] for h in p1}
    xs, ys = [], []
    for h in p2:
        proxy = h.get("proxy", by_genes.get(key(h["genes"])))
        if proxy is not None:
            xs.append(float(proxy))
            ys.append(float(h["value"]))
    return xs, ys, {"phase1": len(p1), "phase2": len(p2), "both": len(xs)}


def collect(d: Path) -> dict:
    """The numbers of one finished run."""
    bench = json.loads((d / "benchmark.json").read_text())
    search = json.loads((d / "search.json").read_text())
    genome = json.loads((d / "genome.json").read_text())
    models, diffs = bench["models"], bench.get("differences", {})
    uniform = _uniform_key(models)
    baseline = search.get("uniform_baseline") or {}
    xs, ys, counts = proxy_vs_dev(search)
    secs = d / "family_run_seconds.txt"
    return {
        "dir": str(d),
        "models": models,
        "diffs": diffs,
        "uniform": uniform,
        "baseline": baseline,
        "evaluations": search.get("benchmark_evaluations"),
        "fitness_phase": genome.get("fitness_phase"),
        "child_dev": genome.get("fitness"),
        "child_kind": (genome.get("child") or {}).get("kind", "genome"),
        "candidates": {c["kind"]: c["dev"] for c in (search.get("candidates") or {}).get("rows", [])},
        "proxy": xs,
        "dev": ys,
        "counts": counts,
        "rho": spearman(xs, ys),
        "seconds": float(secs.read_text()) if secs.is_file() else None,
        "code": (d / "family_run_code.txt").read_text().strip() if (d / "family_run_code.txt").is_file() else None,
    }


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    s = f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"
    return s.replace("-0.0", "+0.0" if signed else "0.0") if s.lstrip("+-") == "0.0" else s


def _rho(rho: float | None) -> str:
    return "-" if rho is None else f"{rho:+.2f}"


def _score(models: dict, name: str | None) -> str:
    if not name or name not in models:
        return "-"
    m = models[name]
    lo, hi = m.get("mean_ci", [None, None])
    return f"{_pct(m['mean'])} [{_pct(lo)}, {_pct(hi)}]"


def _diff(diffs: dict, name: str | None) -> str:
    if not name or name not in diffs:
        return "-"
    d = diffs[name]
    lo, hi = d["ci"]
    return f"{_pct(d['diff'], True)} [{_pct(lo, True)}, {_pct(hi, True)}]"


def family_table(family: str, runs: dict[int, dict]) -> str:
    head = ("| seed | child | father | mother | base | best uniform (dev-chosen) | child - uniform | child - father "
            "| child - mother | child - base |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for seed, r in runs.items():
        m, dd, u, b = r["models"], r["diffs"], r["uniform"], r["baseline"]
        u_label = "-"
        if u:
            u_label = (f"{_score(m, u)} (r={float(b.get('best_ratio', 'nan')):.2f}, best of "
                       f"{len(b.get('grid') or []) or b.get('evaluations')} on dev)")
        lines.append(
            f"| {seed} | **{_score(m, 'child')}** ({r.get('child_kind', 'genome')}) | {_score(m, 'father')} | {_score(m, 'mother')} | {_score(m, 'base')} "
            f"| {u_label} | **{_diff(dd, u)}** | {_diff(dd, 'father')} | {_diff(dd, 'mother')} | {_diff(dd, 'base')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ pooling


def rescore(d: Path, ratio: float) -> tuple[dict, dict]:
    """Per-item scores (task -> 0/1 array) of a run's child and of its uniform merge (1-r) father + r mother,
    on the run's report tasks (test split)."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from darwin_hydra.evaluate.benchmark import evaluate_model
    from darwin_hydra.zoo import default_cache_dir, resolve_zoo_uri
    from darwin_hydra.zoo.config import to_zoo_config

    cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
    zoo = to_zoo_config(cfg.zoo)

    def path(uri: str) -> Path:
        return resolve_zoo_uri(uri, zoo, default_cache_dir())

    bench = cfg.benchmark
    kwargs = {"metric": bench.get("metric")} if bench.get("metric") is not None else {}
    tok = AutoTokenizer.from_pretrained(d / "child")

    def score(model) -> dict:
        res = evaluate_model(model, tok, list(bench.report_tasks), str(path(bench.include_path)), **kwargs)
        return {t: np.asarray(v.correct, dtype=float) for t, v in res.tasks.items()}

    child = score(AutoModelForCausalLM.from_pretrained(d / "child", dtype=torch.float32).eval())
    model = AutoModelForCausalLM.from_pretrained(path(cfg.parents.father), dtype=torch.float32).eval()
    mother = AutoModelForCausalLM.from_pretrained(path(cfg.parents.mother), dtype=torch.float32).state_dict()
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t.copy_(torch.lerp(t, mother[k], ratio))
    return child, score(model)


def pooled_child_minus_uniform(family: str, runs: dict[int, dict], n_boot: int) -> tuple[float, float, float] | None:
    """Paired bootstrap of child minus best uniform merge on the per-item mean over the seeds' runs (each
    run's child and uniform merge at its dev-chosen ratio scored again, ``rescore``)."""
    import numpy as np

    from darwin_hydra.evaluate.stats import paired_bootstrap

    children, uniforms = [], []
    for seed, r in runs.items():
        d = Path(r["dir"])
        if not r["baseline"] or not (d / "child").is_dir():
            return None
        ratio = float(r["baseline"]["best_ratio"])
        child, uniform = rescore(d, ratio)
        children.append(child)
        uniforms.append(uniform)
        log.info("%s seed %s: child and uniform r=%.2f rescored", family, seed, ratio)

    def mean_over_seeds(scores: list[dict]) -> dict:
        return {t: np.mean([s[t] for s in scores], axis=0) for t in scores[0]}

    return paired_bootstrap(mean_over_seeds(children), mean_over_seeds(uniforms), n_boot=n_boot)


# -------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("outputs/families"))
    ap.add_argument("--collect-only", action="store_true", help="only read finished runs")
    ap.add_argument("--no-pooled", dest="pooled", action="store_false", help="skip the pooled re-scoring")
    ap.add_argument("--n-boot", type=int, default=10000)
    ap.add_argument("extra", nargs="*", help="more darwin-hydra overrides for every run (after --)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")

    print(code_state() + "\n")

    summary = []
    for family in args.families:
        runs: dict[int, dict] = {}
        for seed in args.seeds:
            d = run_dir(args.out, family, seed)
            if not args.collect_only:
                run(family, seed, args.out, args.extra)
            if (d / "benchmark.json").is_file() and (d / "search.json").is_file():
                runs[seed] = collect(d)
            else:
                log.warning("%s: no finished run", d)
        if not runs:
            continue
        print(f"### family `{family}` (test split, skill mean in points, 95% intervals; differences: paired bootstrap)\n")
        print(family_table(family, runs))
        wins = []
        for seed, r in runs.items():
            u = r["diffs"].get(r["uniform"]) if r["uniform"] else None
            if u is None:
                wins.append(f"seed {seed}: no uniform baseline")
                continue
            lo, hi = u["ci"]
            verdict = "yes" if u["diff"] >= 0 else "no"
            sig = "above, CI excludes 0" if lo > 0 else ("below, CI excludes 0" if hi < 0 else "CI includes 0")
            wins.append(f"seed {seed}: {verdict} ({_pct(u['diff'], True)}, {sig})")
        print("\nchild >= best uniform merge on test: " + "; ".join(wins))
        pooled = pooled_child_minus_uniform(family, runs, args.n_boot) if args.pooled else None
        if pooled is not None:
            diff, lo, hi = pooled
            print(f"pooled over seeds {list(runs)} (per-item mean): child - uniform {_pct(diff, True)} "
                  f"[{_pct(lo, True)}, {_pct(hi, True)}] -> child >= uniform: {'yes' if diff >= 0 else 'no'}")
        xs = [x for r in runs.values() for x in r["proxy"]]
        ys = [y for r in runs.values() for y in r["dev"]]
        per_run = ", ".join(
            f"seed {s}: {_rho(r['rho'])} (n={r['counts']['both']} "
            + ("models scored on dev)" if r["counts"].get("all_dev_models") else
               f"of {r['counts']['phase2']} phase-2 trials)")
            for s, r in runs.items()
        )
        rho = spearman(xs, ys)
        print(f"proxy vs dev score, Spearman: {per_run}; pooled {_rho(rho)} (n={len(xs)})")
        cands = "; ".join(f"seed {s}: " + ", ".join(f"{k} {_pct(v)}" for k, v in r["candidates"].items())
                          + f" -> {r['child_kind']}" for s, r in runs.items() if r["candidates"])
        if cands:
            print(f"dev candidates (points): {cands}")
        codes = sorted({r["code"] for r in runs.values() if r["code"]})
        if codes:
            print("runs made with: " + " | ".join(codes))
        secs = [r["seconds"] for r in runs.values() if r["seconds"]]
        if secs:
            print(f"run wall time: {', '.join(f'{s:.0f}' for s in secs)} s")
        print()
        summary.append((family, runs, pooled, rho, len(xs)))

    if summary:
        print("### summary: child - best uniform merge (test, points)\n")
        print("| family | seed diffs [95% CI] | pooled over seeds | proxy-vs-dev Spearman (pooled, n) |")
        print("|---|---|---|---|")
        for family, runs, pooled, rho, n in summary:
            cells = "; ".join(_diff(r["diffs"], r["uniform"]) for r in runs.values())
            pool = "-" if pooled is None else f"{_pct(pooled[0], True)} [{_pct(pooled[1], True)}, {_pct(pooled[2], True)}]"
            print(f"| {family} | {cells} | {pool} | {_rho(rho)} ({n}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
