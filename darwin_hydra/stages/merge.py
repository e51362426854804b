"""Merge/export stage: stream the child to ``child/`` (sharded safetensors, index, config, tokenizer,
checksums, recipe, model card, and ``darwin_hydra.json``: what the child was made from), atomically.

With a genome (from the search stage, or ``genome.json`` in the run directory) the child is the
genome's DARE-TIES recipe over the MRI prescription; without one it is a plain merge from the
``merge`` group: ``darwin-hydra 'pipeline.stages=[merge]' merge.method=ties merge.ratio=0.5``.

The child carries its own record (``darwin_hydra.json``: kind, genome_hash, hash version, the run's
config, the parents' fingerprints) beside ``recipe.json`` and ``checksums.json``, so that
``darwin-hydra-reproduce`` rebuilds it from what it carries and can tell a changed config from
damaged tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)

CHILD_RECORD = "darwin_hydra.json"
# 1: a plain merge's hash covered merge.workers and merge.device (runs before 2026-12-07);
# 2: performance settings (workers, processes, device) are left out: they never change a child
HASH_VERSION = 2
PERFORMANCE_KEYS = ("workers", "processes", "device")


@dataclass
class ChildRecipe:
    ratio_map: Any  # darwin_hydra.merge.recipe.RatioMap
    genome_hash: str
    genome: dict | None  # genome.json content, None for a plain merge
    # "genome" | "plain" | "search-uniform" / "search-mri" (a search whose uniform or MRI-only candidate
    # scored best on dev: genome.json's ``child``)
    kind: str


@dataclass
class Exported:
    dir: Path
    recipe: ChildRecipe


def saved_genome(ctx: RunContext) -> dict | None:
    """The genome of this run's child: the search's result in this process, else ``genome.json``."""
    if ctx.results.search is not None:
        return ctx.results.search.genome
    gpath = ctx.run_dir / "genome.json"
    return json.loads(gpath.read_text()) if gpath.exists() else None


def child_recipe(ctx: RunContext, hash_version: int = HASH_VERSION) -> ChildRecipe:
    """The recipe of this run's child: the genome's when there is one, else the plain merge config's.
    A genome whose hash no longer holds (the parents or the config changed) is refused."""
    from darwin_hydra.merge.recipe import plain_ratio_map

    genome = saved_genome(ctx)
    if genome is not None:
        from darwin_hydra.search.recipe import child_kind

        rmap, h = ctx.breeding_plan().child(genome)
        if genome.get("genome_hash") and genome["genome_hash"] != h:
            raise ValueError(
                f"{ctx.run_dir / 'genome.json'}: genome_hash {genome['genome_hash']} does not match the hash {h} of its "
                "child with these parents, prescription and settings: the parents or the config changed since the "
                "genome was found"
            )
        kind = child_kind(genome)[0]
        return ChildRecipe(rmap, h, genome, "genome" if kind == "genome" else f"search-{kind}")
    from darwin_hydra.merge.recipe import RatioMap
    from darwin_hydra.search.recipe import apply_outside_decoder, outside_decoder_rule

    readers = ctx.readers
    names = list(readers["father"].names)
    policy = ctx.cfg.parents.outside_decoder
    rmap = RatioMap(apply_outside_decoder(plain_ratio_map(names, ctx.cfg.merge, ctx.num_layers), policy))
    fingerprints = {role: r.fingerprint() for role, r in readers.items()}
    h = plain_hash(ctx.cfg.merge, fingerprints, hash_version, outside_decoder_rule(names, policy))
    return ChildRecipe(rmap, h, None, "plain")


def plain_hash(merge_cfg, fingerprints: dict, version: int = HASH_VERSION, extra: dict | None = None) -> str:
    """A plain merge's genome_hash: of its merge config and the parents' fingerprints (and ``extra``:
    the outside-decoder rule when it changes a tensor).

    Version 2 leaves out ``workers``, ``processes`` and ``device`` (how the export runs), so they never
    change a child. Version 1 (runs before) kept ``workers`` and ``device``; ``darwin-hydra-reproduce``
    uses it for children that carry no hash version."""
    from darwin_hydra.search.genome import digest

    merge = json.loads(json.dumps(
        dataclasses.asdict(merge_cfg) if dataclasses.is_dataclass(merge_cfg) else dict(merge_cfg), default=str))
    merge.pop("processes", None)
    if version == 1:
        return digest({"merge": merge, "parents": fingerprints})
    for key in PERFORMANCE_KEYS:
        merge.pop(key, None)
    return digest({"merge": merge, "parents": fingerprints, "hash_version": version, **(extra or {})})


def child_record(ctx: RunContext, recipe: ChildRecipe) -> dict:
    """What ``darwin_hydra.json`` in the child says it was made from."""
    from darwin_hydra import __version__
    from darwin_hydra.config import plain_config

    return {
        "kind": recipe.kind,
        "genome_hash": recipe.genome_hash,
        "hash_version": HASH_VERSION,
        "darwin_hydra": __version__,
        "parents": {role: r.fingerprint() for role, r in ctx.readers.items()},
        "config": plain_config(ctx.cfg),
    }


def basic_model_card(ctx: RunContext, recipe: ChildRecipe) -> str:
    """The model card written with the export; the report stage replaces it with the full one."""
    from darwin_hydra.report.card import model_card

    return model_card(ctx, recipe, report=None)


def verify_child(child_dir: Path, genome_hash: str) -> list[str]:
    """Problems of an exported child against what it should be: its record names another
    genome_hash, or a tensor's sha256 differs from ``checksums.json`` (empty list: it verifies)."""
    from darwin_hydra.reproduce import verify_dir

    record_path, sums_path = child_dir / CHILD_RECORD, child_dir / "checksums.json"
    if not (record_path.exists() and sums_path.exists()):
        return [f"{child_dir} has no {CHILD_RECORD} or checksums.json"]
    record = json.loads(record_path.read_text())
    if record.get("genome_hash") != genome_hash:
        return [f"{child_dir} is the child of genome_hash {record.get('genome_hash')}, not {genome_hash}"]
    sums = json.loads(sums_path.read_text())
    return verify_dir(child_dir, sums.get("tensors", sums))


