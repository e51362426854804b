"""Rebuild a run's child from what the child carries, and verify it bit for bit.

``darwin-hydra-reproduce RUN_DIR [--keep]``:

1. reads the child's own record: ``darwin_hydra.json`` (kind, genome_hash, hash version, the config
   and the parents' fingerprints at export), ``recipe.json`` (every tensor's recipe) and
   ``checksums.json`` (every tensor's sha256);
2. checks the parents are the ones it was bred from (fingerprints);
3. re-merges the child from its recipe and genome_hash into a temporary directory and compares every
   tensor with ``checksums.json``; then checks every tensor of the exported ``child/`` (a damaged file);
4. separately, compares the run's ``.hydra/config.yaml`` and prescription with what the child was made
   from, and says so when they changed since the export ("config changed", not "tensors differ").

A child exported before the record existed is rebuilt from the run's saved config and ``genome.json``
(the plain-merge hash of that time, version 1).

Exit status: 0 when every tensor matches (config changes are reported as warnings); 1 with the
names of the tensors that differ; 2 when the run cannot be reproduced here (missing files, other
parents).
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


class CannotReproduceError(ValueError):
    """The run lacks what a reproduction needs, or its parents are not the ones the child came from."""


def load_run_config(run_dir: Path):
    """The run's saved config (``.hydra/config.yaml``), typed, with paths.output_dir = run_dir."""
    from darwin_hydra.config import load_config

    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a darwin-hydra run directory?")
    saved = OmegaConf.load(path)
    OmegaConf.update(saved, "paths.output_dir", str(run_dir), merge=False, force_add=True)
    try:
        cfg = load_config(saved)
    except ValueError as e:
        raise ValueError(f"{path} does not fit this darwin-hydra version's config schema: {e}") from e
    cfg.logger.enabled = False
    return cfg


def verify_dir(child_dir: Path, checksums: dict[str, str]) -> list[str]:
    """Names of tensors in ``child_dir`` whose sha256 differs from ``checksums`` (or that are missing/extra)."""
    from darwin_hydra.io.fingerprint import tensor_sha256
    from darwin_hydra.io.reader import CheckpointReader

    bad = []
    reader = CheckpointReader(child_dir)
    try:
        names = set(reader.names)
        for name in sorted(set(checksums) | names):
            if name not in names:
                bad.append(f"{name}: missing")
            elif name not in checksums:
                bad.append(f"{name}: not in checksums.json")
            elif tensor_sha256(reader.get(name)) != checksums[name]:
                bad.append(f"{name}: sha256 differs")
    finally:
        reader.close()
    return bad


def _config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs (how a run is carried out, never
    what it computes, is left out)."""
    from darwin_hydra.run import RESUME_FREE

    out = []
    for key in sorted(set(saved) | set(now)):
        dotted = f"{prefix}{key}"
        if dotted in RESUME_FREE or dotted.startswith("paths.") or dotted in ("logger.enabled", "merge.device"):
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} at export, {b!r} now")
    return out


def reproduce(run_dir: Path, keep: bool = False) -> tuple[list[str], list[str]]:
    """Rebuild and verify; returns (tensor problems, config changes); both empty = bit-identical
    from an unchanged config."""
    from darwin_hydra.config import plain_config
    from darwin_hydra.merge.engine import merge_to_disk
    from darwin_hydra.merge.recipe import RatioMap
    from darwin_hydra.pipeline import RunContext
    from darwin_hydra.stages.merge import CHILD_RECORD, child_recipe

    cfg = load_run_config(run_dir)
    ctx = RunContext(cfg, run_dir)
    child_dir = ctx.child_dir
    sums_path = child_dir / "checksums.json"
    if not sums_path.exists():
        raise FileNotFoundError(f"{sums_path} not found: the run has no exported child to verify")
    recorded = json.loads(sums_path.read_text())
    recorded = recorded.get("tensors", recorded)
    readers = ctx.checked_readers
    changes: list[str] = []
    record_path = child_dir / CHILD_RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        now = {role: r.fingerprint() for role, r in readers.items()}
        if now != record["parents"]:
            raise CannotReproduceError(
                f"the parents are not the ones {child_dir} was bred from: fingerprints {record['parents']} at export, "
                f"{now} now ({[cfg.parents.father, cfg.parents.mother, cfg.parents.base]})"
            )
        genome_hash = record["genome_hash"]
        ratio_map = RatioMap.from_json((child_dir / "recipe.json").read_text())
        changes = _config_changes(record["config"], plain_config(cfg))
        try:
            current = child_recipe(ctx, record.get("hash_version", 1)).genome_hash
            if current != genome_hash:
                changes.append(f"the run's config and prescription now give genome_hash {current}, the child is "
                               f"{genome_hash}")
        except ValueError as e:  # a genome.json that no longer fits the run's config
            changes.append(str(e))
    else:
        log.info("%s has no %s (exported before it existed): rebuilding from the run's saved config", child_dir,
                 CHILD_RECORD)
        recipe = child_recipe(ctx, hash_version=1)  # raises when genome.json's hash does not match
        genome_hash, ratio_map = recipe.genome_hash, recipe.ratio_map
    rebuilt = run_dir / ".reproduce"
    if rebuilt.exists():
        shutil.rmtree(rebuilt)
    problems = []
    merge_to_disk(readers["father"], readers["mother"], readers.get("base"), ratio_map, genome_hash, rebuilt,
                  workers=cfg.merge.workers, dtype=cfg.merge.dtype, max_shard_bytes=cfg.export.max_shard_bytes)
    try:
        problems += [f"rebuilt {p}" for p in verify_dir(rebuilt, recorded)]
    finally:
        if not keep:
            shutil.rmtree(rebuilt, ignore_errors=True)
    problems += [f"exported {p}" for p in verify_dir(child_dir, recorded)]
    return problems, changes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="darwin-hydra-reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/<date>/<time>)")
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt child in RUN_DIR/.reproduce")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        problems, changes = reproduce(args.run_dir.resolve(), keep=args.keep)
    except (FileNotFoundError, ValueError) as e:
        print(f"darwin-hydra-reproduce: {e}", file=sys.stderr)
        return 2
    if changes:
        print(f"darwin-hydra-reproduce: config changed since the export ({len(changes)}); the child was rebuilt from "
              "its own record, and the run's config now differs in:", file=sys.stderr)
        for c in changes:
            print(f"  {c}", file=sys.stderr)
    if problems:
        print(f"darwin-hydra-reproduce: {len(problems)} tensor(s) differ:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"darwin-hydra-reproduce: {args.run_dir} reproduced bit for bit")
    return 0
