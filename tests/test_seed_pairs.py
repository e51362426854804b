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
               "optimizer.proxy_prompts=2",
               # random-weight models score 0 on every dev task, so the dev candidates tie and the simplest,
               # the uniform merge at r=0 (the father himself), would be the child; these tests are about
               # merging the two layouts, so the child is the search's genome
               "optimizer.child_candidates=[genome]"], run_dir)
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


@pytest.mark.slow
def test_a_per_expert_mother_beside_a_fused_father_is_named_then_fused_and_bred(tmp_path):
    """A text-only MoE mother saved by save_pretrained (one key per expert) beside the Hub's fused father:
    preflight refuses the pair in seconds naming both storages and the command that fixes it;
    darwin-hydra-fuse-experts writes her with fused experts (same class, same outputs), and the pair then
    runs every stage and reproduces."""
    from darwin_hydra.io.experts import main as fuse_main
    from darwin_hydra.stages.preflight import PreflightError

    father = save_hub_model("qwen3.5-35b-a3b", tmp_path / "father")
    mother = text_only_mother(father, tmp_path / "mother")
    common = ["experiment=test_tiny", "logger=none", "parents=local", f"parents.father={father}", "probes=darwin_v6",
              "parents.mother_skill=REASONING", "optimizer.proxy_prompts=2"]
    with pytest.raises(PreflightError) as e:
        run(common + [f"parents.mother={mother}"], tmp_path / "refused")
    msg = str(e.value)
    assert "expert storage: father fused" in msg and "mlp.experts.0.down_proj.weight" in msg
    assert f"darwin-hydra-fuse-experts {mother} {mother}-fused" in msg

    fused = tmp_path / "mother-fused"
    assert fuse_main([str(mother), str(fused)]) == 0
    names = CheckpointReader(fused).names
    assert not any(".experts.0." in n for n in names) and any(n.endswith("mlp.experts.gate_up_proj") for n in names)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        before = load_model(mother, dtype="float32").eval()(input_ids=ids).logits
        after = load_model(fused, dtype="float32").eval()(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    run_dir = tmp_path / "run"
    run(common + [f"parents.mother={fused}"], run_dir)
    assert reproduce(run_dir) == ([], [])
    child, dad = CheckpointReader(run_dir / "child"), CheckpointReader(father)
    assert child.names == dad.names and all(child.shape(n) == dad.shape(n) for n in dad.names)


def test_the_side_named_for_fusing_is_the_one_stored_per_expert():
    from darwin_hydra.io.compat import _expert_storage

    fused, per = "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.3.up_proj.weight"
    assert _expert_storage([fused], [per]) == (fused, per, True)  # the reference (father) fused
    assert _expert_storage([per], [fused]) == (fused, per, False)  # the father per expert: fuse him
    assert _expert_storage([per], []) is None
