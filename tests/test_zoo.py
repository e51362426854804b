"""The zoo: files a user (and every stage) relies on, the ground truth, caching, determinism; and, marked
slow, the default zoo being a fair stage for merging (issue criteria 4a and 4b on the test split)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from darwin_hydra.zoo import ensure_zoo, load_metadata, resolve_zoo_uri, zoo_hash
from darwin_hydra.zoo import build as build_mod
from darwin_hydra.zoo.config import TrainSpec, ZooConfig, load_zoo_config, validate
from darwin_hydra.zoo.skills import SkillParams, TrainStream, eval_splits



@pytest.fixture(scope="session")
def tiny_cfg() -> ZooConfig:
    return load_zoo_config("tiny")


@pytest.fixture(scope="session")
def tiny_root(tiny_cfg, tmp_path_factory) -> Path:
    return ensure_zoo(tiny_cfg, tmp_path_factory.getbasetemp() / "zoo-cache")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ layout


def test_tiny_zoo_has_loadable_checkpoints_tasks_and_probes(tiny_root, tiny_cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert tiny_root.name == f"zoo-{zoo_hash(tiny_cfg)}"
    for pair in ("dense", "moe"):
        for role in ("base", "father", "mother"):
            d = tiny_root / pair / role
            for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                assert (d / f).is_file(), f"{d / f} missing"
        model = AutoModelForCausalLM.from_pretrained(tiny_root / pair / "father")
        assert model.config.num_hidden_layers == getattr(tiny_cfg, pair).num_layers
    assert AutoModelForCausalLM.from_pretrained(tiny_root / "moe" / "mother").config.num_experts == 8
    tok = AutoTokenizer.from_pretrained(tiny_root / "dense" / "mother")
    ids = tok("12+34=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("12+34=")  # <s> + one token per character
    assert tok.decode(ids, skip_special_tokens=True) == "12+34="

    for skill in tiny_cfg.skills:
        for split in ("dev", "test"):
            assert (tiny_root / "tasks" / f"zoo_{skill}_{split}.yaml").is_file()
            rows = (tiny_root / "tasks" / f"{skill}_{split}.jsonl").read_text().splitlines()
            assert len(rows) == getattr(tiny_cfg, f"{split}_items")
    for group in ("zoo_skills_dev", "zoo_skills_test"):
        assert (tiny_root / "tasks" / f"{group}.yaml").is_file()
    for cat in ("MATH", "LANGUAGE", "CODE", "KNOWLEDGE"):
        rows = [json.loads(line) for line in (tiny_root / "probes" / f"{cat}.jsonl").read_text().splitlines()]
        assert len(rows) == tiny_cfg.probe_items and all(r["text"].endswith("=") for r in rows)


def test_metadata_records_where_each_parent_changed(tiny_root, tiny_cfg):
    meta = load_metadata(tiny_root)
    assert meta["hash"] == zoo_hash(tiny_cfg) and meta["root"] == str(tiny_root)
    assert meta["skill_to_category"] == {"add": "MATH", "rev": "LANGUAGE", "sort": "CODE", "map": "KNOWLEDGE"}
    assert meta["mother_skill"] == "add"
    for pair in ("dense", "moe"):
        info = meta["pairs"][pair]
        n = info["num_layers"]
        truth = info["ground_truth"]
        assert truth["mother_layers"] == list(range(n // 2))
        assert truth["father_layers"] == list(range(n // 2, n))
        for role in ("father", "mother"):
            member = info["members"][role]
            assert member["updated_tensors"], f"{pair}/{role}: training changed nothing"
            # Embeddings, head and final norm stay frozen: every changed tensor sits in a trained layer.
            assert all(".layers." in t for t in member["updated_tensors"])
            assert set(member["updated_components"]) <= {"attn", "ffn", "norm", "router", "expert", "shared_expert"}
            assert set(member["scores_test"]) == {*tiny_cfg.skills, "mean"}
    moe = meta["pairs"]["moe"]
    assert any(".experts." in t for t in moe["members"]["mother"]["updated_tensors"])  # canonical per-expert names
    assert set(moe["experts"]["summary"]) == {"base", "father", "mother"}
    assert meta["pairs"]["moe"]["members"]["mother"]["specialised_skill"] == "add"


def test_the_zoo_probe_sets_point_at_the_zoo_probe_files(tiny_root):
    from darwin_hydra.config import compose

    for name in ("zoo", "zoo_tiny"):
        probes = compose([f"probes={name}"]).probes
        assert set(probes.sets) == {"MATH", "LANGUAGE", "CODE", "KNOWLEDGE"}
        for cat, spec in probes.sets.items():
            path = resolve_zoo_uri(spec.source, load_zoo_config("tiny"), tiny_root.parent)
            assert path == tiny_root / "probes" / f"{cat}.jsonl" and path.is_file()


# --------------------------------------------------------------------------------- cache, atomicity


def test_second_call_reuses_the_cached_zoo(tiny_root, tiny_cfg, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the zoo was rebuilt although it is cached")

    monkeypatch.setattr(build_mod, "build_zoo", no_build)
    assert ensure_zoo(tiny_cfg, tiny_root.parent) == tiny_root


def test_resolve_zoo_uri(tiny_root, tiny_cfg):
    cache = tiny_root.parent
    assert resolve_zoo_uri("zoo://dense/father", tiny_cfg, cache) == tiny_root / "dense" / "father"
    assert resolve_zoo_uri("zoo://moe/mother", tiny_cfg, cache) == tiny_root / "moe" / "mother"
    assert resolve_zoo_uri("zoo://tasks", tiny_cfg, cache) == tiny_root / "tasks"
    assert resolve_zoo_uri("zoo://probes/MATH.jsonl", tiny_cfg, cache).is_file()
    assert resolve_zoo_uri("/some/where", tiny_cfg, cache) == Path("/some/where")
    with pytest.raises(FileNotFoundError, match="zoo://dense/uncle"):
        resolve_zoo_uri("zoo://dense/uncle", tiny_cfg, cache)
    with pytest.raises(ValueError, match="outside"):
        resolve_zoo_uri("zoo://../elsewhere", tiny_cfg, cache)


def test_killed_build_leaves_no_finished_looking_zoo(tiny_cfg, tmp_path, monkeypatch):
    cfg = load_zoo_config("tiny", ["seed=7", "pairs=[dense]"])

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "train_all", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_zoo(cfg, tmp_path)
    assert not (tmp_path / f"zoo-{zoo_hash(cfg)}").exists()
    assert not list(tmp_path.glob("zoo-*.tmp-*"))
    # A leftover from a hard kill (no cleanup ran) is removed by the next build.
    (tmp_path / f"zoo-{zoo_hash(cfg)}.tmp-99999").mkdir()
    monkeypatch.undo()
    root = ensure_zoo(cfg, tmp_path)
    assert (root / "metadata.json").is_file() and not list(tmp_path.glob("zoo-*.tmp-*"))


def test_moved_zoo_rewrites_its_task_paths(tiny_root, tiny_cfg, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_root, moved / tiny_root.name)
    root = ensure_zoo(tiny_cfg, moved)
    assert root == moved / tiny_root.name
    text = (root / "tasks" / "zoo_add_test.yaml").read_text()
    assert str(root / "tasks" / "add_test.jsonl") in text
    assert load_metadata(root)["root"] == str(root)


def test_same_seed_gives_bit_identical_weights_whatever_the_workers_and_the_cpu_kernels(
    tiny_root, tmp_path, monkeypatch
):
    # workers is not part of the hash: one thread per job makes the result independent of it. The
    # machine's kernels are not either: asking for other vector kernels (ATen's AVX2 ones, MKL's AVX2
    # code path) must not reach the training processes, which run with PORTABLE_NUMERICS.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    cfg = load_zoo_config("tiny", ["workers=2"])
    again = ensure_zoo(cfg, tmp_path)
    assert again.name == tiny_root.name
    for pair in ("dense", "moe"):
        for role in ("base", "father", "mother"):
            rel = Path(pair) / role / "model.safetensors"
            assert _sha(again / rel) == _sha(tiny_root / rel), f"{rel} differs between two builds"
    for rel in ("tasks/add_test.jsonl", "probes/MATH.jsonl"):
        assert _sha(again / rel) == _sha(tiny_root / rel)


def test_training_outside_portable_numerics_is_refused(monkeypatch):
    # This process's torch chose its kernels at import, and the environment does not ask for the
    # portable ones: a member trained here would depend on the CPU, so run_job refuses to start.
    from darwin_hydra.zoo.train import PORTABLE_NUMERICS, check_portable_numerics

    for key in PORTABLE_NUMERICS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="ATEN_CPU_CAPABILITY"):
        check_portable_numerics()


def test_hash_follows_the_config_but_not_the_worker_count():
    base = load_zoo_config("tiny")
    assert zoo_hash(base) == zoo_hash(load_zoo_config("tiny", ["workers=4"]))
    assert zoo_hash(base) != zoo_hash(load_zoo_config("tiny", ["seed=1"]))
    assert zoo_hash(base) != zoo_hash(load_zoo_config("tiny", ["father.steps=7"]))


# ---------------------------------------------------------------------------------- config, splits


@pytest.mark.parametrize("name", ["default", "tiny", "revival"])
def test_every_zoo_option_is_a_valid_zoo(name):
    validate(load_zoo_config(name))


def test_the_default_zoo_keeps_its_hash():
    # conf/zoo/default.yaml and ZooConfig() describe the same zoo, the one the README's figures and every
    # cache hold (a change to either rebuilds it: bump the literal only on purpose)
    assert zoo_hash(load_zoo_config("default")) == zoo_hash(ZooConfig()) == "f350fad1fb3a"


def test_revival_zoo_is_the_default_whose_mother_keeps_no_rev():
    # issue 8's stage: one change to the default recipe (README figures), kept in step with it
    rev, default = load_zoo_config("revival"), load_zoo_config("default")
    assert rev.mother.keep == {**default.mother.keep, "rev": 0.0} and default.mother.keep["rev"] > 0
    rev.mother.keep, rev.name = dict(default.mother.keep), default.name
    assert zoo_hash(rev) == zoo_hash(default)


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="zoo.mother_skill"):
        validate(ZooConfig(mother_skill="poetry"))
    with pytest.raises(ValueError, match="zoo.father.layers"):
        validate(ZooConfig(father=TrainSpec(layers="middle")))
    with pytest.raises(Exception, match="not_a_field"):
        load_zoo_config("tiny", ["not_a_field=1"])
    with pytest.raises(ValueError, match="zoo.mother.keep: 'poetry'"):
        validate(ZooConfig(mother=TrainSpec(layers="lower", keep={"poetry": 1.0}, keep_weight=1.0)))
    with pytest.raises(ValueError, match="zoo.father: keep_weight=1.0"):
        validate(ZooConfig(father=TrainSpec(layers="upper", keep_weight=1.0)))
    with pytest.raises(ValueError, match="zoo.mother.keep=.*positive sum"):
        validate(ZooConfig(mother=TrainSpec(layers="lower", keep={"rev": 0.0}, keep_weight=1.0)))
    with pytest.raises(ValueError, match="zoo.base.keep_weight"):
        validate(ZooConfig(base=TrainSpec(keep={"add": 1.0}, keep_weight=1.0)))


def test_keep_term_measures_drift_at_the_end_of_the_trained_span(tiny_root):
    """The keep loss is 0 for the starting checkpoint itself, grows when a trained layer moves, and
    only the member's trained layers receive its gradient (its reference stays frozen)."""
    import torch
    from transformers import AutoModelForCausalLM

    from darwin_hydra.zoo.train import Encoder, TrainJob, _freeze_except, _Keep
    from darwin_hydra.zoo.tokenizer import char_tokenizer

    cfg = load_zoo_config("tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "dense" / "base", dtype=torch.float32)
    spec = TrainSpec(layers="lower", keep={"rev": 1.0}, keep_weight=1.0, keep_batch_size=8)
    job = TrainJob("dense", "mother", cfg.dense, spec, list(cfg.skills), SkillParams(), frozenset(), 0, "unused")
    _freeze_except(model, "lower")
    keep = _Keep(model, job, SkillParams())
    assert keep.index == cfg.dense.num_layers // 2  # the input of the first layer the mother leaves alone
    enc = Encoder(char_tokenizer())
    assert keep.loss(model, enc).item() == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    loss = keep.loss(model, enc)
    assert loss.item() > 0
    loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.layers[-1].parameters())
    assert all(not p.requires_grad for p in keep.ref.parameters())


