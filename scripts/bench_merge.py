"""darwin-hydra's merge vs mergekit-yaml: wall time and peak RSS, end to end (issue 4, performance).

    python scripts/bench_merge.py [--cache DIR] [--reps 2] [--scale 1] [--methods ties dare_ties]

The setup: a Llama (hidden 1024, 8 layers, intermediate 2816, vocab 32000, untied head, bf16,
~168M parameters, 337 MB a checkpoint); a base plus two fine-tunes = base + Gaussian noise of 1% of
each tensor's std (norm weights, whose std is 0: 1% of their mean |value|). ``--scale K`` makes the
model K times bigger by depth: as many layers as give K x the parameters (K = 4: 48 layers, 672M
parameters), so the largest tensor (embedding, head) stays the same size. ``--grow-vocab`` instead
multiplies the layers *and* the vocabulary by K: then the largest tensors grow K-fold too, and so
does the memory of the tensors in flight. Checkpoints are written straight with safetensors (a few
seconds) and cached under ``--cache``.

Each repetition runs, interleaved (the order rotates between repetitions), every measurement in its
own process under ``/usr/bin/time`` (wall time, peak RSS of the largest process); then one more,
untimed, run of each with its process tree's summed PSS sampled every 0.1 s (memory of worker
processes included, shared pages counted once; sampling could slow a process, so it is kept apart):

- ``mergekit``: ``mergekit-yaml cfg.yml OUT [--mergekit-flags]`` with ties / dare_ties, base_model =
  base, weight 0.5 and density 0.5 for both fine-tunes, ``dtype: bfloat16`` (mergekit's defaults
  otherwise: normalize true, its own DARE rescale; the numbers differ from ours on purpose, see
  docs/merge.md; the work is the same);
- ``cli``: ``darwin-hydra 'pipeline.stages=[merge]' parents=local ... merge.method=M merge.ratio=0.5
  merge.density_a=0.5 merge.density_b=0.5 logger=none hydra.run.dir=TMP``: the whole command
  (Hydra, compatibility check, fingerprints, recipe, model card, checksums);
- ``inproc``: ``merge_to_disk`` in a fresh Python process, timed from opening the readers to the
  committed child (imports excluded; RSS is the process's, imports included); ``--processes`` picks its
  workers (forked processes or threads; default: merge_to_disk's choice, processes on Linux);
- ``floor``: the issue's "plain safetensors load -> average -> save": ``load_file`` of father and
  mother, ``(a + b) / 2`` on the bf16 tensors as loaded, ``save_file``;
- ``floor3``: the same with the merge's inputs and precision: the three parents, their mean in
  float32, cast to bf16 (context for the ratio; the goal is stated against ``floor``).

The parents' files are read once before each repetition so the page cache is warm, and every
output is deleted outside the timed region. Printed: a table of every run, then medians and the
ratios mergekit/cli (goal >= 5) and inproc/floor (goal <= 3; against the floor's median and its
fastest run, since on this VM faulting in fresh memory is at times 2x slower and the floor touches
1.2 GB); with ``--json`` also a JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_merge")

HIDDEN, LAYERS, INTER, VOCAB, HEADS = 1024, 8, 2816, 32000, 16
NOISE = 0.01  # fine-tune = base + N(0, (NOISE * std)^2)


# --------------------------------------------------------------------------------------------------
# the setup


def _layers_for(scale: int) -> int:
    """Decoder layers that make the model ``scale`` times the 8-layer one's parameter count."""
    h, i, v = HIDDEN, INTER, VOCAB
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    outside = 2 * v * h + h
    return max(1, round((scale * (outside + LAYERS * per_layer) - outside) / per_layer))


