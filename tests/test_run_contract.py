"""Issue 15's contract, in process: a bad config is refused when composed or when the run starts; the
preflight names every cheap problem before the scan; a resumed run keeps its saved config, skips what
verifies and refuses a contradicting override; reproduce tells a changed config from changed tensors;
performance settings never change a child."""

import json
import shutil

import pytest
import torch
from hydra.errors import ConfigCompositionException

from darwin_hydra.config import ConfigError, compose
from darwin_hydra.run import ResumeConflictError, run
from darwin_hydra.stages.preflight import PreflightError
from darwin_hydra.testing import console_script

TINY = ["experiment=test_tiny", "logger=none"]


# ---- compose and start ---------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["merge.method=tis", "optimizer.proxy_teacher=foo", "mri.blend=rawx",
                                      "logger.mode=onlin", "parents.dtype=float33", "genome.router_source=[mom]",
                                      "mri.moe_dead_rule=sometimes", "genome.blend_method=avg"])
def test_a_value_outside_its_choices_is_refused_at_compose(override):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert override.split("=")[0] in str(e.value)


@pytest.mark.parametrize("override,named", [("+merge.ratoi=0.3", "merge.ratoi (did you mean merge.ratio?)"),
                                            ("+parents.fahter=/x", "parents.fahter (did you mean parents.father?)"),
                                            ("+optimizer.phase1=3", "optimizer.phase1")])
def test_a_key_outside_the_schema_is_refused_even_with_plus(override, named):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert named in str(e.value)


@pytest.mark.parametrize("override,named", [
    ("genome.bounds.mri_trust=[0.9,0.1]", "genome.bounds.mri_trust=[0.9, 0.1]"),
    ("merge.ratio=1.5", "merge.ratio=1.5 must lie in [0, 1]"),
    ("optimizer.phase1_trials=0", "optimizer.phase1_trials=0"),
    ("mri.t_lo=0.9", "mri.t_lo=0.9"),
    ("device=gpu", "device='gpu'"),
    ("parents.mother_skill=POETRY", "parents.mother_skill='POETRY' is not a probe set"),
    ("export.push_to_hub=true", "export.hub_repo_id"),
])
def test_a_value_out_of_range_is_refused_when_the_run_starts(override, named):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert named in str(e.value)


def test_probe_sets_are_added_replaced_and_removed_from_the_command_line():
    probes = compose(["probes.sets.COPY.source=/data/copy.jsonl", "probes.sets.COPY.n=4"]).probes
    assert probes.sets["COPY"].source == "/data/copy.jsonl" and probes.sets["COPY"].n == 4
    assert probes.sets["COPY"].field == "text"  # the other fields take the schema's defaults
    assert compose(["+probes.sets.COPY={source: a.jsonl, weight: 2.0}"]).probes.sets["COPY"].weight == 2.0
    assert compose(["probes.sets.MATH={source: mine.jsonl}"]).probes.sets["MATH"].source == "mine.jsonl"
    assert set(compose(["~probes.sets.CODE", "~probes.sets.LANGUAGE"]).probes.sets) == {"MATH", "KNOWLEDGE"}
    with pytest.raises(ConfigError, match="parents.mother_skill=.MATH. is not a probe set"):
        compose(["~probes.sets.MATH"])  # the set the mother is known for cannot go silently
    with pytest.raises(ConfigError, match=r"probes.sets.MATH: unknown key\(s\) \['feild'\]"):
        compose(["probes.sets.MATH.feild=x"])


# ---- preflight -----------------------------------------------------------------------------------


def test_preflight_names_every_missing_parent_at_once_and_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(PreflightError) as e:
        run(["parents=local", "parents.father=/nope/father", "parents.mother=/nope/mother", "logger=wandb"], run_dir)
    assert "parents.father=/nope/father" in str(e.value) and "parents.mother=/nope/mother" in str(e.value)
    assert not (run_dir / "scan").exists() and not (run_dir / "wandb").exists()


def _task_dir(tmp_path):
    """A local lm-eval task that reports perplexity alone: no per-item acc, acc_norm or exact_match."""
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "items.jsonl").write_text("".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(4)))
    (d / "ppl_task.yaml").write_text(
        "task: ppl_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(d / "items.jsonl")
        + "\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: perplexity\n")
    return d


