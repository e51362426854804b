"""The report's benchmark section (base row, uniform row, 0% intervals) and the model card's front matter."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from darwin_hydra.evaluate.benchmark import BenchmarkResult, TaskScore
from darwin_hydra.evaluate.stats import mean_ci
from darwin_hydra.stages.report import benchmark_section, pct


def _result(per_task: dict[str, np.ndarray], metric: str = "acc") -> BenchmarkResult:
    tasks = {}
    for name, correct in per_task.items():
        acc, lo, hi = mean_ci(correct)
        tasks[name] = TaskScore(name, acc, correct.size, lo, hi, correct.astype(np.int8), metric)
    return BenchmarkResult(tasks, float(np.mean([t.accuracy for t in tasks.values()])))


def test_percentages_never_print_minus_zero():
    assert pct(-1e-17) == "0.0" and pct(0.0) == "0.0" and pct(0.1234) == "12.3"
    assert pct(-1e-17, signed=True) == "+0.0" and pct(-0.0004, signed=True) == "+0.0"
    assert pct(-0.012, signed=True) == "-1.2" and pct(0.012, signed=True) == "+1.2"


def test_benchmark_section_has_the_base_row_a_plain_zero_and_the_uniform_rows_provenance():
    rng = np.random.default_rng(0)
    zero = np.zeros(40, dtype=int)
    some = lambda p: (rng.random(40) < p).astype(int)  # noqa: E731
    results = {
        "base": _result({"add": zero, "rev": some(0.2)}),
        "father": _result({"add": some(0.3), "rev": some(0.6)}),
        "mother": _result({"add": some(0.8), "rev": some(0.3)}),
        "child": _result({"add": some(0.7), "rev": some(0.6)}),
        "uniform r=0.25": _result({"add": some(0.5), "rev": some(0.5)}),
    }
    grid = [{"ratio": r, "mean": 0.4} for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    baseline = {"evaluations": 5, "grid": grid, "best_ratio": 0.25, "best_dev": 0.4}
    md, data = benchmark_section(results, n_boot=500, seed=0, baseline=baseline)

    rows: dict[str, str] = {}
    for line in md.splitlines():  # the score table's rows (the differences table comes after it)
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert rows["base"].split("|")[2].strip() == f"0.0 [0.0, {pct(mean_ci(zero)[2])}]"
    assert "-0.0" not in md
    assert "uniform r=0.25 (best of 5 ratios on dev)" in rows
    assert "best of 5 uniform ratios (0.00, 0.25, 0.50, 0.75, 1.00) on the dev split" in md
    assert data["uniform"] == {"model": "uniform r=0.25", "ratios": 5, "chosen_on": "dev", "best_ratio": 0.25}
    assert set(data["differences"]) == {"base", "father", "mother", "uniform r=0.25"}
    assert data["models"]["base"]["tasks"]["add"]["ci"][0] == 0.0
    assert "Per-item score: acc" in md


def test_benchmark_section_names_each_tasks_metric():
    results = {"father": _result({"arc_challenge": np.r_[np.ones(5), np.zeros(5)]}, "acc_norm"),
               "child": _result({"arc_challenge": np.r_[np.ones(6), np.zeros(4)]}, "acc_norm")}
    md, data = benchmark_section(results, n_boot=200, seed=0)
    assert "acc_norm (the most likely choice per character)" in md
    assert data["models"]["child"]["tasks"]["arc_challenge"]["metric"] == "acc_norm"
    assert "uniform" not in data


# ------------------------------------------------------------------------------------ model card


def _ctx(cfg, tmp_path: Path):
    run = tmp_path / "outputs" / "2026-12-07" / "10-00-00"
    return SimpleNamespace(cfg=cfg, run_dir=run, child_dir=run / "child")


def _recipe():
    genome = {"space": "darwin_v6", "mri_seeded": True, "genes": {"global_ratio": 0.5, "mri_trust": 0.7}}
    return SimpleNamespace(genome_hash="0123456789abcdef", genome=genome, kind="genome", ratio_map=SimpleNamespace(summary=lambda: "3 tensors"))


def test_model_card_front_matter_names_hub_parents_as_base_models(tmp_path):
    from huggingface_hub import ModelCard

    from darwin_hydra.config import compose
    from darwin_hydra.report.card import model_card

    father, mother = "Qwen/Qwen3.5-9B", "Jackrong/Qwen3.5-9B-Claude-4.6-Opus-Reasoning-Distilled"
    cfg = compose([f"parents.father={father}", f"parents.mother={mother}", "parents.base=null",
                   "export.hub_repo_id=me/darwin-child"])
    text = model_card(_ctx(cfg, tmp_path), _recipe(), None)
    card = ModelCard(text)
    assert card.data.base_model == [father, mother]
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert card.data.library_name == "transformers"
    assert {"merge", "darwin-hydra", "evolutionary-merge"} <= set(card.data.tags)
    assert f"[{father}](https://huggingface.co/{father})" in text
    assert 'from_pretrained("me/darwin-child")' in text
    assert str(tmp_path) not in text


def test_model_card_of_zoo_or_local_parents_says_so_without_local_paths(tmp_path):
    from huggingface_hub import ModelCard

    from darwin_hydra.config import compose
    from darwin_hydra.report.card import card_body, model_card

    local = tmp_path / "models" / "my-mother"
    local.mkdir(parents=True)
    cfg = compose([f"parents.mother={local}"])  # the zoo's father and base, a local mother
    ctx = _ctx(cfg, tmp_path)
    text = model_card(ctx, _recipe(), None)
    card = ModelCard(text)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "darwin-hydra's miniature zoo, `dense/father`" in text
    assert "a local checkpoint, `my-mother` (not on the Hub)" in text
    assert str(tmp_path) not in text
    # the run's own report names the parents as configured
    assert str(local) in card_body(ctx, _recipe(), None)
