"""Rebuild a run's child from its saved config and genome, and verify it bit for bit.

``darwin-hydra-reproduce RUN_DIR [--keep]``:

1. loads ``RUN_DIR/.hydra/config.yaml`` (validated against the schema) and ``RUN_DIR/genome.json``;
2. recomputes the genome_hash from the genes, the parents' fingerprints, the saved MRI prescription
   (``RUN_DIR/scan/scan.json``) and the settings, and refuses if it differs;
3. re-merges the child into a temporary directory and compares every tensor's sha256 with the
   ``checksums.json`` recorded at export;
4. checks every tensor of the exported ``child/`` against the same checksums (finds a damaged file).

Exit status 0 when everything matches; 1 with the names of the tensors that differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("darwin_hydra.reproduce")


def load_run_config(run_dir: Path):
    """The run's composed config, validated against the schema, with paths.output_dir = run_dir."""
    from darwin_hydra.config import DarwinConfig

    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a darwin-hydra run directory?")
    saved = OmegaConf.load(path)
    saved.paths.output_dir = str(run_dir)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(DarwinConfig), saved)
    except Exception as e:  # omegaconf's validation errors name the key
        raise ValueError(f"{path} does not fit this darwin-hydra version's config schema: {e}") from e
    cfg.logger.enabled = False
    return cfg


def verify_dir(child_dir: Path, checksums: dict[str, str]) -> list[str]:
    """Names of tensors in ``child_dir`` whose sha256 differs from ``checksums`` (or that are missing/extra)."""
    from darwin_hydra.io.checkpoint import CheckpointReader, tensor_sha256

    bad = []
    reader = CheckpointReader(child_dir)
    names = set(reader.names)
    for name in sorted(set(checksums) | names):
        if name not in names:
            bad.append(f"{name}: missing")
        elif name not in checksums:
            bad.append(f"{name}: not in checksums.json")
        elif tensor_sha256(reader.get(name)) != checksums[name]:
            bad.append(f"{name}: sha256 differs")
    return bad


def reproduce(run_dir: Path, keep: bool = False) -> list[str]:
    """Rebuild and verify; returns the list of problems (empty = bit-identical)."""
    from darwin_hydra.merge.engine import merge_to_disk
    from darwin_hydra.pipeline import RunContext
    from darwin_hydra.stages.merge import child_recipe

    cfg = load_run_config(run_dir)
    ctx = RunContext(cfg, run_dir)
    child_dir = ctx.child_dir
    sums_path = child_dir / "checksums.json"
    if not sums_path.exists():
        raise FileNotFoundError(f"{sums_path} not found: the run has no exported child to verify")
    recorded = json.loads(sums_path.read_text())
    recorded = recorded.get("tensors", recorded)
    ctx.check_parents()
    recipe = child_recipe(ctx)  # raises when genome.json's hash does not match
    problems = []
    if recipe.genome is None:
        log.info("no genome.json: rebuilding the plain merge of the saved merge config")
    rebuilt = run_dir / ".reproduce"
    if rebuilt.exists():
        shutil.rmtree(rebuilt)
    readers = ctx.readers()
    merge_to_disk(readers["father"], readers["mother"], readers.get("base"), recipe.ratio_map, recipe.genome_hash,
                  rebuilt, workers=int(cfg.merge.workers), device="cpu",
                  max_shard_bytes=int(cfg.export.max_shard_bytes))
    try:
        problems += [f"rebuilt {p}" for p in verify_dir(rebuilt, recorded)]
    finally:
        if not keep:
            shutil.rmtree(rebuilt, ignore_errors=True)
    problems += [f"exported {p}" for p in verify_dir(child_dir, recorded)]
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="darwin-hydra-reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/<date>/<time>)")
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt child in RUN_DIR/.reproduce")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        problems = reproduce(args.run_dir.resolve(), keep=args.keep)
    except (FileNotFoundError, ValueError) as e:
        print(f"darwin-hydra-reproduce: {e}", file=sys.stderr)
        return 2
    if problems:
        print(f"darwin-hydra-reproduce: {len(problems)} tensor(s) differ:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"darwin-hydra-reproduce: {args.run_dir} reproduced bit for bit")
    return 0
