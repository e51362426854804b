"""The search's trial session at three sizes: peak RSS and per-trial apply time (issue 16).

    python scripts/bench_scale.py [--root /tmp/darwin_bench_scale] [--sizes 0.17 0.7 1.4] [--trials 3]

The setup: random Llama-like checkpoints (bf16, untied head, vocab 32000), a base and two fine-tunes
(base + Gaussian noise of 1% of each tensor's std), written under ``--root`` (never the repository)
in 1 GB shards with the zoo's character tokenizer, and cached there. Sizes (parameters):
0.17B = hidden 1024 x 8 layers (scripts/bench_merge.py's model), 0.7B = hidden 2048 x 11 layers,
1.4B = hidden 2048 x 24 layers (intermediate 2.75 x hidden).

Each measurement runs in its own process (the page cache warm), sampled from here every 50 ms
(the summed RSS of its process tree) and its peak RSS read when it ends (``wait4``):

- ``session``: what a trial session holds. The father loaded as the trial model (bf16,
  ``models.load_model``) and an ``InMemoryMerger`` on the parents' readers (three parents, then
  two: RSS must not grow with them). Then trials: ``full`` re-merges every tensor (a new genome:
  new ratios and hash), ``partial`` a quarter of the tensors (the rest's recipes and hash
  unchanged), for ``dare_ties`` and ``linear`` recipes. Each trial is compared with a plain copy of
  the same changed bytes into the same parameters (one ``pread`` a tensor from the father's file in
  the page cache straight into the parameter's memory: no conversion), measured in the same
  process right after it.
- ``held`` (smallest size only): the session as it was before issue 16, every parent tensor read
  into memory (``CheckpointReader.get``) and handed to the merger as mappings.
- ``export``: ``merge_to_disk`` of a dare_ties child (forked workers), its tree's peak PSS and its
  largest process's peak RSS.

Goals: session RSS <= 1.3 x one checkpoint + 0.5 GB at every size, flat in the number of parents;
apply time within 2x of copying the changed bytes; export RSS flat. ``--json`` also prints the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import llama_shapes  # scripts/ is on sys.path when run as a script

log = logging.getLogger("bench_scale")

SIZES = {  # name -> (hidden, layers)
    "0.17": (1024, 8),
    "0.7": (2048, 11),
    "1.4": (2048, 24),
}
VOCAB = 32000
NOISE = 0.01
SHARD = 1 << 30
GB = 1e9


def llama_config(hidden: int, layers: int) -> dict:
    heads = hidden // 64
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": int(hidden * 2.75), "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "head_dim": 64, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": 0.02, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "dtype": "bfloat16",
    }


def build(root: Path, size: str) -> dict[str, Path]:
    """base, father, mother of ``size`` under ``root`` (reused when complete), written shard by shard."""
    import torch
    from safetensors.torch import save_file

    from darwin_hydra.zoo.tokenizer import char_tokenizer

    dirs = {role: root / size / role for role in ("base", "father", "mother")}
    if all((d / "model.safetensors.index.json").exists() for d in dirs.values()):
        return dirs
    cfg = llama_config(*SIZES[size])
    sh = llama_shapes(cfg)
    log.info("building base + 2 fine-tunes of a %.2fB-parameter bf16 llama under %s",
             sum(torch.Size(s).numel() for s in sh.values()) / 1e9, root / size)
    t0 = time.perf_counter()
    tmp = {role: d.with_name(d.name + ".tmp") for role, d in dirs.items()}
    for d in tmp.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    noise = {"father": torch.Generator().manual_seed(1001), "mother": torch.Generator().manual_seed(1002)}
    groups, cur, size_b = [], [], 0
    for name, s in sh.items():
        nbytes = torch.Size(s).numel() * 2
        if cur and size_b + nbytes > SHARD:
            groups.append(cur)
            cur, size_b = [], 0
        cur.append(name)
        size_b += nbytes
    groups.append(cur)
    weight_map = {}
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        sds = {role: {} for role in dirs}
        for name in names:
            s = sh[name]
            base = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
            sds["base"][name] = base.to(torch.bfloat16)
            std = float(base.std()) if base.numel() > 1 and float(base.std()) > 0 else float(base.abs().mean())
            for role in ("father", "mother"):
                sds[role][name] = (base + torch.randn(s, generator=noise[role]) * (NOISE * std)).to(torch.bfloat16)
            weight_map[name] = fname
        for role, sd in sds.items():
            save_file(sd, tmp[role] / fname, metadata={"format": "pt"})
        del sds
    total = sum(torch.Size(s).numel() * 2 for s in sh.values())
    for role, d in tmp.items():
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}, indent=1))
        char_tokenizer().save_pretrained(d)
        shutil.rmtree(dirs[role], ignore_errors=True)
        d.rename(dirs[role])
    log.info("built in %.1f s", time.perf_counter() - t0)
    return dirs


def warm(dirs: dict[str, Path]) -> None:
    for d in dirs.values():
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# --------------------------------------------------------------------------------------------------
# the measured processes


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child_session(dirs: dict, parents: int, trials: int, methods: list[str]) -> dict:
    import torch

    from darwin_hydra.io.format import pread_into
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.merge.engine import InMemoryMerger
    from darwin_hydra.merge.recipe import RatioMap, TensorRecipe
    from darwin_hydra.models import load_model

    rss0 = _status("VmRSS")
    readers = {r: CheckpointReader(dirs[r]) for r in ("father", "mother", "base")}
    t0 = time.perf_counter()
    model = load_model(dirs["father"], "bfloat16")
    merger = InMemoryMerger(model, readers["father"], readers["mother"], readers["base"] if parents == 3 else None)
    load_s = time.perf_counter() - t0
    names = list(merger.views)
    father = readers["father"]
    fds = {f: os.open(f, os.O_RDONLY) for f in {father.entry(n).file for n in names}}

    def plain_copy(changed: list[str]) -> float:
        """The changed tensors' bytes from the father's files (page cache) straight into the parameters:
        one pread a tensor, no conversion (the floor of any trial that writes those bytes)."""
        t = time.perf_counter()
        for n in changed:
            e = father.entry(n)
            raw = merger.views[n].view(-1).view(torch.uint8).numpy()
            pread_into(fds[e.file], memoryview(raw), e.start, e.file, n)
        return time.perf_counter() - t

    rng = random.Random(0)

    def recipe(method):
        return TensorRecipe(method=method, ratio=rng.uniform(0.2, 0.8), density_a=0.5, density_b=0.5)

    out = {"parents": parents, "load_s": load_s, "rss_imports": rss0, "tensors": len(names),
           "params": sum(v.numel() for v in merger.views.values()), "held_bytes": merger.held_bytes}
    t = time.perf_counter()
    current = RatioMap({n: recipe(methods[0]) for n in names})
    merger.apply(current, "first")
    out["first_apply_s"] = time.perf_counter() - t
    out["rss_after_first"] = _status("VmRSS")
    for method in methods:
        for kind, share in (("full", 1.0), ("partial", 0.25)):
            applies, copies = [], []
            h = f"{method}-partial"
            if share < 1.0:  # the unchanged tensors keep their recipes and their masks' hash (untimed)
                merger.apply(current, h)
            for i in range(trials):
                changed = names if share == 1.0 else rng.sample(names, max(1, int(len(names) * share)))
                new = RatioMap({**current, **{n: recipe(method) for n in changed}})
                t = time.perf_counter()
                merged = merger.apply(new, h if share < 1.0 else f"{method}-full-{i}")
                applies.append(time.perf_counter() - t)
                assert merged == len(changed), (merged, len(changed))
                copies.append(plain_copy(changed))
                current = new
            nbytes = sum(merger.views[n].numel() * merger.views[n].element_size() for n in changed)
            out[f"{method}_{kind}"] = {"apply_s": statistics.median(applies), "copy_s": statistics.median(copies),
                                       "changed_bytes": nbytes, "apply_all": applies, "copy_all": copies}
    out["rss_end"] = _status("VmRSS")
    out["hwm"] = _status("VmHWM")
    return out


def child_held(dirs: dict) -> dict:
    """The session before issue 16: every parent tensor in fresh memory."""
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.merge.engine import InMemoryMerger
    from darwin_hydra.merge.recipe import RatioMap, TensorRecipe
    from darwin_hydra.models import load_model

    readers = {r: CheckpointReader(dirs[r]) for r in ("father", "mother", "base")}
    model = load_model(dirs["father"], "bfloat16")
    from darwin_hydra.io.layout import param_views

    names = list(param_views(model))
    tensors = {r: {n: rd.get(n) for n in names} for r, rd in readers.items()}
    merger = InMemoryMerger(model, tensors["father"], tensors["mother"], tensors["base"])
    t = time.perf_counter()
    merger.apply(RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.5, density_a=0.5, density_b=0.5)
                           for n in names}), "held")
    return {"apply_s": time.perf_counter() - t, "hwm": _status("VmHWM")}


def child_export(dirs: dict, out: Path) -> dict:
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.merge.engine import merge_to_disk
    from darwin_hydra.merge.recipe import RatioMap, TensorRecipe

    readers = {r: CheckpointReader(dirs[r]) for r in ("father", "mother", "base")}
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.5, density_a=0.5, density_b=0.5)
                     for n in readers["father"].names})
    t = time.perf_counter()
    merge_to_disk(readers["father"], readers["mother"], readers["base"], rmap, "export", out, progress=False)
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return {"export_s": dt, "hwm": _status("VmHWM")}


SEARCH_OVERRIDES = [  # the search run: Darwin's shipped probe prompts, test_tiny's budgets, proxy trials only
    "probes=darwin_v6", "experiment=test_tiny", "pipeline.stages=[preflight,scan,prescribe,search]",
    "parents.dtype=bfloat16", "logger=none", "mri.progress=false", "threads=2",
    # two probe sets of two short prompts: the MRI of a 1.4B model on two shared cores stays in minutes
    "~probes.sets.CODE", "~probes.sets.KNOWLEDGE", "~probes.sets.LANGUAGE", "probes.sets.REASONING.n=2",
    "probes.sets.MATH.n=2", "probes.max_length=32", "optimizer.proxy_prompts=2",
    "optimizer.phase2_trials=0", "optimizer.phase2_top_k=0",
]


def child_search(dirs: dict, out: Path) -> dict:
    from darwin_hydra.run import run

    overrides = ["parents=local", *(f"parents.{r}={d}" for r, d in dirs.items()), *SEARCH_OVERRIDES,
                 f"paths.cache_dir={out.parent / 'cache'}"]
    t0 = time.time()
    ctx = run(overrides, out)
    rec = json.loads((out / "search.json").read_text())
    merger = ctx.trial_session().merger
    return {"t_start": t0, "stages": list(ctx.results.seconds.items()), "trials": len(rec["history"]),
            "last_apply_s": merger.seconds_last, "last_merged": merger.merged_last, "hwm": _status("VmHWM"),
            "overrides": overrides}


# --------------------------------------------------------------------------------------------------
# running them


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _smaps(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(args: list[str]) -> dict:
    """Run this script as a child; its JSON, with the peak summed RSS and PSS of its process tree
    (sampled every 50 ms) and its own peak RSS (wait4)."""
    p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE)
    peak_rss = peak_pss = 0
    series = []
    while p.poll() is None:
        tree = _tree(p.pid)
        rss = sum(_smaps(q, "Rss") for q in tree)
        peak_rss = max(peak_rss, rss)
        peak_pss = max(peak_pss, sum(_smaps(q, "Pss") for q in tree))
        series.append((time.time(), rss))
        time.sleep(0.05)
    out = p.stdout.read().decode()
    if p.returncode:
        raise RuntimeError(f"child {args} failed ({p.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(tree_rss=peak_rss, tree_pss=peak_pss)
    if "stages" in res:  # the peak of the tree's RSS during each stage
        t, peaks = res["t_start"], {}
        for name, sec in res["stages"]:
            peaks[name] = max((r for ts, r in series if t <= ts <= t + sec), default=0)
            t += sec
        res["stage_peak_rss"] = peaks
    return res


def measure_search(root: Path, size: str) -> dict:
    dirs = build(root, size)
    ckpt = sum(f.stat().st_size for f in dirs["father"].glob("*.safetensors"))
    warm(dirs)
    out = root / size / f"search-{time.strftime('%H%M%S')}"
    res = run_child(["--child", "search", "--out", str(out), "--dirs", json.dumps({k: str(v) for k, v in dirs.items()})])
    res.update(size=size, ckpt_bytes=ckpt, goal_bytes=int(1.3 * ckpt + 0.5 * GB), run_dir=str(out))
    return res


def report_search(r: dict) -> None:
    f = lambda b: f"{b / GB:.2f}"  # noqa: E731
    print(f"\n{r['size']}B three-parent search (darwin_hydra.run.run, {r['trials']} proxy trials), run dir {r['run_dir']}:")
    print(f"  peak RSS {f(r['hwm'])} GB (process tree {f(r['tree_rss'])} GB) against the goal {f(r['goal_bytes'])} GB "
          f"(checkpoint {f(r['ckpt_bytes'])} GB): {'within' if max(r['hwm'], r['tree_rss']) <= r['goal_bytes'] else 'OVER'}")
    for name, sec in r["stages"]:
        print(f"  {name:<10} {sec:7.1f} s   peak RSS {f(r['stage_peak_rss'].get(name, 0))} GB")
    print(f"  last trial's apply: {r['last_apply_s']:.1f} s for {r['last_merged']} tensors; load average {loadavg()}")


def measure(root: Path, size: str, trials: int, methods: list[str]) -> dict:
    dirs = build(root, size)
    ckpt = sum(f.stat().st_size for f in dirs["father"].glob("*.safetensors"))
    warm(dirs)
    spec = ["--dirs", json.dumps({k: str(v) for k, v in dirs.items()})]
    row = {"size": size, "ckpt_bytes": ckpt, "goal_bytes": int(1.3 * ckpt + 0.5 * GB)}
    row["session3"] = run_child(["--child", "session", "--parents", "3", "--trials", str(trials),
                                 "--methods", *methods, *spec])
    warm(dirs)
    row["session2"] = run_child(["--child", "session", "--parents", "2", "--trials", "1", "--methods", methods[0],
                                 *spec])
    if size == min(SIZES, key=float):
        warm(dirs)
        row["held"] = run_child(["--child", "held", *spec])
    warm(dirs)
    row["export"] = run_child(["--child", "export", "--out", str(root / size / "child"), *spec])
    return row


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def report(rows: list[dict], methods: list[str]) -> None:
    f = lambda b: f"{b / GB:.2f}"  # noqa: E731
    print(f"\nload average at the end: {loadavg()} (2 cores, shared)")
    print("\n| size | params | checkpoint GB | goal GB (1.3 x ckpt + 0.5) | session peak RSS GB, 3 parents | 2 parents "
          "| within goal | before issue 16 (parents held) | export: largest process / tree PSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s3, s2 = r["session3"], r["session2"]
        held = f(r["held"]["hwm"]) if "held" in r else "-"
        print(f"| {r['size']}B | {s3['params'] / 1e9:.3f}B | {f(r['ckpt_bytes'])} | {f(r['goal_bytes'])} | "
              f"{f(s3['hwm'])} | {f(s2['hwm'])} | {'yes' if max(s3['hwm'], s2['hwm']) <= r['goal_bytes'] else 'NO'} "
              f"| {held} | {f(r['export']['hwm'])} / {f(r['export']['tree_pss'])} |")
    print("\n| size | trial | changed GB | apply s | plain copy s | apply / copy | apply GB/s of changed bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s3 = r["session3"]
        for m in methods:
            for kind in ("full", "partial"):
                x = s3[f"{m}_{kind}"]
                print(f"| {r['size']}B | {m} {kind} | {f(x['changed_bytes'])} | {x['apply_s']:.2f} | {x['copy_s']:.3f} | "
                      f"{x['apply_s'] / x['copy_s']:.1f}x | {x['changed_bytes'] / x['apply_s'] / GB:.2f} |")
    print("\nfirst trial (every tensor, the model's pages copied from the father's mapped file):",
          ", ".join(f"{r['size']}B {r['session3']['first_apply_s']:.2f} s" for r in rows))
    print("load (model + merger):", ", ".join(f"{r['size']}B {r['session3']['load_s']:.2f} s" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/darwin_bench_scale")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["dare_ties", "linear"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--search", choices=list(SIZES), help="instead: a three-parent search of this size (the issue's "
                    "darwin_hydra.run.run up to search, proxy trials) and its peak RSS per stage")
    ap.add_argument("--child", choices=["session", "held", "export", "search"], help=argparse.SUPPRESS)
    ap.add_argument("--dirs", help=argparse.SUPPRESS)
    ap.add_argument("--parents", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import gc

        gc.freeze()
        dirs = {k: Path(v) for k, v in json.loads(args.dirs).items()}
        if args.child == "session":
            res = child_session(dirs, args.parents, args.trials, args.methods)
        elif args.child == "held":
            res = child_held(dirs)
        elif args.child == "search":
            res = child_search(dirs, Path(args.out))
        else:
            res = child_export(dirs, Path(args.out))
        print(json.dumps(res))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.info("load average at the start: %s", loadavg())
    if args.search:
        res = measure_search(Path(args.root), args.search)
        report_search(res)
        if args.json:
            print(json.dumps(res))
        return
    rows = []
    for size in args.sizes:
        rows.append(measure(Path(args.root), size, args.trials, args.methods))
        log.info("%sB done (load average %s)", size, loadavg())
    report(rows, args.methods)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
