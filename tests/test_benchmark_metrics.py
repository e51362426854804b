"""Per-item metrics beyond acc (exact_match for generation, acc_norm for multiple choice), the zoo's
generation tasks, lm-eval's own ARC-Challenge and GPQA definitions on local data of their schema, and
the bootstrap's memory on a large task."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from darwin_hydra.evaluate.benchmark import check_tasks, clear_cache, evaluate_model, task_metric


@pytest.fixture(autouse=True)
def _fresh_task_cache():
    # tasks are cached by name: tests that point the same names at other data start clean
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from darwin_hydra.zoo import ensure_zoo
    from darwin_hydra.zoo.config import load_zoo_config

    return ensure_zoo(load_zoo_config("tiny"), tmp_path_factory.getbasetemp() / "zoo-cache")


# -------------------------------------------------------------------------------- which metric


def _task(metrics, output_type="multiple_choice", filters=None):
    return SimpleNamespace(aggregation=lambda: {m: None for m in metrics}, OUTPUT_TYPE=output_type,
                           config=SimpleNamespace(filter_list=[{"name": f} for f in filters] if filters else None))


def test_each_task_is_scored_by_its_own_item_metric_unless_the_config_names_one():
    assert task_metric(_task(["acc", "acc_norm"])) == ("acc_norm", "none")
    assert task_metric(_task(["perplexity", "acc"], "loglikelihood")) == ("acc", "none")
    gen = _task(["exact_match"], "generate_until", ["strict-match", "flexible-extract"])
    assert task_metric(gen) == ("exact_match", "strict-match")
    assert task_metric(gen, "exact_match,flexible-extract") == ("exact_match", "flexible-extract")
    assert task_metric(_task(["acc", "acc_norm"]), "acc") == ("acc", "none")
    assert task_metric(_task(["acc"], "loglikelihood"), "exact_match") is None
    assert task_metric(gen, "exact_match,lenient") is None
    assert task_metric(_task(["perplexity", "word_perplexity"], "loglikelihood_rolling")) is None


def test_check_tasks_accepts_item_metrics_and_names_a_task_without_one(tiny_zoo, tmp_path):
    tasks = tiny_zoo / "tasks"
    assert check_tasks(["zoo_skills_dev"], tasks) == []
    assert check_tasks(["zoo_skills_gen_dev"], tasks) == []
    named = check_tasks(["zoo_add_dev"], tasks, "benchmark.fitness_tasks", metric="exact_match")
    assert len(named) == 1 and "'zoo_add_dev'" in named[0] and "exact_match" in named[0]

    # a task reporting perplexity alone: refused by name
    (tmp_path / "ppl.yaml").write_text("\n".join([
        "task: add_perplexity", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {json.dumps(str(tasks / 'add_test.jsonl'))}", "test_split: test", "output_type: loglikelihood",
        "doc_to_text: prompt", "doc_to_target: answer", "metric_list:", "  - metric: perplexity", ""]))
    problems = check_tasks(["add_perplexity"], tmp_path, "benchmark.report_tasks")
    assert len(problems) == 1
    assert "benchmark.report_tasks" in problems[0] and "'add_perplexity'" in problems[0] and "perplexity" in problems[0]


# ------------------------------------------------------------------ generation, scored by exact match


def _char_model(seed: int = 0):
    """A random tiny Llama over the zoo's characters whose greedy decoding stops now and then: the row of
    </s> in the head is the row of 'x', and argmax breaks the tie towards the lower id, </s>, so the model
    stops wherever it would say 'x'."""
    from darwin_hydra.testing.tiny import tiny_model
    from darwin_hydra.zoo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[tok.convert_tokens_to_ids("x")]
    return model, tok


@torch.no_grad()
def _greedy(model, tok, prompt: str, budget: int) -> tuple[str, bool]:
    """Hand-written greedy decoding: up to ``budget`` tokens, stopping at </s>; the text as lm-eval cuts it
    (special tokens dropped) and whether the model stopped."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = []
    for _ in range(budget):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            return tok.decode(out, skip_special_tokens=True), True
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True), False