def test_splits_are_disjoint_and_training_never_sees_them():
    params = SkillParams(add_digits=2)
    for skill in ("add", "rev", "sort", "map"):
        splits = eval_splits(skill, params, {"dev": 400, "test": 400, "probe": 64}, seed=0)
        prompts = [p for items in splits.values() for p, _ in items]
        assert len(prompts) == len(set(prompts)) == 864
        assert splits == eval_splits(skill, params, {"dev": 400, "test": 400, "probe": 64}, seed=0)
    held = {p for p, _ in eval_splits("add", params, {"dev": 400, "test": 400, "probe": 64}, 0)["test"]}
    stream = TrainStream({"add": 1.0}, params, held, seed=0, purpose="t")
    assert not held & {p for p, _ in stream.batch(5000)}


def test_skill_answers_are_right():
    import random

    from darwin_hydra.zoo.skills import SKILLS

    rng = random.Random(0)
    p = SkillParams(add_digits=2)
    for _ in range(50):
        q, a = SKILLS["add"].sample(rng, p)
        x, y = q[:-1].split("+")
        assert int(x) + int(y) == int(a) and len(a) == 3
        q, a = SKILLS["sort"].sample(rng, p)
        assert a == "".join(sorted(q[5:-1]))
        q, a = SKILLS["rev"].sample(rng, p)
        assert a == q[4:-1][::-1]


