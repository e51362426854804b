"""The CUDA paths end to end, on the faithful tiny stand-ins of the seed checkpoints, in a few minutes.

    python scripts/gpu_check.py [--work DIR] [--device cuda|cuda:N|cpu]

For when a GPU machine is at hand (CI skips it without one: tests/test_trial_memory.py). Every check
builds its parents with ``darwin_hydra.testing.hub`` (the Hub's own layouts of Qwen3.5-9B,
Gemma-4-31B-it and Qwen3.5-35B-A3B, scaled down; a base, and the father and mother as its perturbed
fine-tunes) and compares the GPU's result with the CPU's:

1. export: ``merge_to_disk(device=cuda)`` writes the CPU export's files bit for bit (every tensor's
   sha256), for Darwin's recipes, TIES, transplants and copied router rows (qwen3.5-35b-a3b, fused
   experts);
2. trial session: ``TrialSession`` with ``memory.device_map=auto`` and a GPU limit puts the trial
   model on the GPU, streams the parents from their files into it, and holds the CPU export's child
   bit for bit (gemma-4-31b-it); then a model split over the GPU and the CPU (half the decoder
   layers moved): every tensor merged on its own device, same bits;
3. MRI: ``run_scan`` on the GPU, the delta probe's reference swapped in a layer at a time, whole on
   the device and spread by ``device_map=auto``: the CPU scan's numbers within 1e-3 (qwen3.5-9b, the
   hybrid attention / Gated DeltaNet stack);
4. evaluation: lm-eval on the GPU with ``batch_size="auto"`` (lm-eval finds the largest batch that
   fits): the CPU's per-item scores on the tiny zoo's dev tasks;
5. pipeline: ``darwin-hydra`` preflight (the memory plan with the GPU's free memory) -> scan ->
   prescribe -> search (proxy trials) with ``device=cuda memory.device_map=auto`` (qwen3.5-35b-a3b).

Prints one line per check (ok, or FAILED and why), then a JSON summary; exits 1 when a check failed.
Without CUDA it prints "no CUDA device: skipped" and exits 0; ``--device cpu`` runs the checks on the
CPU against themselves (to debug this script where no GPU is).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

log = logging.getLogger("gpu_check")


# two of Darwin's probe sets, three prompts each, 32 tokens: the paths, not the numbers, are checked
SMALL_PROBES = ["~probes.sets.CODE", "~probes.sets.KNOWLEDGE", "~probes.sets.LANGUAGE", "probes.sets.REASONING.n=3",
                "probes.sets.MATH.n=3", "probes.max_length=32"]


def _parents(work: Path, name: str):
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.testing.hub import perturbed_mother, save_hub_model

    root = work / name
    if not (root / "mother").exists():
        save_hub_model(name, root / "base", seed=0)
        perturbed_mother(root / "base", root / "father", scale=0.05, seed=1)
        perturbed_mother(root / "base", root / "mother", scale=0.05, seed=2)
    return {r: CheckpointReader(root / r) for r in ("base", "father", "mother")}


def _mixed_map(names):
    from darwin_hydra.merge.recipe import RatioMap, TensorRecipe

    kinds = [TensorRecipe(method="dare_ties", ratio=0.4, density_a=0.6, density_b=0.5, method_weight=0.7),
             TensorRecipe(method="ties", ratio=0.5, density_b=0.5),
             TensorRecipe(method="linear", ratio=0.3),
             TensorRecipe(method="dare_linear", ratio=0.6, density_b=0.8),
             TensorRecipe(method="dare_ties", ratio=0.9, t_hi=0.85)]
    rmap = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    gate = next((n for n in names if n.endswith("mlp.gate.weight")), None)
    if gate is not None:
        rmap[gate] = TensorRecipe(method="dare_ties", ratio=0.5, rows_from=(("father", (0, 1)),))
    return RatioMap(rmap)


def _bits(t):
    import torch

    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_state(model, ref: dict, skip=()) -> list[str]:
    """Names whose bits differ between ``model`` (any devices) and ``ref`` (CPU)."""
    import torch

    bad = []
    for k, v in model.state_dict().items():
        if k in skip or k not in ref:
            continue
        if not torch.equal(_bits(v.detach().cpu()), _bits(ref[k])):
            bad.append(k)
    return bad


# --------------------------------------------------------------------------------------------------
# the checks


def check_export(work: Path, device: str) -> str:
    from darwin_hydra.merge.engine import merge_to_disk

    p = _parents(work, "qwen3.5-35b-a3b")
    rmap = _mixed_map(p["father"].names)
    sums = {}
    for dev in ("cpu", device):
        out = merge_to_disk(p["father"], p["mother"], p["base"], rmap, "gpu-check", work / f"export-{dev}",
                            device=dev, workers=1 if dev != "cpu" else 0, progress=False, overwrite=True)
        sums[dev] = json.loads((out / "checksums.json").read_text())["tensors"]
    differ = [n for n in sums["cpu"] if sums["cpu"][n] != sums[device][n]]
    if differ:
        raise AssertionError(f"{len(differ)} tensor(s) differ from the CPU export: {differ[:5]}")
    return f"{len(sums['cpu'])} tensors, every sha256 equal to the CPU export's"


def check_session(work: Path, device: str) -> str:
    import torch

    from darwin_hydra.arch import num_layers
    from darwin_hydra.config import compose
    from darwin_hydra.merge.engine import InMemoryMerger, merge_to_disk
    from darwin_hydra.models import load_model, model_devices
    from darwin_hydra.mri.probes import text_decoder
    from darwin_hydra.search.genome import GenomeSpace
    from darwin_hydra.search.recipe import BreedingPlan
    from darwin_hydra.search.session import TrialSession

    p = _parents(work, "gemma-4-31b-it")
    father = p["father"]
    L = num_layers(father.config)
    space = GenomeSpace.from_config(compose([]).genome, L)
    plan = BreedingPlan(space=space, names=tuple(father.names), num_layers=L, r_mri={n: 0.5 for n in father.names},
                        t_lo=0.15, t_hi=0.85, fingerprints={r: x.fingerprint() for r, x in p.items()})
    gpu = device.startswith("cuda")
    limit = [f"memory.max_memory.{device.partition(':')[2] or 0}=8GiB"] if gpu else ["memory.max_memory.cpu=8GiB"]
    memory = compose(["memory.device_map=auto", *limit]).memory
    session = TrialSession(p, plan, dtype=torch.bfloat16, device=device, memory=memory)
    devices = model_devices(session.model)
    if gpu and any(not d.startswith("cuda") for d in devices):
        raise AssertionError(f"the trial model is on {devices}, not on the GPU alone")
    values = {g: sum(space.bounds[g]) / 2 for g in space.genes}
    h = session.apply_genome(values)
    child = merge_to_disk(father, p["mother"], p["base"], plan.ratio_map(values), h, work / "session-child",
                          progress=False, overwrite=True)
    exported = load_model(child, "bfloat16").state_dict()
    bad = _same_state(session.model, exported)
    if bad:
        raise AssertionError(f"the trial model differs from the CPU export at {bad[:5]}")
    msg = f"device_map=auto on {devices}: the CPU export's child bit for bit"
    if gpu:  # half the decoder layers on the GPU, the rest on the CPU: each tensor merged on its own device
        model = load_model(father.path, "bfloat16")
        _, layers, _ = text_decoder(model)
        for layer in layers[: len(layers) // 2]:
            layer.to(device)
        rmap = _mixed_map(father.names)
        InMemoryMerger(model, father, p["mother"], p["base"]).apply(rmap, "split")
        child = merge_to_disk(father, p["mother"], p["base"], rmap, "split", work / "split-child", progress=False,
                              overwrite=True)
        bad = _same_state(model, load_model(child, "bfloat16").state_dict())
        if bad:
            raise AssertionError(f"a model split over {device} and cpu differs from the CPU export at {bad[:5]}")
        msg += f"; split over {model_devices(model)}: same bits"
    return msg


def check_mri(work: Path, device: str) -> str:
    from dataclasses import replace

    from darwin_hydra.config import compose
    from darwin_hydra.mri.scan import run_scan

    from darwin_hydra.pipeline import RunContext

    p = _parents(work, "qwen3.5-9b")
    cfg = compose(["probes=darwin_v6", *SMALL_PROBES])
    resolve = RunContext(cfg, work / "mri-ctx").resolve  # builtin:// probe prompts
    runs = {}
    for name, dev, mem in (("cpu", "cpu", None), ("gpu", device, None),
                           ("gpu device_map", device, compose(["memory.device_map=auto"]).memory)):
        mri = replace(cfg.mri, device=dev, dtype="float32", cache=False, progress=False, delta_probe=True)
        runs[name] = run_scan(p["father"].path, p["mother"].path, cfg.probes, mri, resolve=resolve,
                              base_path=p["base"].path, memory=mem)
    worst = 0.0
    for name in ("gpu", "gpu device_map"):
        for role in ("probe_father", "probe_mother"):
            a, b = getattr(runs["cpu"], role), getattr(runs[name], role)
            for field in ("importance", "delta", "block_influence"):
                for s in a.sets:
                    worst = max(worst, max(abs(x - y) for x, y in zip(getattr(a, field)[s], getattr(b, field)[s])))
    if worst > 1e-3:
        raise AssertionError(f"the GPU scan differs from the CPU scan by up to {worst:.2e}")
    return f"importance, delta and block influence within {worst:.1e} of the CPU scan (whole and device_map=auto)"


def check_eval(work: Path, device: str) -> str:
    import numpy as np

    from darwin_hydra.evaluate.benchmark import evaluate_model
    from darwin_hydra.models import load_model, load_tokenizer
    from darwin_hydra.zoo import ensure_zoo
    from darwin_hydra.zoo.config import load_zoo_config

    root = ensure_zoo(load_zoo_config("tiny"), work / "zoo")
    tok = load_tokenizer(root / "dense" / "father")
    tasks = ["zoo_skills_dev"]
    cpu = evaluate_model(load_model(root / "dense" / "father"), tok, tasks, root / "tasks", batch_size=64, limit=32)
    gpu = evaluate_model(load_model(root / "dense" / "father", device=device), tok, tasks, root / "tasks",
                         batch_size="auto", limit=32, device=device)
    differ = sum(int(np.sum(cpu.tasks[t].correct != gpu.tasks[t].correct)) for t in cpu.tasks)
    items = sum(s.n for s in cpu.tasks.values())
    if differ > max(1, items // 20):
        raise AssertionError(f"{differ} of {items} items scored differently on {device} (batch_size=auto) and the CPU")
    return f"{items} items, batch_size=auto, mean {gpu.mean:.3f} (CPU {cpu.mean:.3f}; {differ} items differ)"


def check_pipeline(work: Path, device: str) -> str:
    import json as _json

    from darwin_hydra.run import run

    p = _parents(work, "qwen3.5-35b-a3b")
    overrides = ["parents=local", f"parents.father={p['father'].path}", f"parents.mother={p['mother'].path}",
                 f"parents.base={p['base'].path}", "experiment=test_tiny", "probes=darwin_v6", "logger=none",
                 "pipeline.stages=[preflight,scan,prescribe,search]", f"device={device}", "memory.device_map=auto",
                 "optimizer.phase2_trials=0", "optimizer.phase2_top_k=0", "parents.dtype=bfloat16", "mri.progress=false",
                 f"paths.cache_dir={work / 'cache'}"]
    overrides += SMALL_PROBES
    run_dir = work / f"run-{time.strftime('%H%M%S')}"
    ctx = run(overrides, run_dir)
    rec = _json.loads((run_dir / "search.json").read_text())
    return f"{len(rec['history'])} proxy trials; the trial model on {ctx.trial_session().model.device}"


CHECKS = {"export": check_export, "session": check_session, "mri": check_mri, "eval": check_eval,
          "pipeline": check_pipeline}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="where the tiny checkpoints and outputs go (default: a temporary directory)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", nargs="+", choices=list(CHECKS))
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipped (scripts/gpu_check.py checks the CUDA paths where a GPU is)")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    work_ctx = tempfile.TemporaryDirectory(prefix="gpu_check_") if args.work is None else None
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    print(f"gpu_check on {args.device} ({gpu}), torch {torch.__version__}")
    results, t_all = {}, time.perf_counter()
    for name in args.only or CHECKS:
        t0 = time.perf_counter()
        try:
            msg = CHECKS[name](work, args.device)
            results[name] = {"ok": True, "what": msg, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"ok      {name:<9} {time.perf_counter() - t0:6.1f} s  {msg}", flush=True)
        except Exception as e:  # noqa: BLE001 - every check runs; failures are reported together
            results[name] = {"ok": False, "what": f"{type(e).__name__}: {e}", "seconds": round(time.perf_counter() - t0, 1)}
            print(f"FAILED  {name:<9} {time.perf_counter() - t0:6.1f} s  {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
    failed = [n for n, r in results.items() if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed in {time.perf_counter() - t_all:.0f} s")
    print(json.dumps({"device": args.device, "gpu": gpu, "ok": not failed, "failed": failed, "checks": results}))
    if work_ctx is not None:
        work_ctx.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