def test_preflight_refuses_unknown_and_unusable_tasks_before_the_scan(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(PreflightError) as e:
        run(TINY + ["benchmark.fitness_tasks=[zoo_nope_dev]"], run_dir)
    assert "zoo_nope_dev" in str(e.value)
    assert not (run_dir / "scan").exists()
    tasks = _task_dir(tmp_path)
    with pytest.raises(PreflightError) as e:
        run(TINY + [f"benchmark.include_path={tasks}", "benchmark.fitness_tasks=[ppl_task]",
                    "benchmark.report_tasks=[ppl_task]", "benchmark.allow_fitness_on_report=true"], tmp_path / "run2")
    assert "'ppl_task'" in str(e.value) and "per-item exact_match / acc_norm / acc" in str(e.value)
    assert not (tmp_path / "run2" / "scan").exists()


def test_preflight_names_an_empty_probe_set_and_a_bad_genome(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(PreflightError) as e:
        run(TINY + [f"probes.sets.MATH.source={empty}", "+genome.bounds.warp_ratio=[0,1]"], tmp_path / "run")
    msg = str(e.value)
    assert "probes.sets.MATH" in msg and "no non-blank text" in msg
    assert "genome=darwin_v6" in msg and "warp_ratio" in msg


# ---- auto_map code -------------------------------------------------------------------------------


def _tiny_pair(tmp_path):
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny

    father = save_tiny("llama", tmp_path / "father")
    mother = perturbed_copy(father, tmp_path / "mother")
    shutil.copy(father / "config.json", mother / "config.json")
    from darwin_hydra.zoo.tokenizer import char_tokenizer

    for d in (father, mother):
        char_tokenizer().save_pretrained(d)
    return father, mother


def test_a_fathers_auto_map_code_goes_with_the_child_or_is_named_missing(tmp_path):
    father, mother = _tiny_pair(tmp_path)
    cfg = json.loads((father / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyLM"}
    (father / "config.json").write_text(json.dumps(cfg))
    (father / "configuration_tiny.py").write_text("# the father's config code\n")
    plain = ["parents=local", f"parents.father={father}", f"parents.mother={mother}", "logger=none",
             "pipeline.stages=[preflight,merge]", "merge=linear"]
    with pytest.raises(PreflightError, match=r"auto_map names code the directory lacks: \['modeling_tiny.py'\]"):
        run(plain, tmp_path / "run1")
    (father / "modeling_tiny.py").write_text("# the father's model code\n")
    ctx = run(plain, tmp_path / "run2")
    child = ctx.results.merge.dir
    assert (child / "modeling_tiny.py").read_text() == "# the father's model code\n"
    assert (child / "configuration_tiny.py").exists()
    assert json.loads((child / "config.json").read_text())["auto_map"] == cfg["auto_map"]


# ---- performance settings ------------------------------------------------------------------------


def test_workers_processes_and_device_never_change_a_child(tmp_path):
    children = {}
    for i, perf in enumerate([["merge.workers=0"], ["merge.workers=2"], ["merge.workers=1"],
                              ["merge.workers=2", "merge.processes=false"], ["merge.device=auto"]]):
        ctx = run(TINY + ["pipeline.stages=[merge]", "merge=dare_ties", *perf], tmp_path / f"run{i}")
        exported = ctx.results.merge
        children[str(perf)] = (exported.recipe.genome_hash,
                               json.loads((exported.dir / "checksums.json").read_text())["tensors"])
    assert len({json.dumps(v, sort_keys=True) for v in children.values()}) == 1, children.keys()


# ---- resume and reproduce ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A whole run made with overrides (test_tiny, 5 phase-1 trials, W&B offline)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(["experiment=test_tiny", "logger=wandb", "logger.mode=offline", "optimizer.phase1_trials=5"], run_dir)
    return run_dir


def test_a_resumed_run_keeps_its_config_skips_what_verifies_and_continues_its_wandb_run(finished_run):
    saved = (finished_run / ".hydra" / "config.yaml").read_bytes()
    tracking = json.loads((finished_run / "tracking.json").read_text())
    ctx = run([], finished_run)  # README's resume: hydra.run.dir only
    assert ctx.cfg.optimizer.phase1_trials == 5 and ctx.cfg.zoo.name == "tiny"  # the run's config, not the default
    assert ctx.results.skipped == ["scan", "search", "merge", "health", "report"]
    assert (finished_run / ".hydra" / "config.yaml").read_bytes() == saved
    assert json.loads((finished_run / "tracking.json").read_text())["run_id"] == tracking["run_id"]


def test_a_contradicting_override_is_refused_naming_it_and_a_free_one_is_taken(finished_run):
    saved = (finished_run / ".hydra" / "config.yaml").read_bytes()
    with pytest.raises(ResumeConflictError) as e:
        run(["optimizer.phase1_trials=6", "merge.method=ties"], finished_run)
    assert "optimizer.phase1_trials: the run used 5, this call says 6" in str(e.value)
    assert "merge.method: the run used 'dare_ties', this call says 'ties'" in str(e.value)
    with pytest.raises(ResumeConflictError, match="zoo: the run used 'tiny', this call says 'default'"):
        run(["zoo=default"], finished_run)
    assert (finished_run / ".hydra" / "config.yaml").read_bytes() == saved
    ctx = run(["merge.workers=1"], finished_run)
    assert ctx.cfg.merge.workers == 1 and "merge" in ctx.results.skipped


def test_reproduce_tells_a_changed_config_from_changed_tensors(finished_run, tmp_path):
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.reproduce import reproduce

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    assert reproduce(copy) == ([], [])
    cfg = copy / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("phase1_trials: 5", "phase1_trials: 9"))
    problems, changes = reproduce(copy)
    assert problems == [] and changes == ["optimizer.phase1_trials: 5 at export, 9 now"]
    reader = CheckpointReader(copy / "child")
    name = reader.names[3]
    entry, path = reader.entry(name), reader.file_of(name)
    reader.close()
    data = bytearray(path.read_bytes())
    data[entry.start] ^= 0xFF
    path.write_bytes(bytes(data))
    problems, _ = reproduce(copy)
    assert problems == [f"exported {name}: sha256 differs"]


def test_a_changed_parent_makes_the_saved_scan_stale(tmp_path):
    from safetensors.torch import load_file, save_file

    father, mother = _tiny_pair(tmp_path)
    args = ["parents=local", f"parents.father={father}", f"parents.mother={mother}", "logger=none",
            "probes=zoo_tiny", "zoo=tiny", "pipeline.stages=[scan]"]
    run_dir = tmp_path / "run"
    run(args, run_dir)
    assert run(args, run_dir).results.skipped == ["scan"]
    weights = load_file(mother / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, mother / "model.safetensors", metadata={"format": "pt"})
    assert run(args, run_dir).results.skipped == []  # scanned again: the mother is not the one scanned


def test_reproduce_refuses_parents_the_child_was_not_bred_from(tmp_path):
    from safetensors.torch import load_file, save_file

    from darwin_hydra.reproduce import CannotReproduceError, main, reproduce

    father, mother = _tiny_pair(tmp_path)
    run_dir = tmp_path / "run"
    run(["parents=local", f"parents.father={father}", f"parents.mother={mother}", "logger=none",
         "pipeline.stages=[merge]", "merge=ties"], run_dir)
    assert reproduce(run_dir) == ([], [])
    weights = load_file(mother / "model.safetensors")
    name = sorted(weights)[0]
    save_file(weights | {name: weights[name] * 2}, mother / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CannotReproduceError, match="the parents are not the ones"):
        reproduce(run_dir)
    assert main([str(run_dir)]) == 2


def test_a_group_option_of_your_own_from_your_config_directory(tmp_path):
    import subprocess

    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "mine.yaml").write_text("name: mine\nsets:\n  MATH: {source: /data/math.jsonl, n: 5}\n")
    p = subprocess.run(console_script("darwin-hydra") + ["--config-dir", str(tmp_path), "probes=mine", "--cfg", "job"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "source: /data/math.jsonl" in p.stdout and "name: mine" in p.stdout


@pytest.mark.slow
def test_a_seed_preset_without_its_weights_and_datasets_names_them_all_in_preflight(tmp_path, monkeypatch):
    """README's presets offline (no weights in the HF cache, no network): refused before the scan, naming
    both Hub parents and the benchmark's datasets, with nothing of W&B created."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    run_dir = tmp_path / "run"
    with pytest.raises(PreflightError) as e:
        run(["experiment=darwin_31b_opus", "logger=wandb"], run_dir)
    msg = str(e.value)
    assert "google/gemma-4-31B-it" in msg and "TeichAI/gemma-4-31B-it-Claude-Opus-Distill" in msg
    assert "arc_challenge" in msg and "gpqa" in msg
    assert not (run_dir / "scan").exists() and not (run_dir / "wandb").exists()