# ------------------------------------------------------------------------ the stage is fair (slow)


@pytest.mark.slow
def test_default_zoo_is_a_fair_stage_for_merging():
    """Issue criteria 4a/4b on the test split, scored by lm-eval: the mother leads by >= 30 on her skill,
    the father by >= 20 on another (4a); some merge beats the better parent's skill average by >= 5
    (4b), and a per-layer (two-block) child does better than every uniform merge.
    Builds the default zoo once per machine (cache: $DARWIN_HYDRA_CACHE or ~/.cache/darwin_hydra)."""
    from darwin_hydra.zoo.table import fairness, format_table, uniform_merge_table

    cfg = load_zoo_config("default")
    root = ensure_zoo(cfg, os.environ.get("DARWIN_HYDRA_CACHE") or Path.home() / ".cache" / "darwin_hydra")
    meta = load_metadata(root)
    for pair in ("dense", "moe"):
        table = uniform_merge_table(root, pair=pair, split="test")
        verdict = fairness(table)
        report = f"\n{pair}:\n{format_table(table)}\n{verdict}"
        assert verdict["4a"], report
        assert verdict["mother_gain_on_her_skill"] >= 30, report
        assert max(verdict["father_gain_by_skill"].values()) >= 20, report
        assert verdict["4b"] and verdict["best_child_margin"] >= 5, report
        assert verdict["best_child_margin"] > verdict["best_uniform_margin"], report
        for row in table.rows:  # every task was scored on all of its items
            assert all(s.n == cfg.test_items for s in row.result.tasks.values())
    # The MoE mother's specialisation leaves experts dead on the other skills in the layers she trained,
    # more than the father has there (what revival brings back: experts of hers dead where his live).
    # (Over the whole model the father's own fine-tune kills experts in his upper layers too: format 3's
    # father has 0.219 of his experts dead on the other skills, the mother 0.208.)
    moe = meta["pairs"]["moe"]
    her_layers = moe["ground_truth"]["mother_layers"]
    others = [s for s in cfg.skills if s != cfg.mother_skill]

    def dead_in_her_layers(role: str) -> int:
        per_skill = moe["experts"]["per_member"][role]
        return sum(len(per_skill[s]["dead"][layer]) for s in others for layer in her_layers)

    assert dead_in_her_layers("mother") > dead_in_her_layers("father"), moe["experts"]["per_member"]
