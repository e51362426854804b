"""Real sizes (issue 16): trials stream their parents from the files into the model in place, with the
export's bits; the trial model on a device_map; the memory plan and its refusal in preflight; the
delta probe with the reference swapped in a layer at a time; the GPU check script."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from darwin_hydra.io.reader import CheckpointReader
from darwin_hydra.merge.engine import InMemoryMerger, merge_to_disk
from darwin_hydra.merge.recipe import RatioMap, TensorRecipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moe_parents(tmp_path_factory):
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny

    root = tmp_path_factory.mktemp("parents")
    base = save_tiny("qwen3_5_moe", root / "base", seed=0, dtype=torch.bfloat16)
    return [CheckpointReader(p) for p in (base, perturbed_copy(base, root / "father", scale=0.05, seed=1),
                                          perturbed_copy(base, root / "mother", scale=0.05, seed=2))]


def _mixed_map(names):
    """Every kind of recipe a search makes: Darwin's dare_ties blended with linear, transplants both ways,
    statistics methods (ties, slerp, della), router rows copied from the other parent."""
    kinds = [TensorRecipe(method="dare_ties", ratio=0.4, density_a=0.6, density_b=0.5, method_weight=0.7),
             TensorRecipe(method="ties", ratio=0.5, density_b=0.5),
             TensorRecipe(method="slerp", ratio=0.3),
             TensorRecipe(method="dare_ties", ratio=0.9, t_hi=0.85),  # transplanted from the mother
             TensorRecipe(method="dare_ties", ratio=0.05, t_lo=0.15),  # transplanted from the father
             TensorRecipe(method="della", ratio=0.6, density_b=0.7),
             TensorRecipe(method="linear", ratio=0.25)]
    rmap = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    gate = next(n for n in names if n.endswith("mlp.gate.weight"))
    rmap[gate] = TensorRecipe(method="dare_ties", ratio=0.5, rows_from=(("father", (0, 2)),))
    return RatioMap(rmap)


def _bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("trial_dtype", [torch.bfloat16, torch.float32])
def test_streamed_trials_write_the_exported_child_into_the_model(moe_parents, tmp_path, monkeypatch, with_base,
                                                                 trial_dtype):
    """Parents given as readers stay in their files: no tensor of a streamed recipe is read whole, the merger
    holds no parent bytes, and the model holds the exported child bit for bit (a float32 trial model holds
    the bf16 child exactly), through fused experts, transplants and copied router rows."""
    from transformers import AutoModelForCausalLM

    base, father, mother = moe_parents
    base = base if with_base else None
    rmap = _mixed_map(father.names)
    exported = AutoModelForCausalLM.from_pretrained(
        merge_to_disk(father, mother, base, rmap, "h", tmp_path / "child", progress=False), dtype=trial_dtype
    ).state_dict()
    model = AutoModelForCausalLM.from_pretrained(father.path, dtype=trial_dtype).eval()
    monkeypatch.setattr(InMemoryMerger, "BATCH_MAX_ELEMENTS", 0)  # the per-tensor streamed path, as at real size
    merger = InMemoryMerger(model, father, mother, base)
    assert merger.batch is None and merger.held_bytes == 0
    whole = []
    get = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, n: whole.append(n) or get(self, n))
    assert merger.apply(rmap, "h") == len(merger.views)
    streamed = [n for n in merger.views if rmap[n].transplant_side() is None and not rmap[n].rows_from]
    assert streamed and not set(whole) & set(streamed)  # only transplants and copied rows are read whole
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), _bits(exported[k])), k
    # a new genome hash re-merges the random tensors only; an unchanged map nothing
    assert merger.apply(rmap, "h") == 0
    assert 0 < merger.apply(rmap, "h2") < len(merger.views)


def test_the_small_model_batch_is_read_from_the_files_once_and_gives_the_same_bits(moe_parents, tmp_path):
    from transformers import AutoModelForCausalLM

    base, father, mother = moe_parents
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.3, density_a=0.7, density_b=0.6, method_weight=0.8)
                     for n in father.names})
    exported = AutoModelForCausalLM.from_pretrained(
        merge_to_disk(father, mother, base, rmap, "b", tmp_path / "child", progress=False)).state_dict()
    model = AutoModelForCausalLM.from_pretrained(father.path).eval()
    merger = InMemoryMerger(model, father, mother, base)
    assert merger.batch is not None and merger.held_bytes == merger.batch.nbytes
    merger.apply(rmap, "b")
    for k, v in model.state_dict().items():
        assert torch.equal(v, exported[k]), k


def test_a_device_map_places_the_trial_model_and_trials_write_on_its_devices(moe_parents, tmp_path):
    """memory.device_map=auto with a CPU limit (no GPU here: every layer on the CPU) loads through
    accelerate's placement; the session's trials give the exported child."""
    from transformers import AutoModelForCausalLM

    from darwin_hydra.config import compose
    from darwin_hydra.memory import placement
    from darwin_hydra.models import load_model, model_devices

    base, father, mother = moe_parents
    memory = compose(["memory.device_map=auto", "memory.max_memory.cpu=2GiB"]).memory
    kw = placement(memory, "cpu")
    assert kw == {"device": "cpu", "device_map": "auto", "max_memory": {"cpu": 2 << 30}}
    model = load_model(father.path, "float32", **kw)
    assert model_devices(model) == ["cpu"]
    rmap = _mixed_map(father.names)
    InMemoryMerger(model, father, mother, base).apply(rmap, "d")
    exported = AutoModelForCausalLM.from_pretrained(
        merge_to_disk(father, mother, base, rmap, "d", tmp_path / "child", progress=False)).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, exported[k]), k


def test_a_mother_may_lack_only_the_tensors_taken_whole_from_the_father(moe_parents):
    """A text-only mother beside a multimodal father lacks the vision tower: a trial that takes those
    tensors from the father runs; one that would merge them is refused, naming them, before it writes."""
    from transformers import AutoModelForCausalLM

    base, father, mother = moe_parents
    lacking = [n for n in father.names if n.endswith("mlp.gate.weight")][:2]
    partial_mother = {n: mother.get(n) for n in mother.names if n not in lacking}
    model = AutoModelForCausalLM.from_pretrained(father.path).eval()
    merger = InMemoryMerger(model, father, partial_mother, None)
    rmap = {n: TensorRecipe(method="dare_ties", ratio=0.4, density_b=0.6) for n in father.names}
    with pytest.raises(KeyError, match="mother checkpoint lacks 2 tensor"):
        merger.apply(RatioMap(rmap), "x")
    rmap.update({n: TensorRecipe(method="dare_ties", ratio=0.05, t_lo=0.15) for n in lacking})  # the father's whole
    assert merger.apply(RatioMap(rmap), "x") == len(merger.views)
    for n in lacking:
        assert torch.equal(merger.views[n], father.get(n).float())


@pytest.mark.parametrize("arch", ["llama", "qwen3_5_moe", "gemma4"])
def test_delta_probe_from_the_reference_checkpoint_equals_a_loaded_reference(arch, tmp_path):
    """The reference swapped in a layer at a time from its files gives the same numbers, bit for bit, as
    the reference model loaded whole; the model's own weights are back afterwards."""
    from darwin_hydra.mri.probes import layer_importance
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny
    from darwin_hydra.zoo.tokenizer import char_tokenizer

    own = save_tiny(arch, tmp_path / "own", num_layers=3, dtype=torch.bfloat16)
    ref = perturbed_copy(own, tmp_path / "ref", scale=0.2, seed=5)
    from darwin_hydra.models import load_model

    model, loaded = load_model(own), load_model(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = char_tokenizer()
    prompts = {"A": ["the cat sat", "on a mat today", "x"], "B": ["one two three four"]}
    whole = layer_importance(model, tok, prompts, max_length=16, batch_size=2, progress=False, reference=loaded)
    swapped = layer_importance(model, tok, prompts, max_length=16, batch_size=2, progress=False,
                               reference=CheckpointReader(ref))
    assert swapped.delta == whole.delta and swapped.importance == whole.importance
    assert max(max(v) for v in swapped.delta.values()) > 1e-4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- the memory plan -------------------------------------------------------------------------------


def test_sizes_parse_in_decimal_and_binary_units():
    from darwin_hydra.memory import parse_bytes

    assert parse_bytes("70GiB") == 70 << 30 and parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096 and parse_bytes("500mb") == 500_000_000
    for bad in ("lots", "-1GB", "0", True):
        with pytest.raises(ValueError):
            parse_bytes(bad, "memory.host_ram")


@pytest.fixture(scope="module")
def hub_pair(tmp_path_factory):
    from darwin_hydra.testing.hub import perturbed_mother, save_hub_model

    root = tmp_path_factory.mktemp("hub")
    father = save_hub_model("qwen3.5-9b", root / "father")
    return father, perturbed_mother(father, root / "mother")


def _local(pair):
    return ["parents=local", f"parents.father={pair[0]}", f"parents.mother={pair[1]}", "probes=darwin_v6",
            "logger=none"]


def test_preflight_refuses_a_run_that_cannot_fit_in_seconds_naming_the_numbers(hub_pair, tmp_path):
    from darwin_hydra.run import run
    from darwin_hydra.stages.preflight import PreflightError

    t0 = time.perf_counter()
    with pytest.raises(PreflightError) as e:
        run(_local(hub_pair) + ["pipeline.stages=[preflight,scan]", "memory.host_ram=200MB"], tmp_path / "run")
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert "memory plan" in msg and "does not fit" in msg and "cpu: needs" in msg
    assert "has 0.19 GiB (memory.host_ram)" in msg and "short by" in msg
    assert not (tmp_path / "run" / "scan").exists()
    with pytest.raises(PreflightError, match=r"cuda:7: the plan puts .* no such device"):
        run(_local(hub_pair) + ["pipeline.stages=[preflight,scan]", "device=cuda:7"], tmp_path / "run2")


def test_the_plan_stage_alone_prints_every_part_and_the_verdict(hub_pair, tmp_path, caplog):
    import logging

    from darwin_hydra.run import run

    with caplog.at_level(logging.INFO, logger="darwin_hydra.stages.plan"):
        ctx = run(_local(hub_pair) + ["pipeline.stages=[plan]"], tmp_path / "run")
    text = caplog.text
    for part in ("the trial model", "the MRI's model", "the delta probe's reference layer", "the evaluation batch",
                 "parents' files, read through the page cache", "the export's workers"):
        assert part in text, part
    assert "fits (MemAvailable + this process)" in text
    plan = ctx.results.plan
    father = CheckpointReader(hub_pair[0])
    trial = [p for p in plan.parts if p.what == "the trial model"]
    # float32 trial model (parents.dtype's default) of every parameter in the father's files
    assert sum(p.bytes for p in trial) == 2 * father.total_bytes
    assert not plan.shortfalls()


# ---- the GPU check ---------------------------------------------------------------------------------


def test_gpu_check_says_it_skipped_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: test_gpu_check_runs_the_cuda_paths runs the script")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "no CUDA device: skipped" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_check_runs_the_cuda_paths(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and not report["failed"]