@pytest.fixture(scope="module")
def gen_task(tmp_path_factory):
    """The zoo's task writers over items made from the model's own greedy answers: a third answered and
    stopped on (right), a third whose target is a strict prefix of what the model says (the greedy tokens
    match but the model does not stop there: acc says right, exact match wrong), a third wrong."""
    from darwin_hydra.zoo.tasks import write_task_data, write_task_yamls

    model, tok = _char_model()
    rng = random.Random(0)
    items = []
    for _ in range(5000):
        if len(items) == 36:
            break
        prompt = f"{rng.randrange(100):02d}+{rng.randrange(100):02d}="
        said, stopped = _greedy(model, tok, prompt, 6)
        if len(said) < 2 or any(p == prompt for p, _ in items):
            continue
        kind = len(items) % 3
        if kind == 0 and not stopped:
            continue
        target = said if kind == 0 else said[:-1] if kind == 1 else "zz"
        items.append((prompt, target))
    assert len(items) == 36, "the tiny model stops too rarely (or always) for this test's items"
    out = tmp_path_factory.mktemp("gen-tasks")
    write_task_data(out, {"add": {"dev": items, "test": items}})
    write_task_yamls(out, ["add"])
    return out, items


def _budget(tasks_dir: Path) -> int:
    text = (tasks_dir / "zoo_add_gen_test.yaml").read_text()
    return int(text.split("max_gen_toks:")[1].split()[0])


def test_exact_match_of_a_tiny_model_equals_a_hand_count(gen_task):
    tasks_dir, items = gen_task
    model, tok = _char_model()
    res = evaluate_model(model, tok, ["zoo_add_gen_test"], tasks_dir)
    score = res.tasks["zoo_add_gen_test"]
    assert score.metric == "exact_match" and score.n == len(items)
    budget = _budget(tasks_dir)
    hand = np.array([int(_greedy(model, tok, p, budget)[0] == a) for p, a in items])
    np.testing.assert_array_equal(score.correct, hand)
    assert 0 < hand.sum() < len(items) and score.accuracy == pytest.approx(hand.mean())

    # the same items by loglikelihood acc: right wherever the greedy tokens match, stopped or not
    acc = evaluate_model(model, tok, ["zoo_add_test"], tasks_dir).tasks["zoo_add_test"]
    assert acc.metric == "acc"
    prefix_items = np.arange(len(items)) % 3 == 1
    assert acc.correct[prefix_items].all() and not score.correct[prefix_items].any()
    assert acc.correct.sum() > score.correct.sum()


def test_generation_sees_weights_changed_in_place_between_calls(gen_task):
    tasks_dir, _ = gen_task
    model, tok = _char_model()
    first = evaluate_model(model, tok, ["zoo_skills_gen_test"], tasks_dir)
    assert first.mean > 0
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits equal: argmax is <pad>, never an answer, never </s>
    assert evaluate_model(model, tok, ["zoo_skills_gen_test"], tasks_dir).mean == 0.0
    with torch.no_grad():
        model.lm_head.weight.copy_(saved)
    again = evaluate_model(model, tok, ["zoo_skills_gen_test"], tasks_dir)
    np.testing.assert_array_equal(again.tasks["zoo_add_gen_test"].correct, first.tasks["zoo_add_gen_test"].correct)


def test_an_automatic_batch_size_scores_every_item_as_a_fixed_one_does(gen_task):
    """benchmark.batch_size=auto: lm-eval finds the largest batch that fits; the items' scores are those of
    a fixed batch size."""
    from darwin_hydra.config import compose

    assert compose(["benchmark.batch_size=auto"]).benchmark.batch_size == "auto"
    assert compose(["benchmark.batch_size=auto:4"]).benchmark.batch_size == "auto:4"
    tasks_dir, _ = gen_task
    model, tok = _char_model()
    fixed = evaluate_model(model, tok, ["zoo_skills_gen_test", "zoo_add_test"], tasks_dir, batch_size=8)
    auto = evaluate_model(model, tok, ["zoo_skills_gen_test", "zoo_add_test"], tasks_dir, batch_size="auto")
    assert fixed.tasks.keys() == auto.tasks.keys()
    for name in fixed.tasks:
        np.testing.assert_array_equal(auto.tasks[name].correct, fixed.tasks[name].correct)


