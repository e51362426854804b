"""The child's model card (``child/README.md``) and the run's ``report.md`` share these sections.

The card is what a Hub upload shows: its front matter is ``huggingface_hub``'s ``ModelCardData``
(``base_model``: the parents that are Hub ids, ``base_model_relation: merge``, tags), and it names no
local path (local and zoo parents are described as such). ``report.md`` stays in the run directory and
names the parents as configured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

CARD_TAGS = ("merge", "darwin-hydra")


def reproduce_command(run_dir: Path | str) -> str:
    return f"darwin-hydra-reproduce {run_dir}"


def is_hub_id(spec: str) -> bool:
    """True for a Hugging Face Hub repo id (``org/name`` or ``name``), false for ``zoo://`` URIs and local paths."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    spec = str(spec)
    if spec.startswith(("zoo://", "/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return False
    if Path(spec).expanduser().exists():  # a local directory that looks like org/name
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def parent_label(spec: str) -> str:
    """How the card names a parent: a Hub id as a link, a zoo checkpoint by its place in the zoo, a local
    checkpoint by its directory name (never an absolute path)."""
    spec = str(spec)
    if spec.startswith("zoo://"):
        return f"darwin-hydra's miniature zoo, `{spec[len('zoo://'):].strip('/')}` (a local checkpoint, not on the Hub)"
    if is_hub_id(spec):
        return f"[{spec}](https://huggingface.co/{spec})"
    return f"a local checkpoint, `{Path(spec).expanduser().name or spec}` (not on the Hub)"


def card_data(cfg, recipe):
    """The card's front matter: ``ModelCardData`` with the parents that are Hub ids as ``base_model`` (and
    ``base_model_relation: merge`` when there is one), ``library_name`` and tags."""
    from huggingface_hub import ModelCardData

    hub_parents = [p for p in (cfg.parents.father, cfg.parents.mother) if is_hub_id(p)]
    if recipe.genome is not None:
        method = ["evolutionary-merge", "dare-ties" if recipe.kind == "genome" else "linear"]
    else:
        method = [str(cfg.merge.method).replace("_", "-")]
    extra = {"base_model": hub_parents, "base_model_relation": "merge"} if hub_parents else {}
    return ModelCardData(library_name="transformers", tags=[*CARD_TAGS, *method], **extra)


def recipe_section(ctx, recipe, public: bool = False) -> str:
    """Parents, genome (values, mri_trust, densities, genome_hash) and transplant counts. ``public``: the
    parents as ``parent_label`` names them (the model card), else as configured (the run's report)."""
    cfg = ctx.cfg
    name = parent_label if public else (lambda spec: f"`{spec}`")
    lines = ["## Recipe", ""]
    lines.append(f"- father: {name(cfg.parents.father)}")
    lines.append(f"- mother: {name(cfg.parents.mother)}")
    if cfg.parents.base:
        lines.append(f"- base: {name(cfg.parents.base)}")
    lines.append(f"- genome_hash: `{recipe.genome_hash}`")
    if recipe.genome is not None and recipe.kind != "genome":
        entry = recipe.genome["child"]
        what = (f"one ratio for every tensor, r = {entry['ratio']:.4f}" if entry["kind"] == "uniform" else
                "the MRI's own ratios r_mri(T) and transplants, no genome")
        lines.append(f"- the child is the search's **{entry['kind']}** candidate ({what}): of the search's candidates it "
                     "scored best on the dev split (report: \"Dev candidates\")")
        lines.append("- the search's best genome, not taken, is in `genome.json` (`genes`)")
    elif recipe.genome is not None:
        full = recipe.genome.get("full_genome", recipe.genome["genes"])
        lines.append(f"- genome space: `{recipe.genome.get('space')}`, MRI-seeded start: {recipe.genome.get('mri_seeded')}")
        lines.append(f"- mri_trust (tau): {full.get('mri_trust', 0.0):.4f}")
        lines.append(f"- DARE densities: father {full.get('density_a', 1.0):.4f}, mother {full.get('density_b', 1.0):.4f}")
        lines.append(f"- merge_method_weight: {full.get('merge_method_weight', 1.0):.4f} "
                     f"(dare_ties share; the rest is {cfg.genome.blend_method})")
        if recipe.genome.get("revived_experts"):
            from darwin_hydra.search.genome import revive_gain

            g = full.get("revive_gain", 0.0)
            lines.append(f"- revived experts' router rows: x{revive_gain(g):.2f} the row-norm rule (revive_gain {g:.4f})")
        lines.append("")
        lines.append("| gene | value |")
        lines.append("|---|---|")
        for g, v in recipe.genome["genes"].items():
            lines.append(f"| {g} | {v:.4f} |")
    else:
        from darwin_hydra.config import plain_config

        lines.append(f"- plain merge: `{plain_config(cfg)['merge']}`")
    summary = recipe.ratio_map.summary()
    lines += ["", "Per-tensor recipe: `recipe.json` (every tensor's method, ratio, densities).", "", "```", str(summary), "```"]
    return "\n".join(lines)


def load_section(where: Path | str) -> str:
    return "\n".join(
        [
            "## Load",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            "```",
        ]
    )


def card_body(ctx, recipe, report: Mapping[str, Any] | None, public: bool = False) -> str:
    """The markdown under the front matter: what the child is, its recipe, its evidence (when the report
    ran), how to load and reproduce it. ``report`` holds markdown sections from the report stage.
    ``public`` (the model card): no local paths; else (``report.md``) the run's own paths."""
    cfg = ctx.cfg
    parts = [
        f"# {cfg.parents.name} child ({recipe.genome_hash})",
        "",
        "Bred by darwin-hydra (diagnostic-guided evolutionary merging, Darwin V5/V6 "
        "method): the father's breadth, the mother's strength. Scores below are on a test split the "
        "search never saw.",
        "",
        recipe_section(ctx, recipe, public=public),
        "",
    ]
    if report:
        for key in ("benchmark", "candidates", "health", "charts"):
            if report.get(key):
                parts += [report[key], ""]
    else:
        parts += ["Benchmark and health sections are added by the report stage.", ""]
    if public:
        where, run_dir = cfg.export.hub_repo_id or f"path/to/{ctx.child_dir.name}", "RUN_DIR"
        whence = ", in the run directory it was exported from (`RUN_DIR`, with its `.hydra/config.yaml`)"
    else:
        where, run_dir, whence = ctx.child_dir, ctx.run_dir, ""
    parts += [
        load_section(where),
        "",
        "## Reproduce",
        "",
        "Rebuild this child bit for bit from the run's saved config and genome (checks genome_hash and "
        f"every tensor's sha256 in `checksums.json`){whence}:",
        "",
        "```bash",
        reproduce_command(run_dir),
        "```",
        "",
    ]
    return "\n".join(parts)


def model_card(ctx, recipe, report: Mapping[str, Any] | None) -> str:
    """``child/README.md``: ``card_data``'s front matter over ``card_body(public=True)``."""
    from huggingface_hub import ModelCard

    data = card_data(ctx.cfg, recipe)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(ctx, recipe, report, public=True)}"))


def relpath(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)
