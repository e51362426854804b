#!/usr/bin/env python
"""Dead-expert revival with the genome held fixed: its own effect on the zoo's MoE child, without the
search's seed-to-seed noise (issue 8).

For a few two-block linear merges of the default zoo's MoE pair (ratio r_lo in layers 0-3, r_hi in
4-7; no random masks), builds the child without and with revival (the plan a run makes: the MoE scan
of both parents on the zoo's probe prompts), scores both on the test split and prints the
paired-bootstrap difference.

    python scripts/revival_ab.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    from darwin_hydra.arch import tensor_info
    from darwin_hydra.evaluate.benchmark import evaluate_model
    from darwin_hydra.evaluate.stats import paired_bootstrap
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.merge.engine import merge_to_disk
    from darwin_hydra.merge.recipe import RatioMap, TensorRecipe
    from darwin_hydra.config import compose
    from darwin_hydra.mri.moe import moe_scan
    from darwin_hydra.mri.probes import load_probe_prompts
    from darwin_hydra.mri.scan import load_model
    from darwin_hydra.search.recipe import apply_moe_rules, revival_plan
    from darwin_hydra.zoo import default_cache_dir, ensure_zoo, load_metadata, resolve_zoo_uri
    from darwin_hydra.zoo.config import load_zoo_config

    cfg = load_zoo_config("default")
    root = ensure_zoo(cfg, default_cache_dir())
    n_layers = load_metadata(root)["pairs"]["moe"]["num_layers"]
    tok = AutoTokenizer.from_pretrained(root / "moe" / "father")
    # The plan a run makes: the MoE scan of each parent on the pooled zoo probe prompts, then revival_plan.
    probes = compose(["probes=zoo"]).probes
    prompts = load_probe_prompts(probes, lambda u: str(resolve_zoo_uri(u, cfg, default_cache_dir())))
    scans = {role: moe_scan(load_model(root / "moe" / role), tok, prompts, progress=False) for role in ("father", "mother")}
    plan = revival_plan(scans["father"], scans["mother"])
    print(f"revival plan (layer: experts): {plan}")
    father, mother = CheckpointReader(root / "moe" / "father"), CheckpointReader(root / "moe" / "mother")
    tmp = Path(tempfile.mkdtemp(prefix="revival_ab-"))
    try:
        for r_lo, r_hi in ((1.0, 0.0), (0.9, 0.0), (0.8, 0.1)):
            scores = {}
            for tag, revive in (("without", None), ("with", plan)):
                recipes = {}
                for n in father.names:
                    layer = tensor_info(n).layer
                    recipes[n] = TensorRecipe(method="linear", ratio=r_lo if layer is not None and layer < n_layers // 2 else r_hi)
                if revive:
                    recipes = apply_moe_rules(recipes, n_layers, None, revive)
                out = merge_to_disk(father, mother, None, RatioMap(recipes), "revival-ab", tmp / f"{r_lo}-{r_hi}-{tag}",
                                    progress=False)  # config and tokenizer come with it, from the father
                model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                res = evaluate_model(model, tok, ["zoo_skills_test"], root / "tasks")
                scores[tag] = ({k: np.asarray(v.correct, dtype=float) for k, v in res.tasks.items()}, res.mean)
            d, lo, hi = paired_bootstrap(scores["with"][0], scores["without"][0])
            print(f"blocks r={r_lo} in layers 0-{n_layers // 2 - 1}, r={r_hi} above: with revival "
                  f"{100 * scores['with'][1]:.1f}, without {100 * scores['without'][1]:.1f}, "
                  f"difference {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