def test_generation_tasks_reach_a_zoo_built_before_them(tiny_zoo):
    # A zoo built by an older version has no generation tasks: opening it writes them, changes none of
    # the files it had, and keeps its hash (no rebuild).
    from darwin_hydra.zoo import ensure_zoo
    from darwin_hydra.zoo.config import load_zoo_config

    tasks = tiny_zoo / "tasks"
    old = {p.name: p.read_bytes() for p in tasks.glob("*.yaml") if "_gen_" not in p.name}
    for p in tasks.glob("*_gen_*.yaml"):
        p.unlink()
    stamps = {name: (tasks / name).stat().st_mtime_ns for name in old}
    again = ensure_zoo(load_zoo_config("tiny"), tiny_zoo.parent)
    assert again == tiny_zoo
    assert {p.name for p in tasks.glob("zoo_*_gen_*.yaml")} == {
        f"zoo_{s}_gen_{split}.yaml" for s in ("add", "rev", "sort", "map", "skills") for split in ("dev", "test")}
    assert {name: (tasks / name).read_bytes() for name in old} == old
    assert {name: (tasks / name).stat().st_mtime_ns for name in old} == stamps


# ------------------------------------------------------- lm-eval's own ARC-Challenge and GPQA, offline


def _arc_item(i: int) -> dict:
    colours = ["red", "blue", "green", "yellow", "violet"]
    k = 3 + i % 2  # ARC has 3 to 5 choices, labelled A-E or 1-5
    labels = list("ABCDE")[:k] if i % 3 else [str(j + 1) for j in range(k)]
    return {"id": f"Mercury_{1000 + i}", "question": f"Which colour is number {i}?",
            "choices": {"text": colours[:k], "label": labels}, "answerKey": labels[i % k]}


