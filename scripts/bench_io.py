"""Throughput and peak memory of the checkpoint I/O layer on a ~168M-parameter bf16 Llama.

    python scripts/bench_io.py [--work /tmp/bench_io] [--mode all|read|fingerprint|copy|merge3|save_file]

Builds the checkpoint once (random weights, saved by transformers), then runs each measurement in a
fresh subprocess so that peak RSS (ru_maxrss) belongs to that measurement alone:

- read:      CheckpointReader.iter_tensors over every tensor (page cache warm);
- copy:      reader -> CheckpointWriter (sharded, checksums), i.e. the merge engine's I/O with a no-op merge;
- merge3:    three readers -> float32 linear merge -> writer (the merge engine's I/O around a trivial merge);
- save_file: the same copy through safetensors.torch.save_file of each shard held in memory (baseline).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_io")


def build(path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    log.info("saving a %.0fM-parameter bf16 llama to %s", n / 1e6, path)
    model.save_pretrained(path, max_shard_size="200MB")


def maxrss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(mode: str, src: Path, work: Path) -> dict:
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.io.writer import CheckpointWriter, storable, write_slot

    import torch  # noqa: F401  (import cost is not part of the measurement)

    base = maxrss_mb()
    r = CheckpointReader(src)
    total = r.total_bytes
    with open(src / "model-00001-of-00002.safetensors", "rb") as fh:  # warm the page cache
        while fh.read(1 << 24):
            pass
    with open(src / "model-00002-of-00002.safetensors", "rb") as fh:
        while fh.read(1 << 24):
            pass
    out = work / f"out_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if mode == "read":
        for _name, _t in r.iter_tensors():
            pass
    elif mode == "copy":
        with CheckpointWriter(out, max_shard_bytes=200_000_000, source_dir=src) as w:
            for name, t in r.iter_tensors():
                w.fill(name, write_slot(w.reserve(name, t.dtype, t.shape), t))
    elif mode == "save_file":
        import hashlib

        from safetensors.torch import save_file

        out.mkdir(parents=True)
        shard, size, i = {}, 0, 0
        for name, t in r.iter_tensors():
            hashlib.sha256(t.view(-1).view(__import__("torch").uint8).numpy()).hexdigest()
            if shard and size + t.numel() * t.element_size() > 200_000_000:
                i += 1
                save_file(shard, out / f"model-{i:05d}.safetensors", metadata={"format": "pt"})
                shard, size = {}, 0
            shard[name] = t
            size += t.numel() * t.element_size()
        save_file(shard, out / f"model-{i + 1:05d}.safetensors", metadata={"format": "pt"})
    elif mode == "merge3":
        # Three parents -> a linear merge in float32 -> bf16 child: the engine's I/O around a trivial merge.
        import torch

        readers = [r, CheckpointReader(src), CheckpointReader(src)]
        with CheckpointWriter(out, max_shard_bytes=200_000_000, source_dir=src) as w:
            for name in r.names:
                a, b, c = (x.get(name).float() for x in readers)
                t = storable(name, (0.5 * a + 0.3 * b + 0.2 * c).to(torch.bfloat16))
                w.fill(name, write_slot(w.reserve(name, t.dtype, t.shape), t))
    elif mode == "fingerprint":
        r.fingerprint()
    secs = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "seconds": round(secs, 3), "MB/s": round(total / 1e6 / secs), "GB": round(total / 1e9, 3),
            "peak_rss_MB": round(maxrss_mb()), "rss_before_MB": round(base)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_io"))
    ap.add_argument("--mode", default="all")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = args.work / "llama168m"
    if args.child:
        print(json.dumps(run_one(args.mode, src, args.work)))
        return
    if not (src / "config.json").exists():
        build(src)
    modes = ["read", "fingerprint", "copy", "save_file", "merge3"] if args.mode == "all" else [args.mode]
    for mode in modes:
        res = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--mode", mode, "--child"],
                             capture_output=True, text=True, check=True)
        log.info(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
