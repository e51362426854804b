"""Issue 20's seed pairs as they are on the Hub: the whole default pipeline (preflight, scan, prescribe,
search in both phases, merge, health, report, reproduce) on faithful tiny copies of Qwen3.5-9B,
Gemma-4-31B-it and Qwen3.5-35B-A3B (multimodal wrapper, vision tower, MTP head, fused experts), and on
a text-only mother beside a multimodal father. Each child has the father's tensor names, shapes, dtypes
and config layout, loads with his class, generates, and its vision tower sees an image."""

import json

import pytest
import torch

from darwin_hydra.io.reader import CheckpointReader
from darwin_hydra.models import load_model, load_tokenizer
from darwin_hydra.reproduce import reproduce
from darwin_hydra.run import run
from darwin_hydra.testing.hub import image_inputs, perturbed_mother, save_hub_model, text_only_mother

PAIRS = [("qwen3.5-9b", "perturbed"), ("gemma-4-31b-it", "perturbed"), ("qwen3.5-35b-a3b", "perturbed"),
         ("qwen3.5-9b", "text_only")]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def bred(request, tmp_path_factory):
    name, kind = request.param
    root = tmp_path_factory.mktemp(f"{name}-{kind}")
    father = save_hub_model(name, root / "father")
    mother = (perturbed_mother if kind == "perturbed" else text_only_mother)(father, root / "mother")
    run_dir = root / "run"
    ctx = run(["experiment=test_tiny", "logger=none", "parents=local", f"parents.father={father}",
               f"parents.mother={mother}", "probes=darwin_v6", "parents.mother_skill=REASONING",
               "optimizer.proxy_prompts=2"], run_dir)
    return name, kind, father, mother, run_dir, ctx


@pytest.mark.slow
def test_every_stage_runs_and_the_child_reproduces(bred):
    name, kind, father, mother, run_dir, ctx = bred
    assert set(ctx.results.seconds) | set(ctx.results.skipped) == {"preflight", "scan", "prescribe", "search",
                                                                   "merge", "health", "report"}
    search = json.loads((run_dir / "search.json").read_text())
    assert {h["phase"] for h in search["history"]} == {1, 2}
    assert (run_dir / "report.md").exists() and json.loads((run_dir / "health.json").read_text())["verdict"]
    assert reproduce(run_dir) == ([], [])


@pytest.mark.slow
def test_the_child_has_the_fathers_layout_and_takes_his_vision_tower_and_mtp_head(bred):
    name, kind, father, mother, run_dir, ctx = bred
    child, dad = CheckpointReader(run_dir / "child"), CheckpointReader(father)
    assert child.names == dad.names
    for n in dad.names:
        assert (child.shape(n), child.dtype(n)) == (dad.shape(n), dad.dtype(n)), n
    outside = [n for n in dad.names if n.startswith(("model.visual.", "model.vision_tower.", "model.embed_vision.", "mtp."))]
    assert outside and all(torch.equal(child.get(n), dad.get(n)) for n in outside)  # parents.outside_decoder=father
    cfg_child = json.loads((run_dir / "child" / "config.json").read_text())
    cfg_father = json.loads((father / "config.json").read_text())
    assert cfg_child["architectures"] == cfg_father["architectures"]
    assert set(cfg_child) - {"dtype"} == set(cfg_father) - {"dtype"}
    assert cfg_child["text_config"]["model_type"] == cfg_father["text_config"]["model_type"]
    if kind == "text_only":  # the decoder came from both: it is not the father's
        layer = next(n for n in dad.names if ".layers.0." in n and n.endswith("proj.weight") and "visual" not in n)
        assert not torch.equal(child.get(layer), dad.get(layer))


@pytest.mark.slow
def test_the_child_loads_with_the_fathers_class_generates_and_sees_an_image(bred):
    name, kind, father, mother, run_dir, ctx = bred
    model = load_model(run_dir / "child")
    assert type(model).__name__ == json.loads((father / "config.json").read_text())["architectures"][0]
    tok = load_tokenizer(run_dir / "child")
    ids = tok("Three boxes are labelled", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    ids, image = image_inputs(name, model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, **image).logits
    assert torch.isfinite(logits).all()


def test_experts_stored_per_expert_beside_a_father_whose_are_fused_are_named_not_merged(tmp_path):
    """A text-only MoE mother saved by save_pretrained of a model built from its config stores her
    experts one key per expert; the Hub father stores them fused. darwin-hydra maps names between
    layouts, not tensor storage: preflight refuses the pair naming the expert tensors, in seconds."""
    from darwin_hydra.stages.preflight import PreflightError

    father = save_hub_model("qwen3.5-35b-a3b", tmp_path / "father")
    mother = text_only_mother(father, tmp_path / "mother")
    with pytest.raises(PreflightError) as e:
        run(["experiment=test_tiny", "logger=none", "parents=local", f"parents.father={father}",
             f"parents.mother={mother}", "probes=darwin_v6", "parents.mother_skill=REASONING"], tmp_path / "run")
    assert "expert storage: father fused" in str(e.value) and "mlp.experts.0.down_proj.weight" in str(e.value)
