#!/usr/bin/env python
"""The MRI-only child (trust 1, no genome) beside the parents and the uniform merges, on the zoo's dev split.

    python scripts/mri_only_merge.py [--pair dense] [--split dev]

child(T) = (1 - r) father + r mother with r = r_mri(T), and the MRI's transplant rule (r < t_lo: the
father's tensor, r > t_hi: the mother's). Variants: the default preset with the base and the known
skill (what `darwin-hydra` gives the MRI), without the base, with the skill inferred, and the
literal Darwin V6 rule. Prints a markdown table (lm-eval accuracy in points) and the per-layer r_mri.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # dense only: r_mri is keyed by on-disk names, which for a dense model are the in-memory ones
    ap.add_argument("--pair", default="dense", choices=["dense"])
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    from darwin_hydra.arch import tensor_info
    from darwin_hydra.evaluate.benchmark import evaluate_model
    from darwin_hydra.config import compose
    from darwin_hydra.mri.scan import run_scan
    from darwin_hydra.zoo import default_cache_dir, ensure_zoo, load_metadata, resolve_zoo_uri
    from darwin_hydra.zoo.config import load_zoo_config
    from darwin_hydra.zoo.table import uniform_merge_table
    from darwin_hydra.zoo.tasks import task_name

    zcfg = load_zoo_config("default")
    root = ensure_zoo(zcfg, default_cache_dir())
    meta = load_metadata(root)
    skills = list(meta["skills"])
    tasks = [task_name(s, args.split) for s in skills]
    resolve = lambda uri: str(resolve_zoo_uri(uri, zcfg, default_cache_dir()))  # noqa: E731
    tok = AutoTokenizer.from_pretrained(root / args.pair / "father")
    child = AutoModelForCausalLM.from_pretrained(root / args.pair / "father", dtype=torch.float32).eval()
    params = child.state_dict()
    father = {k: v.clone() for k, v in params.items()}
    mother = AutoModelForCausalLM.from_pretrained(root / args.pair / "mother", dtype=torch.float32).state_dict()

    def score(label: str, extra: str = "") -> None:
        res = evaluate_model(child, tok, tasks, root / "tasks")
        cells = [f"{100 * res.tasks[task_name(s, args.split)].accuracy:.1f}" for s in skills]
        print(f"| {label} | " + " | ".join(cells) + f" | **{100 * res.mean:.1f}** | {extra} |", flush=True)

    # the parents and the best uniform merge, from the zoo's own fairness table (no hand-built rows)
    table = uniform_merge_table(root, pair=args.pair, split=args.split, transplant=False, block_grid=())
    best = max((r for r in table.children if r.ratio is not None), key=lambda r: r.mean)
    print(f"| model ({args.pair}, {args.split}) | " + " | ".join(skills) + " | mean | per-layer r_mri |")
    print("|" + "---|" * (len(skills) + 3))
    for label, row in (("father", table.father), ("mother", table.mother), (f"best uniform, r = {best.ratio:.1f}", best)):
        cells = [f"{100 * row.scores[s]:.1f}" for s in skills]
        print(f"| {label} | " + " | ".join(cells) + f" | **{100 * row.mean:.1f}** |  |", flush=True)

    probes = compose(["probes=zoo"]).probes
    base = f"zoo://{args.pair}/base"
    variants = [
        ("MRI `darwin_v6`, base, mother_skill=MATH (the default run)", "darwin_v6", base, ["MATH"]),
        ("MRI `darwin_v6`, base, sets inferred", "darwin_v6", base, None),
        ("MRI `darwin_v6`, no base, mother_skill=MATH", "darwin_v6", None, ["MATH"]),
        ("MRI literal (`darwin_v6_literal`), no base", "darwin_v6_literal", None, None),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset, base_path, sets in variants:
            mri = compose([f"mri={preset}", "mri.progress=false"]).mri
            res = run_scan(f"zoo://{args.pair}/father", f"zoo://{args.pair}/mother", probes, mri, resolve,
                           Path(tmp) / "cache", Path(tmp) / label[:12], mother_sets=sets, base_path=base_path)
            side = res.transplant
            per_layer: dict[int, list[float]] = {}
            with torch.no_grad():
                for k, t in params.items():
                    r = float(res.r_mri[k])
                    s = side.get(k, "merge")
                    t.copy_(father[k] if s == "father" else mother[k] if s == "mother" else torch.lerp(father[k], mother[k], r))
                    layer = tensor_info(k).layer
                    if layer is not None:
                        per_layer.setdefault(layer, []).append(r)
            layer_r = ", ".join(f"{sum(v) / len(v):.2f}" for _, v in sorted(per_layer.items()))
            score(label, f"{layer_r} (mother's sets: {','.join(res.prescription.mother_sets)})")


if __name__ == "__main__":
    main()
