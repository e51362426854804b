"""The child's model card (``child/README.md``) and the run's ``report.md`` share these sections."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping


def reproduce_command(run_dir: Path) -> str:
    return f"darwin-hydra-reproduce {run_dir}"


def recipe_section(ctx, recipe) -> str:
    """Parents, genome (values, mri_trust, densities, genome_hash) and transplant counts."""
    cfg = ctx.cfg
    lines = ["## Recipe", ""]
    lines.append(f"- father: `{cfg.parents.father}`")
    lines.append(f"- mother: `{cfg.parents.mother}`")
    if cfg.parents.base:
        lines.append(f"- base: `{cfg.parents.base}`")
    lines.append(f"- genome_hash: `{recipe.genome_hash}`")
    if recipe.genome is not None:
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


def load_section(child_dir: Path) -> str:
    return "\n".join(
        [
            "## Load",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{child_dir}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{child_dir}")',
            "```",
        ]
    )


def model_card(ctx, recipe, report: Mapping[str, Any] | None) -> str:
    """``child/README.md``: what the child is, its recipe, its evidence (when the report ran), how to
    load and reproduce it. ``report`` holds markdown sections from the report stage."""
    cfg = ctx.cfg
    parts = [
        "---",
        "library_name: transformers",
        "tags: [merge, darwin-hydra, dare-ties, evolutionary-merge]",
        "---",
        "",
        f"# {cfg.parents.name} child ({recipe.genome_hash})",
        "",
        "Bred by darwin-hydra (diagnostic-guided evolutionary merging, Darwin V5/V6 "
        "method): the father's breadth, the mother's strength. Scores below are on a test split the "
        "search never saw.",
        "",
        recipe_section(ctx, recipe),
        "",
    ]
    if report:
        for key in ("benchmark", "health", "charts"):
            if report.get(key):
                parts += [report[key], ""]
    else:
        parts += ["Benchmark and health sections are added by the report stage.", ""]
    parts += [
        load_section(ctx.child_dir),
        "",
        "## Reproduce",
        "",
        "Rebuild this child bit for bit from the run's saved config and genome (checks genome_hash and "
        "every tensor's sha256 in `checksums.json`):",
        "",
        "```bash",
        reproduce_command(ctx.run_dir),
        "```",
        "",
    ]
    return "\n".join(parts)


def relpath(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)
