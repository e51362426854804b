"""Expert storage: a checkpoint whose MoE experts are stored one key per expert, rewritten with them fused.

transformers 5 holds Qwen-MoE experts as two 3-D tensors a layer and the Hub's Qwen3.5-MoE files store
them that way (``mlp.experts.gate_up_proj`` (E, 2I, H): expert e's ``gate_proj`` rows then its ``up_proj``
rows; ``mlp.experts.down_proj`` (E, H, I)), but ``save_pretrained`` writes one key per expert by default
(``mlp.experts.{e}.{gate,up,down}_proj.weight``). A fine-tune saved that way cannot be merged with a
fused father tensor by tensor: preflight names the pair's storages and points here.

    darwin-hydra-fuse-experts MOTHER_DIR MOTHER_FUSED_DIR

writes a copy of the checkpoint with every layer's experts fused (the other tensors, the config and the
tokenizer files unchanged), streaming one expert tensor at a time, atomically (``CheckpointWriter``). The
copy loads with the same class and gives the same outputs (tests/test_seed_pairs.py).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ExpertGroup:
    """One layer's per-expert tensors: ``names[expert][proj]``."""

    prefix: str
    names: dict[int, dict[str, str]] = field(default_factory=dict)

    def fused(self, reader) -> list[tuple[str, object, tuple[int, ...], list[str]]]:
        """(name, dtype, shape, source tensors in storage order) of the two fused tensors, checked."""
        experts = sorted(self.names)
        if experts != list(range(len(experts))):
            raise ValueError(f"{reader.path}: {self.prefix}: experts {experts[:8]}... are not 0..{len(experts) - 1}")
        for e in experts:
            lacking = [p for p in PROJS if p not in self.names[e]]
            if lacking:
                raise ValueError(f"{reader.path}: {self.prefix}.{e} has no {', '.join(lacking)}")
        first = self.names[0]
        (i, h), dtype = reader.shape(first["gate_proj"]), reader.dtype(first["gate_proj"])
        want = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        for e in experts:
            for p, name in self.names[e].items():
                if tuple(reader.shape(name)) != want[p] or reader.dtype(name) != dtype:
                    raise ValueError(f"{reader.path}: tensor {name}: {tuple(reader.shape(name))} {reader.dtype(name)}, "
                                     f"expected {want[p]} {dtype} like expert 0's")
        n = len(experts)
        gate_up = [self.names[e][p] for e in experts for p in ("gate_proj", "up_proj")]
        down = [self.names[e]["down_proj"] for e in experts]
        return [(f"{self.prefix}.gate_up_proj", dtype, (n, 2 * i, h), gate_up),
                (f"{self.prefix}.down_proj", dtype, (n, h, i), down)]


def expert_groups(names) -> dict[str, ExpertGroup]:
    """Per-expert tensor names grouped by layer (``...mlp.experts``), in the order they first appear."""
    groups: dict[str, ExpertGroup] = {}
    for name in names:
        m = PER_EXPERT.match(name)
        if m:
            group = groups.setdefault(m["prefix"], ExpertGroup(m["prefix"]))
            group.names.setdefault(int(m["expert"]), {})[m["proj"]] = name
    return groups


def fuse_experts(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                 max_shard_bytes: int = 5_000_000_000) -> Path:
    """Write ``src`` to ``dst`` with its per-expert MoE tensors fused (module doc); returns ``dst``."""
    from tqdm.auto import tqdm

    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.io.writer import CheckpointWriter, SlotWriter, write_slot

    reader = CheckpointReader(src)
    if reader.format != "safetensors":
        raise ValueError(f"{src}: only safetensors checkpoints are rewritten (this one is {reader.format})")
    groups = expert_groups(reader.names)
    if not groups:
        raise ValueError(f"{src}: no per-expert tensors (…experts.<e>.gate_proj/up_proj/down_proj.weight): "
                         "nothing to fuse")
    # the layout: each layer's two fused tensors where its first expert tensor was, the rest in place
    layout: list[tuple[str, object, tuple[int, ...], list[str] | None]] = []
    placed = set()
    for name in reader.names:
        m = PER_EXPERT.match(name)
        if m is None:
            layout.append((name, reader.dtype(name), tuple(reader.shape(name)), None))
        elif m["prefix"] not in placed:
            placed.add(m["prefix"])
            layout += groups[m["prefix"]].fused(reader)
    try:
        with CheckpointWriter(dst, max_shard_bytes=max_shard_bytes, source_dir=src, overwrite=overwrite) as writer:
            slots = [(writer.reserve(name, dtype, shape), parts) for name, dtype, shape, parts in layout]
            for slot, parts in tqdm(slots, desc="fuse experts", unit="tensor", leave=False):
                if parts is None:
                    writer.fill(slot.name, write_slot(slot, reader.get(slot.name)))
                    continue
                with SlotWriter(slot) as out:  # expert by expert, front to back: one expert tensor in memory
                    for part in parts:
                        out.write(reader.get(part).reshape(-1))
                    writer.fill(slot.name, out.finish())
    finally:
        reader.close()
    log.info("%s -> %s: experts of %d layer(s) fused", src, dst, len(groups))
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="darwin-hydra-fuse-experts", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="checkpoint directory with one key per expert")
    ap.add_argument("dst", type=Path, help="new checkpoint directory (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fuse_experts(args.src, args.dst, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"darwin-hydra-fuse-experts: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