class MergeStage(Stage):
    name = "merge"

    def __init__(self, merge, export):
        self.merge, self.export = merge, export

    def load(self, ctx: RunContext) -> Exported | None:
        """This run's exported child, when its record names this recipe's hash and every tensor
        matches its checksum (a child damaged after the export is exported again)."""
        if not (ctx.child_dir / CHILD_RECORD).exists():
            return None
        recipe = child_recipe(ctx)
        problems = verify_child(ctx.child_dir, recipe.genome_hash)
        if problems:
            log.warning("merge: the exported child does not verify (%s); exporting it again", "; ".join(problems[:3]))
            return None
        return Exported(ctx.child_dir, recipe)

    def run(self, ctx: RunContext) -> Exported:
        from darwin_hydra.merge.engine import merge_to_disk

        readers = ctx.checked_readers
        recipe = child_recipe(ctx)
        overwrite = self.export.overwrite
        if ctx.child_dir.exists() and not overwrite:
            record = ctx.child_dir / CHILD_RECORD
            if record.exists() and json.loads(record.read_text()).get("genome_hash") == recipe.genome_hash:
                overwrite = True  # this run's own child, found damaged by load(): replace it
            else:
                raise FileExistsError(f"{ctx.child_dir} exists; set export.overwrite=true to replace it")
        extra = {
            "recipe.json": recipe.ratio_map.to_json(),
            "README.md": basic_model_card(ctx, recipe),
            CHILD_RECORD: json.dumps(child_record(ctx, recipe), indent=2),
        }
        if recipe.genome is not None:
            extra["genome.json"] = json.dumps(recipe.genome, indent=2)
        out = merge_to_disk(
            readers["father"],
            readers["mother"],
            readers.get("base"),
            recipe.ratio_map,
            recipe.genome_hash,
            ctx.child_dir,
            workers=self.merge.workers,
            processes=self.merge.processes,
            device=self.merge.device,
            dtype=self.merge.dtype,
            max_shard_bytes=self.export.max_shard_bytes,
            extra_files=extra,
            overwrite=overwrite,
        )
        log.info("merge (%s, genome_hash %s) -> %s\n%s", recipe.kind, recipe.genome_hash, out, recipe.ratio_map.summary())
        ctx.tracker.log_summary({"merge/genome_hash": recipe.genome_hash, "merge/kind": recipe.kind})
        return Exported(out, recipe)