def _gpqa_item(i: int) -> dict:
    return {"Pre-Revision Question": "-", "Question": f"Which value does quantity {i} take?",
            "Correct Answer": f"{i} units", "Incorrect Answer 1": f"{i + 1} units",
            "Incorrect Answer 2": f"{i + 2} units", "Incorrect Answer 3": f"{i + 3} units",
            "Explanation": "-", "Subdomain": "Physics (general)", "High-level domain": "Physics",
            "Record ID": f"rec{i:04d}"}


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """allenai/ai2_arc (ARC-Challenge: train/validation/test parquet) and Idavidrein/gpqa (gpqa_diamond.csv)
    as local dataset repositories with the Hub's configs and column schemas; `datasets` loads a local
    directory of the repo's name before it asks the Hub, so lm-eval's task files read these."""
    import pandas as pd

    arc = tmp_path / "allenai" / "ai2_arc"
    (arc / "ARC-Challenge").mkdir(parents=True)
    sizes = {"train": 3, "validation": 6, "test": 8}
    start = 0
    for split, n in sizes.items():
        rows = pd.DataFrame([_arc_item(start + i) for i in range(n)])
        rows.to_parquet(arc / "ARC-Challenge" / f"{split}-00000-of-00001.parquet")
        start += n
    (arc / "README.md").write_text("---\nconfigs:\n- config_name: ARC-Challenge\n  data_files:\n"
                                   + "".join(f"  - split: {s}\n    path: ARC-Challenge/{s}-*\n" for s in sizes) + "---\n")
    gpqa = tmp_path / "Idavidrein" / "gpqa"
    gpqa.mkdir(parents=True)
    pd.DataFrame([_gpqa_item(i) for i in range(5)]).to_csv(gpqa / "gpqa_diamond.csv", index=False)
    (gpqa / "README.md").write_text("---\nconfigs:\n- config_name: gpqa_diamond\n  data_files: gpqa_diamond.csv\n---\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets keys its cache of a local repository by file names, not contents: a cache of its own
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return {"arc": [_arc_item(i) for i in range(sum(sizes.values()))], "sizes": sizes}


def _byte_model(seed: int = 0):
    """A random tiny Llama over a byte-level tokenizer (no merges): any English prompt, one token per byte."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from darwin_hydra.testing.tiny import tiny_model

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(sorted(ByteLevel.alphabet()))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.add_special_tokens(["<pad>", "<s>", "</s>"])
    core.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  model_max_length=512, clean_up_tokenization_spaces=False)
    return tiny_model("llama", seed=seed, vocab_size=len(vocab)), tok


@torch.no_grad()
def _arc_acc_norm(model, tok, doc: dict) -> int:
    """lm-eval's arc_challenge by hand: context "Question: {q}\\nAnswer:", each choice continued after a
    space, the choice with the highest log-likelihood per character wins (acc_norm)."""
    context = f"Question: {doc['question']}\nAnswer:"
    n_ctx = len(tok(context).input_ids)
    scores = []
    for choice in doc["choices"]["text"]:
        ids = tok(context + " " + choice, return_tensors="pt").input_ids
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        ll = sum(float(logp[t - 1, ids[0, t]]) for t in range(n_ctx, ids.shape[1]))
        scores.append(ll / len(choice))
    return int(np.argmax(scores) == doc["choices"]["label"].index(doc["answerKey"]))


@pytest.mark.slow
def test_arc_gpqa_runs_lm_evals_own_task_definitions_on_local_data(hub_datasets):
    from darwin_hydra.config import compose

    bench = compose(["benchmark=arc_gpqa"]).benchmark
    assert bench.include_path is None and bench.lm_eval_defaults
    opts = dict(metric=bench.metric, lm_eval_defaults=True)
    assert check_tasks(bench.fitness_tasks, None, "benchmark.fitness_tasks", **opts) == []
    assert check_tasks(bench.report_tasks, None, "benchmark.report_tasks", **opts) == []
    model, tok = _byte_model()

    fit = evaluate_model(model, tok, bench.fitness_tasks, None, batch_size=4, **opts)
    sizes, arc = hub_datasets["sizes"], hub_datasets["arc"]
    validation = arc[sizes["train"]: sizes["train"] + sizes["validation"]]
    assert list(fit.tasks) == ["arc_challenge_validation"]
    score = fit.tasks["arc_challenge_validation"]
    assert score.metric == "acc_norm" and score.n == sizes["validation"]
    np.testing.assert_array_equal(score.correct, [_arc_acc_norm(model, tok, d) for d in validation])

    rep = evaluate_model(model, tok, bench.report_tasks, None, batch_size=4, **opts)
    assert set(rep.tasks) == {"arc_challenge", "gpqa_diamond_zeroshot"}  # disjoint from the fitness data
    assert rep.tasks["arc_challenge"].n == sizes["test"] and rep.tasks["gpqa_diamond_zeroshot"].n == 5
    test = arc[sizes["train"] + sizes["validation"]:]
    np.testing.assert_array_equal(rep.tasks["arc_challenge"].correct, [_arc_acc_norm(model, tok, d) for d in test])
    assert {s.metric for s in rep.tasks.values()} == {"acc_norm"}

    # GPQA shuffles each question's choices with `random`: the same order whatever the caller's state
    random.seed(12345)
    again = evaluate_model(model, tok, ["gpqa_diamond_zeroshot"], None, batch_size=4, **opts)
    np.testing.assert_array_equal(again.tasks["gpqa_diamond_zeroshot"].correct, rep.tasks["gpqa_diamond_zeroshot"].correct)

    # GPQA by generation: exact match after the task's first filter, one value per question
    gen = evaluate_model(model, tok, ["gpqa_diamond_cot_zeroshot"], None, batch_size=5, limit=2, lm_eval_defaults=True)
    assert gen.tasks["gpqa_diamond_cot_zeroshot"].metric == "exact_match,strict-match"
    assert gen.tasks["gpqa_diamond_cot_zeroshot"].n == 2


def test_lm_evals_own_tasks_need_lm_eval_defaults(tiny_zoo):
    problems = check_tasks(["arc_challenge"], tiny_zoo / "tasks", "benchmark.report_tasks")
    assert len(problems) == 1 and "arc_challenge" in problems[0] and "lm_eval_defaults" in problems[0]


# ------------------------------------------------------------------------- bootstrap on a large task


def test_bootstrap_of_a_14k_item_task_stays_small_and_matches_the_normal_approximation():
    from darwin_hydra.evaluate.stats import bootstrap_ci, paired_bootstrap

    rng = np.random.default_rng(0)
    n = 14_000
    child = (rng.random(n) < 0.62).astype(np.int8)
    other = np.where(rng.random(n) < 0.9, child, 1 - child).astype(np.int8)
    tracemalloc.start()
    try:
        est, lo, hi = bootstrap_ci({"big": child}, n_boot=2000, seed=0)
        diff, dlo, dhi = paired_bootstrap({"big": child}, {"big": other}, n_boot=2000, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # resampled all at once, 2000 x 14,000 indices and values would be 448 MB
    assert peak < 100 * 2**20
    se = child.std(ddof=1) / np.sqrt(n)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1) and lo < est < hi
    d = child.astype(float) - other
    assert (dhi - dlo) == pytest.approx(2 * 1.96 * d.std(ddof=1) / np.sqrt(n), rel=0.1) and dlo < diff < dhi
    assert paired_bootstrap({"big": child}, {"big": other}, n_boot=2000, seed=0) == (diff, dlo, dhi)