def llama_config(scale: int, grow_vocab: bool = False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS * scale if grow_vocab else _layers_for(scale),
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB * scale if grow_vocab else VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def build(root: Path, scale: int, grow_vocab: bool = False) -> dict[str, Path]:
    """base, father, mother under ``root`` (reused when complete)."""
    import torch
    from safetensors.torch import save_file

    cfg = llama_config(scale, grow_vocab)
    dirs = {role: root / role for role in ("base", "father", "mother")}
    if all((d / "model.safetensors").exists() and (d / "config.json").exists() for d in dirs.values()):
        return dirs
    shapes = llama_shapes(cfg)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    log.info("building base + 2 fine-tunes of a %.0fM-parameter bf16 llama under %s", n / 1e6, root)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    base = {}
    for name, shape in shapes.items():
        base[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
    for seed, role in ((0, "base"), (1, "father"), (2, "mother")):
        g = torch.Generator().manual_seed(1000 + seed)
        sd = {}
        for name, t in base.items():
            if role != "base":
                std = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else float(t.abs().mean())
                t = t + torch.randn(t.shape, generator=g) * (NOISE * std)
            sd[name] = t.to(torch.bfloat16)
        tmp = root / f"{role}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.rmtree(dirs[role], ignore_errors=True)
        tmp.rename(dirs[role])
        del sd
    log.info("built in %.1f s", time.perf_counter() - t0)
    return dirs


def warm(dirs: dict[str, Path]) -> None:
    for d in dirs.values():
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# --------------------------------------------------------------------------------------------------
# the measured commands

MERGEKIT_YAML = """merge_method: {method}
base_model: {base}
models:
  - model: {father}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {mother}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
"""


def cmd_mergekit(dirs, method, out, work, flags):
    yml = work / f"mergekit_{method}.yml"
    yml.write_text(MERGEKIT_YAML.format(method=method, **{k: str(v) for k, v in dirs.items()}))
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        raise SystemExit("mergekit-yaml is not on PATH: pip install mergekit (or run with --skip-mergekit)")
    return [exe, str(yml), str(out), *flags]


def cmd_cli(dirs, method, out, work, flags):
    exe = shutil.which("darwin-hydra")
    if exe is None:
        raise SystemExit("darwin-hydra is not on PATH: pip install -e .")
    return [
        exe, "pipeline.stages=[merge]", "parents=local",
        f"parents.father={dirs['father']}", f"parents.mother={dirs['mother']}", f"parents.base={dirs['base']}",
        f"merge.method={method}", "merge.ratio=0.5", "merge.density_a=0.5", "merge.density_b=0.5",
        "logger=none", f"hydra.run.dir={out}", *flags,
    ]


def cmd_inproc(dirs, method, out, work, flags):
    return [sys.executable, __file__, "--child", "inproc", "--method", method, "--out", str(out),
            "--dirs", json.dumps({k: str(v) for k, v in dirs.items()}), *flags]


def cmd_apply(dirs, method, out, work, flags):
    return [sys.executable, __file__, "--child", "apply", "--method", method, "--out", str(out),
            "--dirs", json.dumps({k: str(v) for k, v in dirs.items()})]


def cmd_floor(dirs, method, out, work, flags):
    return [sys.executable, __file__, "--child", "floor", "--out", str(out),
            "--dirs", json.dumps({k: str(v) for k, v in dirs.items()})]


def cmd_floor3(dirs, method, out, work, flags):
    return [sys.executable, __file__, "--child", "floor3", "--out", str(out),
            "--dirs", json.dumps({k: str(v) for k, v in dirs.items()})]


def child_inproc(dirs: dict, method: str, out: Path, workers: int, processes: bool | None = None) -> float:
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.merge.engine import merge_to_disk
    from darwin_hydra.merge.recipe import RatioMap, TensorRecipe

    t0 = time.perf_counter()
    father, mother, base = (CheckpointReader(dirs[r]) for r in ("father", "mother", "base"))
    recipe = TensorRecipe(method=method, ratio=0.5, density_a=0.5, density_b=0.5)
    rmap = RatioMap({n: recipe for n in father.names})
    merge_to_disk(father, mother, base, rmap, "bench", out, workers=workers, progress=False, processes=processes)
    return time.perf_counter() - t0


def child_apply(dirs: dict, method: str, calls: int = 5) -> dict:
    """In-memory mode: seconds per ``InMemoryMerger.apply`` (every tensor re-merged: a new genome
    hash and new per-tensor ratios each call) on the benchmark model and on a zoo-sized tiny Llama,
    and per call when nothing changed."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.merge.engine import InMemoryMerger
    from darwin_hydra.merge.recipe import RatioMap, TensorRecipe
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny

    def timed(root: dict, dtype: torch.dtype, n_calls: int) -> dict:
        readers = {r: CheckpointReader(root[r]) for r in ("father", "mother", "base")}
        model = AutoModelForCausalLM.from_pretrained(root["father"], dtype=dtype).eval()
        names = list(readers["father"].names)
        tensors = {r: {n: rd.get(n) for n in names} for r, rd in readers.items()}
        merger = InMemoryMerger(model, tensors["father"], tensors["mother"], tensors["base"])
        rng = random.Random(0)

        def rmap():
            return RatioMap({n: TensorRecipe(method=method, ratio=rng.uniform(0.2, 0.8), density_a=0.5, density_b=0.5)
                             for n in names})

        merger.apply(rmap(), "warm-up")
        maps = [rmap() for _ in range(n_calls)]
        t0 = time.perf_counter()
        for i, m in enumerate(maps):
            merger.apply(m, f"trial-{i}")
        per_call = (time.perf_counter() - t0) / n_calls
        t0 = time.perf_counter()
        for _ in range(n_calls):
            merger.apply(maps[-1], f"trial-{n_calls - 1}")
        noop = (time.perf_counter() - t0) / n_calls
        return {"tensors": len(names), "params": sum(t.numel() for t in tensors["father"].values()),
                "apply_s": per_call, "unchanged_s": noop}

    big = timed(dirs, torch.bfloat16, calls)
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny("llama", Path(tmp) / "base", vocab_size=64, num_layers=8)  # ~zoo size (hidden 32)
        tiny = {"base": base, "father": perturbed_copy(base, Path(tmp) / "father", seed=1),
                "mother": perturbed_copy(base, Path(tmp) / "mother", seed=2)}
        small = timed(tiny, torch.float32, 50)
    return {"inner_s": big["apply_s"], "apply": {"bench": big, "tiny": small}}


def child_floor(dirs: dict, out: Path, three: bool) -> float:
    import torch
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    if three:
        sds = [load_file(Path(dirs[r]) / "model.safetensors") for r in ("father", "mother", "base")]
        child = {n: ((sds[0][n].float() + sds[1][n].float() + sds[2][n].float()) / 3).to(torch.bfloat16) for n in sds[0]}
    else:
        a, b = (load_file(Path(dirs[r]) / "model.safetensors") for r in ("father", "mother"))
        child = {n: (a[n] + b[n]) / 2 for n in a}
    out.mkdir(parents=True)
    save_file(child, out / "model.safetensors", metadata={"format": "pt"})
    return time.perf_counter() - t0


COMMANDS = {"mergekit": cmd_mergekit, "cli": cmd_cli, "inproc": cmd_inproc, "apply": cmd_apply, "floor": cmd_floor,
            "floor3": cmd_floor3}
FLOORS = ("floor", "floor3")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
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


def _pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` (its private pages plus its share of pages shared with other
    processes, e.g. forked workers' and the parent's), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_sampled(cmd: list[str], stdout, stderr, every: float | None = 0.1) -> tuple[int, int | None]:
    """Run ``cmd``; its exit status and, when ``every`` is set, the peak over samples every ``every``
    s of the summed PSS of its process tree (MB): the memory of a command whose workers are
    processes, counted once. Reading smaps_rollup walks the process's page tables under its mmap
    lock, which can slow a process that faults in much memory, so timed runs do not sample."""
    p = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
    if every is None:
        return p.wait(), None
    peak = 0
    while p.poll() is None:
        peak = max(peak, sum(_pss_kb(q) for q in _tree(p.pid)))
        time.sleep(every)
    return p.returncode, round(peak / 1024)


def measure(tool: str, method: str, dirs: dict, work: Path, flags: list[str], sample_pss: bool = False) -> dict:
    """Run one measurement in its own process under /usr/bin/time; the output is deleted afterwards.
    ``sample_pss``: a memory run (the process tree's PSS sampled; its time is not representative)."""
    out = work / f"out_{tool}_{method}"
    shutil.rmtree(out, ignore_errors=True)
    timing = work / "time.txt"
    cmd = COMMANDS[tool](dirs, method, out, work, flags)
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t0 = time.perf_counter()
        rc, pss_mb = run_sampled(["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *cmd], so, se,
                                 0.1 if sample_pss else None)
        wall = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if rc != 0:
        raise RuntimeError(f"{tool} {method} failed ({rc}):\n{' '.join(cmd)}\n{stdout[-2000:]}{stderr[-4000:]}")
    elapsed, maxrss_kb = timing.read_text().split()[-2:]
    inner, extra = None, None
    for line in stdout.splitlines():
        if line.startswith("{") and '"inner_s"' in line:
            got = json.loads(line)
            inner, extra = got["inner_s"], got.get("apply")
    # identity of the child (its checksums.json), to see that cli and inproc did the same merge
    sums = next(iter(out.rglob("checksums.json")), None)
    child = None
    if sums is not None:
        tensors = json.loads(sums.read_text())["tensors"]
        child = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()[:16]
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": tool, "method": method if tool not in FLOORS else "-", "wall_s": round(wall, 2),
            "inner_s": None if inner is None else round(inner, 2), "peak_rss_mb": round(int(maxrss_kb) / 1024),
            "peak_pss_mb": pss_mb,
            "load1": round(load, 2), "child": child, "apply": extra}


# --------------------------------------------------------------------------------------------------
# report


def summarise(rows: list[dict], methods: list[str]) -> dict:
    def med(tool, method, key="wall_s"):
        xs = [r[key] for r in rows if r["tool"] == tool and r["method"] == method and r[key] is not None]
        if not xs:
            return None
        m = statistics.median(xs)
        return (round(m) if key.endswith("_mb") else m), min(xs), max(xs)  # MB stay whole (an even count's median)

    out = {}
    for f in FLOORS:
        out[f] = {"inner_s": med(f, "-", "inner_s"), "wall_s": med(f, "-"), "peak_rss_mb": med(f, "-", "peak_rss_mb")}
    floor = out["floor"]["inner_s"]
    floor3 = out["floor3"]["inner_s"]
    for m in methods:
        mk, cli, ip = med("mergekit", m), med("cli", m), med("inproc", m, "inner_s")
        out[m] = {
            "mergekit_s": mk, "cli_s": cli, "inproc_s": ip,
            "mergekit_rss_mb": med("mergekit", m, "peak_rss_mb"), "cli_rss_mb": med("cli", m, "peak_rss_mb"),
            "inproc_rss_mb": med("inproc", m, "peak_rss_mb"),
            "pss_mb": {t: med(t, m, "peak_pss_mb") for t in ("mergekit", "cli", "inproc")},
            "speedup_mergekit_over_cli": None if not (mk and cli) else round(mk[0] / cli[0], 2),
            "inproc_over_floor": None if not (ip and floor) else round(ip[0] / floor[0], 2),
            # the floor's fastest run: on this VM, fresh memory is sometimes much slower to fault in
            # (the floor touches 1.2 GB: 0.27-0.30 s or 0.6-0.75 s, alternating), the merge little
            "inproc_over_floor_min": None if not (ip and floor) else round(ip[0] / floor[1], 2),
            "inproc_over_floor3": None if not (ip and floor3) else round(ip[0] / floor3[0], 2),
        }
    return out


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, tuple):
        if isinstance(x[0], float):
            return f"{x[0]:.2f}" if x[1] == x[2] else f"{x[0]:.2f} [{x[1]:.2f}-{x[2]:.2f}]"
        return f"{x[0]}" if x[1] == x[2] else f"{x[0]} [{x[1]}-{x[2]}]"
    return str(x)


def report(summary: dict, methods: list[str], scale: int, reps: int, mergekit_flags: str, grow_vocab: bool) -> None:
    cfg = llama_config(scale, grow_vocab)
    params = sum(math.prod(s) for s in llama_shapes(cfg).values())
    print(f"\nscale x{scale} ({cfg['num_hidden_layers']} layers, vocabulary {cfg['vocab_size']}): "
          f"{params / 1e6:.0f}M parameters, {params * 2 / 1e6:.0f} MB a checkpoint; "
          f"median [min-max] of {reps} repetition(s); mergekit-yaml flags: {mergekit_flags or '(none)'}")
    cols = [("mergekit s", "mergekit_s"), ("cli s", "cli_s"), ("inproc s", "inproc_s"), ("mergekit MB", "mergekit_rss_mb"),
            ("cli MB", "cli_rss_mb"), ("inproc MB", "inproc_rss_mb")]
    print(f"{'method':<10}" + "".join(f"{c:>22}" for c, _ in cols)
          + f"{'mergekit/cli':>14}{'inproc/floor':>14}{'/floor min':>12}{'inproc/floor3':>15}")
    for m in methods:
        s = summary[m]
        print(f"{m:<10}" + "".join(f"{fmt(s[k]):>22}" for _, k in cols)
              + f"{fmt(s['speedup_mergekit_over_cli']):>14}{fmt(s['inproc_over_floor']):>14}"
              f"{fmt(s['inproc_over_floor_min']):>12}{fmt(s['inproc_over_floor3']):>15}")
    for m in methods:
        print(f"{m}: peak PSS of the whole process tree (workers included, shared pages counted once), MB: "
              + ", ".join(f"{t} {fmt(v)}" for t, v in summary[m]["pss_mb"].items() if v))
    for f, what in (("floor", "load father+mother -> (a+b)/2 in bf16 -> save_file"),
                    ("floor3", "load 3 -> float32 mean -> bf16 -> save_file")):
        x = summary[f]
        if x["inner_s"]:
            print(f"{f} ({what}): {fmt(x['inner_s'])} s in process, {fmt(x['wall_s'])} s with start-up, "
                  f"peak RSS {fmt(x['peak_rss_mb'])} MB")
    print("s = seconds: mergekit and cli whole commands; inproc and floors from opening the inputs to the "
          "written child (imports excluded). MB = peak RSS of the largest process (/usr/bin/time).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/darwin_hydra/bench_merge"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--scale", type=int, default=1, help="K: K x the parameters, by depth (see --grow-vocab)")
    ap.add_argument("--grow-vocab", action="store_true", help="scale layers and vocabulary by K (largest tensors K x)")
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties"])
    ap.add_argument("--tools", nargs="+", default=["mergekit", "cli", "inproc", "apply", "floor", "floor3"],
                    choices=list(COMMANDS))
    ap.add_argument("--mergekit-flags", default="", help="extra mergekit-yaml flags, e.g. '-j 2 --async-write'")
    ap.add_argument("--cli-overrides", default="", help="extra Hydra overrides for the cli run, e.g. 'merge.workers=1'")
    ap.add_argument("--workers", type=int, default=0, help="merge_to_disk workers for inproc (0 = one per core)")
    ap.add_argument("--processes", choices=["auto", "on", "off"], default="auto",
                    help="inproc's workers: forked processes (on), threads (off) or merge_to_disk's choice (auto)")
    ap.add_argument("--json", action="store_true", help="also print every run and the summary as one JSON line")
    ap.add_argument("--no-pss", action="store_true", help="skip the untimed memory run (process tree PSS) of each tool")
    # internal: one in-process measurement
    ap.add_argument("--child", choices=["inproc", "apply", "floor", "floor3"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dirs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        dirs = json.loads(args.dirs)
        if args.child == "inproc":
            procs = {"auto": None, "on": True, "off": False}[args.processes]
            print(json.dumps({"inner_s": child_inproc(dirs, args.method, args.out, args.workers, procs)}))
        elif args.child == "apply":
            print(json.dumps(child_apply(dirs, args.method)))
        else:
            print(json.dumps({"inner_s": child_floor(dirs, args.out, three=args.child == "floor3")}))
        return
    root = args.cache.expanduser() / (f"llama_x{args.scale}" + ("v" if args.grow_vocab and args.scale > 1 else ""))
    dirs = build(root, args.scale, args.grow_vocab)
    work = Path(tempfile.mkdtemp(prefix="runs_", dir=root))
    flags = {"mergekit": args.mergekit_flags.split(), "cli": args.cli_overrides.split(),
             "inproc": ["--workers", str(args.workers), "--processes", args.processes], "apply": [], "floor": [],
             "floor3": []}
    plan = [(t, m) for m in args.methods for t in args.tools if t not in FLOORS and t != "apply"]
    plan += [("apply", args.methods[-1])] if "apply" in args.tools else []
    plan += [(t, "-") for t in args.tools if t in FLOORS]
    log.info("%d cores, load average %.2f; %d runs a repetition, %d repetition(s)", os.cpu_count(),
             os.getloadavg()[0], len(plan), args.reps)
    rows, memory = [], []
    try:
        for rep in range(args.reps):
            k = rep % len(plan)
            for tool, method in plan[k:] + plan[:k]:  # rotate so no tool always runs first
                warm(dirs)
                row = measure(tool, method, dirs, work, flags[tool])
                row["rep"] = rep
                rows.append(row)
                log.info("%-9s %-10s %7.2f s (in process %s s)  peak RSS %5d MB  load %.2f", tool, row["method"],
                         row["wall_s"], fmt(row["inner_s"]), row["peak_rss_mb"], row["load1"])
        if not args.no_pss:
            for tool, method in plan:  # one more, untimed, run of each with the tree's memory sampled
                warm(dirs)
                row = measure(tool, method, dirs, work, flags[tool], sample_pss=True)
                memory.append(row)
                log.info("%-9s %-10s memory run: peak PSS of the process tree %5d MB", tool, row["method"],
                         row["peak_pss_mb"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pss = {(m["tool"], m["method"]): m["peak_pss_mb"] for m in memory}
    for r in rows:
        r["peak_pss_mb"] = pss.get((r["tool"], r["method"]))
    summary = summarise(rows, args.methods)
    report(summary, args.methods, args.scale, args.reps, args.mergekit_flags, args.grow_vocab)
    for r in rows:
        if r["tool"] == "apply" and r["apply"]:
            for what, a in r["apply"].items():
                print(f"in-memory apply ({r['method']}, {what} model: {a['tensors']} tensors, {a['params'] / 1e6:.2f}M "
                      f"parameters): {a['apply_s'] * 1e3:.1f} ms a call re-merging every tensor, "
                      f"{a['unchanged_s'] * 1e3:.2f} ms when nothing changed (rep {r['rep']})")
    for m in args.methods:
        kids = {(r["tool"], r["child"]) for r in rows if r["method"] == m and r["tool"] in ("cli", "inproc")}
        if {t for t, _ in kids} == {"cli", "inproc"}:
            same = len({c for _, c in kids}) == 1
            print(f"{m}: cli and inproc children {'identical (checksums.json)' if same else 'differ'}"
                  + ("" if same or m != "dare_ties" else " (expected: their masks are seeded by different hashes)"))
    if args.json:
        print(json.dumps({"scale": args.scale, "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
