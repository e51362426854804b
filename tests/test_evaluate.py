"""Benchmark scoring: confidence intervals, paired bootstraps, and lm-eval on an in-memory model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from darwin_hydra.evaluate.stats import bootstrap_ci, mean_ci, paired_bootstrap, skill_average

# ------------------------------------------------------------------------------------------ stats


def test_wilson_interval_matches_the_formula():
    values = [1] * 80 + [0] * 20
    mean, lo, hi = mean_ci(values)
    z = 1.959963984540054
    n, p = 100, 0.8
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert mean == pytest.approx(0.8)
    assert (lo, hi) == pytest.approx((center - half, center + half))
    assert (lo, hi) == pytest.approx((0.7112, 0.8666), abs=1e-4)


def test_wilson_stays_inside_0_1_and_400_items_give_plus_minus_5_points():
    assert mean_ci([1] * 30)[2] == pytest.approx(1.0)
    assert mean_ci([0] * 30)[1] == pytest.approx(0.0)
    # The zoo's 400 items per skill and split: the widest interval (p = 0.5) is within +-5 points.
    _, lo, hi = mean_ci([1] * 200 + [0] * 200)
    assert (hi - lo) / 2 <= 0.05


def test_normal_interval_for_non_binary_values():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=400)
    mean, lo, hi = mean_ci(x)
    assert lo < 3.0 < hi
    assert hi - mean == pytest.approx(1.959964 * x.std(ddof=1) / 20, rel=1e-5)
    with pytest.raises(ValueError, match="0/1"):
        mean_ci(x, method="wilson")


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    x = np.r_[np.ones(70), np.zeros(30)]
    est, lo, hi = bootstrap_ci(x, n_boot=2000, seed=1)
    assert est == pytest.approx(0.7) and lo < 0.7 < hi
    assert (lo, hi) == bootstrap_ci(x, n_boot=2000, seed=1)[1:]
    # Close to the Wilson interval at this n.
    _, wlo, whi = mean_ci(x)
    assert abs(lo - wlo) < 0.03 and abs(hi - whi) < 0.03


def test_skill_average_is_unweighted_over_tasks():
    scores = {"a": np.ones(10), "b": np.zeros(1000)}
    assert skill_average(scores) == pytest.approx(0.5)
    est, lo, hi = bootstrap_ci(scores, n_boot=500)
    assert est == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_paired_bootstrap_sees_a_consistent_small_gain():
    rng = np.random.default_rng(0)
    b = (rng.random(400) < 0.5).astype(int)
    a = b.copy()
    flip = np.flatnonzero(a == 0)[:24]  # a fixes 24 of b's mistakes and breaks none: +6 points
    a[flip] = 1
    diff, lo, hi = paired_bootstrap(a, b, n_boot=4000)
    assert diff == pytest.approx(0.06)
    assert lo > 0 and lo < diff < hi
    assert paired_bootstrap(b, b) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_over_tasks_and_its_errors():
    a = {"x": np.ones(50), "y": np.r_[np.ones(25), np.zeros(25)]}
    b = {"y": np.zeros(50), "x": np.ones(50)}  # order of keys does not matter
    diff, lo, hi = paired_bootstrap(a, b, n_boot=2000)
    assert diff == pytest.approx(0.25) and lo > 0
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="tasks differ"):
        paired_bootstrap({"x": np.ones(3)}, {"z": np.ones(3)})


# ------------------------------------------------------------------------------- lm-eval, in memory


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from darwin_hydra.zoo import ensure_zoo
    from darwin_hydra.zoo.config import load_zoo_config

    return ensure_zoo(load_zoo_config("tiny"), tmp_path_factory.getbasetemp() / "zoo-cache")


def _load(root: Path, member: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(root / member, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(root / member),
    )


def test_evaluate_model_matches_greedy_exact_match_per_item(tiny_zoo):
    from darwin_hydra.evaluate.benchmark import evaluate_model
    from darwin_hydra.zoo.score import greedy_correct
    from darwin_hydra.zoo.tokenizer import char_tokenizer
    from darwin_hydra.zoo.train import Encoder

    model, tok = _load(tiny_zoo, "dense/father")
    res = evaluate_model(model, tok, ["zoo_skills_test"], tiny_zoo / "tasks")
    assert set(res.tasks) == {f"zoo_{s}_test" for s in ("add", "rev", "sort", "map")}
    enc = Encoder(char_tokenizer())
    for skill in ("add", "rev", "sort", "map"):
        rows = [json.loads(x) for x in (tiny_zoo / "tasks" / f"{skill}_test.jsonl").read_text().splitlines()]
        ours = greedy_correct(model, enc, [(r["prompt"], r["answer"]) for r in rows])
        score = res.tasks[f"zoo_{skill}_test"]
        assert score.n == len(rows)
        np.testing.assert_array_equal(score.correct, ours)
        assert score.ci_low <= score.accuracy <= score.ci_high
    assert res.mean == pytest.approx(np.mean([s.accuracy for s in res.tasks.values()]))


def test_repeated_calls_see_in_place_weight_changes(tiny_zoo):
    from darwin_hydra.evaluate.benchmark import evaluate_model

    model, tok = _load(tiny_zoo, "dense/father")
    tasks = ["zoo_sort_dev", "zoo_rev_dev"]
    first = evaluate_model(model, tok, tasks, tiny_zoo / "tasks", limit=8)
    assert all(s.n == 8 for s in first.tasks.values())
    # Break the model in place: all logits equal -> argmax is token 0 (<pad>), never a right answer.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    broken = evaluate_model(model, tok, tasks, tiny_zoo / "tasks", limit=8)
    assert broken.mean == 0.0
    again = evaluate_model(model, tok, tasks, tiny_zoo / "tasks", limit=8)
    assert again.accuracies == broken.accuracies


def test_unknown_task_is_a_clear_error(tiny_zoo):
    from darwin_hydra.evaluate.benchmark import evaluate_model

    model, tok = _load(tiny_zoo, "dense/mother")
    with pytest.raises(ValueError, match="zoo_poetry_test"):
        evaluate_model(model, tok, ["zoo_poetry_test"], tiny_zoo / "tasks")
