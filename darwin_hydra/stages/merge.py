"""Merge/export stage: stream the child to ``child/`` (sharded safetensors, index, config, tokenizer,
checksums, recipe, model card), atomically.

With a genome (from the search stage, or ``genome.json`` in the run directory) the child is the
genome's DARE-TIES recipe over the MRI prescription; without one it is a plain merge from the
``merge`` group: ``darwin-hydra 'pipeline.stages=[merge]' merge.method=ties merge.ratio=0.5``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


@dataclass
class ChildRecipe:
    ratio_map: Any  # darwin_hydra.merge.recipe.RatioMap
    genome_hash: str
    genome: dict | None  # genome.json content, None for a plain merge
    kind: str  # "genome" | "plain"


def child_recipe(ctx: RunContext) -> ChildRecipe:
    """The recipe of this run's child: the genome's when there is one, else the plain merge config's."""
    from darwin_hydra.arch import num_layers
    from darwin_hydra.search.genome import GenomeSpace, digest

    readers = ctx.readers()
    father = readers["father"]
    L = num_layers(father.config)
    genome = ctx.artifacts.get("genome")
    gpath = ctx.run_dir / "genome.json"
    if genome is None and gpath.exists():
        genome = json.loads(gpath.read_text())
    if genome is not None:
        from darwin_hydra.mri.config import mri_config
        from darwin_hydra.search.recipe import genome_ratio_map, hash_genome, moe_rules, space_for_genome
        from darwin_hydra.stages.scan import ensure_scan

        space = space_for_genome(GenomeSpace.from_config(ctx.cfg.genome, L), genome["genes"], str(gpath))
        mri = mri_config(ctx.cfg.mri)
        scan = ensure_scan(ctx)
        r_mri = dict(scan.r_mri)
        router_source, revive = moe_rules(ctx.cfg.genome, scan)
        fingerprints = {role: r.fingerprint() for role, r in readers.items()}
        h = hash_genome(space, genome["genes"], fingerprints, r_mri, mri.t_lo, mri.t_hi, router_source, revive)
        if genome.get("genome_hash") and genome["genome_hash"] != h:
            raise ValueError(
                f"{gpath}: genome_hash {genome['genome_hash']} does not match the hash {h} of its genes with these "
                "parents, prescription and settings: the parents or the config changed since the genome was found"
            )
        rmap = genome_ratio_map(space, genome["genes"], father.names, r_mri, L, mri.t_lo, mri.t_hi, router_source, revive)
        return ChildRecipe(rmap, h, genome, "genome")
    from darwin_hydra.merge.recipe import plain_ratio_map

    merge_cfg = OmegaConf.to_object(ctx.cfg.merge)
    rmap = plain_ratio_map(list(father.names), merge_cfg, L)
    fingerprints = {role: r.fingerprint() for role, r in readers.items()}
    return ChildRecipe(rmap, plain_hash(ctx.cfg.merge, fingerprints), None, "plain")


def plain_hash(merge_cfg, fingerprints: dict) -> str:
    """A plain merge's genome_hash: of its merge config and the parents' fingerprints. ``processes``
    (how the export runs, added later) is left out, so it never changes a child; ``workers`` and
    ``device`` are in, as they always were, so that runs made so far reproduce."""
    from darwin_hydra.search.genome import digest

    merge = OmegaConf.to_container(merge_cfg, resolve=True)
    merge.pop("processes", None)
    return digest({"merge": merge, "parents": fingerprints})


def basic_model_card(ctx: RunContext, recipe: ChildRecipe) -> str:
    """The model card written with the export; the report stage replaces it with the full one."""
    from darwin_hydra.report.card import model_card

    return model_card(ctx, recipe, report=None)


class MergeStage(Stage):
    name = "merge"

    def run(self, ctx: RunContext) -> None:
        from darwin_hydra.merge.engine import merge_to_disk

        ctx.check_parents()
        readers = ctx.readers()
        recipe = child_recipe(ctx)
        extra = {"recipe.json": recipe.ratio_map.to_json(), "README.md": basic_model_card(ctx, recipe)}
        if recipe.genome is not None:
            extra["genome.json"] = json.dumps(recipe.genome, indent=2)
        if ctx.child_dir.exists() and not ctx.cfg.export.overwrite:
            raise FileExistsError(f"{ctx.child_dir} exists; set export.overwrite=true to replace it")
        out = merge_to_disk(
            readers["father"],
            readers["mother"],
            readers.get("base"),
            recipe.ratio_map,
            recipe.genome_hash,
            ctx.child_dir,
            workers=int(ctx.cfg.merge.workers),
            processes=ctx.cfg.merge.processes,
            device=str(ctx.cfg.merge.device),
            max_shard_bytes=int(ctx.cfg.export.max_shard_bytes),
            extra_files=extra,
            overwrite=bool(ctx.cfg.export.overwrite),
        )
        ctx.artifacts["child_dir"] = out
        ctx.artifacts["recipe"] = recipe
        summary = recipe.ratio_map.summary()
        log.info("merge (%s, genome_hash %s) -> %s\n%s", recipe.kind, recipe.genome_hash, out, summary)
        ctx.tracker.log_summary({"merge/genome_hash": recipe.genome_hash, "merge/kind": recipe.kind})
