"""Build the zoo and print its fairness table: ``python -m darwin_hydra.zoo [--config tiny] [--table] [key=value ...]``.

Same as ``scripts/build_zoo.py``. Overrides are dotted ZooConfig fields, e.g. ``base.steps=800 workers=1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path


def _overhead(root: Path, pair: str, repeats: int = 5) -> dict:
    # Per-call cost of evaluate_model on the same in-memory model vs. the bare forward passes it needs.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from darwin_hydra.evaluate.benchmark import evaluate_model
    from darwin_hydra.zoo.build import load_metadata
    from darwin_hydra.zoo.score import greedy_correct
    from darwin_hydra.zoo.tokenizer import char_tokenizer
    from darwin_hydra.zoo.train import Encoder

    meta = load_metadata(root)
    tasks = meta["tasks"]["dev"]
    model = AutoModelForCausalLM.from_pretrained(root / pair / "father", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(root / pair / "father")
    t = time.perf_counter()
    evaluate_model(model, tok, tasks, root / "tasks")
    first = time.perf_counter() - t
    calls = []
    for _ in range(repeats):
        with torch.no_grad():
            for p in model.parameters():  # weights change in place between calls, as in a search
                p.mul_(1.0)
        t = time.perf_counter()
        evaluate_model(model, tok, tasks, root / "tasks")
        calls.append(time.perf_counter() - t)
    enc = Encoder(char_tokenizer())
    items = []
    for skill in meta["skills"]:
        with open(root / "tasks" / f"{skill}_dev.jsonl") as fh:
            items += [(r["prompt"], r["answer"]) for r in map(json.loads, fh)]
    t = time.perf_counter()
    greedy_correct(model, enc, items, batch_size=64)
    bare = time.perf_counter() - t
    per_call = sorted(calls)[len(calls) // 2]
    return {
        "items": len(items),
        "first_call_s": round(first, 3),
        "repeat_call_median_s": round(per_call, 3),
        "bare_forward_s": round(bare, 3),
        "overhead_s": round(per_call - bare, 3),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m darwin_hydra.zoo", description=__doc__)
    parser.add_argument("--config", default="default", help="conf/zoo/<name>.yaml or a YAML path (default: default)")
    parser.add_argument("--cache-dir", default=None, help="default: $DARWIN_HYDRA_CACHE or ~/.cache/darwin_hydra")
    parser.add_argument("--table", action="store_true", help="score the 11 uniform merges with lm-eval and print 4a-4c")
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--overhead", action="store_true", help="measure evaluate_model's per-call overhead")
    parser.add_argument("overrides", nargs="*", help="dotted ZooConfig overrides, e.g. base.steps=800")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from darwin_hydra.zoo.build import ensure_zoo, load_metadata
    from darwin_hydra.zoo.config import load_zoo_config

    cfg = load_zoo_config(args.config, args.overrides)
    t = time.perf_counter()
    root = ensure_zoo(cfg, args.cache_dir)
    meta = load_metadata(root)
    print(f"zoo {cfg.name!r} at {root} (ready in {time.perf_counter() - t:.1f} s; "
          f"built in {meta['seconds']['total']} s of which training {meta['seconds']['train']} s)")
    for pair, info in meta["pairs"].items():
        truth = info["ground_truth"]
        print(f"  {pair} ({info['arch']}): mother's layers {truth['mother_layers']}, father's {truth['father_layers']}")
        for role, m in info["members"].items():
            if "scores_test" in m:
                s = ", ".join(f"{k} {100 * v:.1f}" for k, v in m["scores_test"].items())
                print(f"    {role:7s} test: {s}")
        if "experts" in info:
            print(f"    dead experts ({info['experts']['dead_threshold']}): {json.dumps(info['experts']['summary'])}")
    if args.table:
        from darwin_hydra.zoo.table import fairness, format_table, uniform_merge_table

        for pair in meta["pairs"]:
            table = uniform_merge_table(root, pair=pair, split=args.split)
            print(f"\n### {pair} pair ({meta['pairs'][pair]['arch']}), {args.split} split, lm-eval acc (points)\n")
            print(format_table(table))
            print("\n" + json.dumps(fairness(table), indent=1))
    if args.overhead:
        for pair in meta["pairs"]:
            print(f"\nevaluate_model overhead ({pair} father, dev tasks): {json.dumps(_overhead(root, pair))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
