#!/usr/bin/env python
"""Benchmark the probe scan: prefix-shared (darwin_hydra.mri.probes) vs the naive skip-one-layer way.

Prints, per model: decoder layers, prompt batches, layer evaluations and seconds of each way, and the
largest difference between their importances (should be ~0).

    python scripts/bench_probe_scan.py --zoo dense            # the zoo pair's father and mother
    python scripts/bench_probe_scan.py --tiny llama --layers 16
    python scripts/bench_probe_scan.py --model /path/to/ckpt --probes conf/probes/local.yaml
"""

from __future__ import annotations

import argparse
import logging
import string
import time
from pathlib import Path

import torch

from darwin_hydra.mri.probes import _reduce, _token_distance, tokenize_batch, layer_importance, text_decoder

log = logging.getLogger("bench_probe_scan")


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer: returns its input hidden state (the layer is skipped)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def naive_importance(model, tokenizer, prompts, max_length, batch_size, reduce="mean"):
    """Per batch: one reference forward (L layers) plus one forward per skipped layer with that layer
    swapped out (L-1 layers each): L*L layer evaluations. Returns (importance, evaluations, seconds)."""
    _, layers, norm = text_decoder(model)
    L = len(layers)
    cap = {}
    hook = norm.register_forward_hook(lambda m, a, o: cap.__setitem__("o", o))
    out, evals = {}, 0
    device = next(model.parameters()).device
    start = time.perf_counter()
    try:
        for name, texts in prompts.items():
            acc = torch.zeros(L, dtype=torch.float64)
            for i in range(0, len(texts), batch_size):
                batch = tokenize_batch(tokenizer, texts[i : i + batch_size], max_length, device)
                model(**batch, use_cache=False)
                ref = cap["o"]
                evals += L
                for l in range(L):
                    layer = layers[l]
                    layers[l] = _Skip()
                    try:
                        model(**batch, use_cache=False)
                    finally:
                        layers[l] = layer
                    evals += L - 1
                    acc[l] += float(_reduce(_token_distance(ref, cap["o"]), batch["attention_mask"], reduce).sum())
            out[name] = (acc / len(texts)).tolist()
    finally:
        hook.remove()
    return out, evals, time.perf_counter() - start


def _synthetic_prompts(n: int) -> dict[str, list[str]]:
    import random

    rng = random.Random(0)
    return {
        "MATH": [f"{rng.randrange(1000)}+{rng.randrange(1000)}=" for _ in range(n)],
        "CODE": ["rev:" + "".join(rng.choice(string.ascii_lowercase) for _ in range(8)) + "=" for _ in range(n)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", choices=["dense", "moe"], help="the zoo pair (built on first use)")
    src.add_argument("--model", nargs="+", help="checkpoint directories (with a tokenizer)")
    src.add_argument("--tiny", help="a tiny random seed architecture (llama, qwen3_5, gemma4, qwen3_5_moe)")
    ap.add_argument("--zoo-config", default="default", help="zoo config name (conf/zoo/<name>.yaml) for --zoo")
    ap.add_argument("--zoo-root", default=None, help="an already built zoo directory (skips building) for --zoo")
    ap.add_argument("--layers", type=int, default=8, help="layers of the --tiny model")
    ap.add_argument("--probes", default=None, help="probes YAML (default: conf/probes/zoo.yaml for --zoo)")
    ap.add_argument("--n", type=int, default=32, help="synthetic prompts per set (--tiny / no --probes)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache-dir", default="~/.cache/darwin_hydra")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from darwin_hydra.config import ProbesConfig
    from darwin_hydra.mri.probes import load_probe_prompts
    from darwin_hydra.mri.scan import load_model, load_tokenizer

    resolve = None
    models: list[tuple[str, object, object]] = []
    root = Path(__file__).resolve().parents[1]
    if args.zoo and args.zoo_root:
        zroot = Path(args.zoo_root).expanduser()
        resolve = lambda u: str(zroot / u[len("zoo://"):]) if u.startswith("zoo://") else u  # noqa: E731
        paths = [resolve(f"zoo://{args.zoo}/father"), resolve(f"zoo://{args.zoo}/mother")]
        args.probes = args.probes or str(root / "conf" / "probes" / "zoo.yaml")
    elif args.zoo:
        from darwin_hydra.zoo import resolve_zoo_uri
        from darwin_hydra.zoo.config import load_zoo_config

        zoo_cfg = load_zoo_config(args.zoo_config)
        cache = Path(args.cache_dir).expanduser()
        resolve = lambda u: str(resolve_zoo_uri(u, zoo_cfg, cache)) if u.startswith("zoo://") else u  # noqa: E731
        paths = [resolve(f"zoo://{args.zoo}/father"), resolve(f"zoo://{args.zoo}/mother")]
        args.probes = args.probes or str(root / "conf" / "probes" / "zoo.yaml")
    elif args.model:
        paths = args.model
    else:
        paths = []
        from darwin_hydra.testing.tiny import tiny_model

        from darwin_hydra.zoo.tokenizer import char_tokenizer

        models.append((f"tiny {args.tiny} L={args.layers}", tiny_model(args.tiny, num_layers=args.layers), char_tokenizer()))
    for p in paths:
        models.append((str(p), load_model(p), load_tokenizer(p, paths[0])))
    if args.probes:
        pc = ProbesConfig(**OmegaConf.to_container(OmegaConf.load(args.probes)))
        prompts = load_probe_prompts(pc, resolve)
        args.batch_size, args.max_length = pc.batch_size, pc.max_length
    else:
        prompts = _synthetic_prompts(args.n)

    rows = []
    for label, model, tok in models:
        # warm-up: first calls pay one-off costs (kernel fallbacks, allocator) that belong to neither way
        first = next(iter(prompts.values()))[: args.batch_size]
        layer_importance(model, tok, {"warmup": first}, args.max_length, args.batch_size, progress=False)
        scan = layer_importance(model, tok, prompts, args.max_length, args.batch_size, progress=False)
        row = dict(model=label, L=scan.num_layers, batches=scan.batches, shared_evals=scan.layer_evals,
                   shared_s=scan.seconds, naive_evals=scan.naive_layer_evals)
        if not args.skip_naive:
            ref, evals, secs = naive_importance(model, tok, prompts, args.max_length, args.batch_size)
            row["naive_s"], row["naive_evals"] = secs, evals
            row["max_diff"] = max(abs(a - b) for p in prompts for a, b in zip(scan.importance[p], ref[p]))
        rows.append(row)
    print(f"{'model':<50} {'L':>3} {'batches':>7} {'evals shared':>12} {'evals naive':>11} {'s shared':>9} {'s naive':>8} {'max diff':>9}")
    for r in rows:
        print(
            f"{r['model'][-50:]:<50} {r['L']:>3} {r['batches']:>7} {r['shared_evals']:>12} {r['naive_evals']:>11} "
            f"{r['shared_s']:>9.2f} {r.get('naive_s', float('nan')):>8.2f} {r.get('max_diff', float('nan')):>9.2e}"
        )


if __name__ == "__main__":
    main()
