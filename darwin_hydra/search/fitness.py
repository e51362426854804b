"""Fitness plumbing of the search: the honest-split rule, benchmark fitness on an in-memory child,
and the uniform-ratio baseline searched with the same number of benchmark evaluations."""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


class DishonestEvaluationError(ValueError):
    """Fitness and report would use the same data."""


def check_honest_split(benchmark_cfg: Any) -> None:
    """Refuse a run whose fitness tasks overlap its report tasks (same task name, or the same task
    with only the split suffix removed, e.g. ``x`` vs ``x``), unless
    ``benchmark.allow_fitness_on_report=true``.

    Selecting on the benchmark you report inflates the reported score (Darwin's published numbers
    were selected and reported on one benchmark); darwin-hydra searches on ``dev`` and reports ``test``.
    """
    fit = {str(t) for t in benchmark_cfg.fitness_tasks}
    rep = {str(t) for t in benchmark_cfg.report_tasks}
    overlap = sorted(fit & rep)
    if overlap and not benchmark_cfg.allow_fitness_on_report:
        raise DishonestEvaluationError(
            f"benchmark.fitness_tasks and benchmark.report_tasks share {overlap}: the search would be scored "
            "on the data it is reported on. Use a dev split for fitness (e.g. zoo_skills_dev) and a test split "
            "for the report (zoo_skills_test), or set benchmark.allow_fitness_on_report=true to do it anyway "
            "(the report will say so)."
        )
    if overlap:
        log.warning("fitness and report share %s (benchmark.allow_fitness_on_report=true): report is optimistic", overlap)


def benchmark_fitness(model, tokenizer, benchmark_cfg: Any, include_path: str, tasks: list[str] | None = None) -> Callable[[], Any]:
    """A zero-argument callable that scores the model *as it is now* on the fitness tasks and returns
    the ``BenchmarkResult`` (``.mean`` is the fitness)."""
    from darwin_hydra.evaluate.benchmark import evaluate_model

    task_list = list(tasks if tasks is not None else benchmark_cfg.fitness_tasks)

    def score():
        return evaluate_model(
            model,
            tokenizer,
            task_list,
            include_path=include_path,
            batch_size=benchmark_cfg.batch_size,
            limit=benchmark_cfg.limit,
            metric=benchmark_cfg.metric,
            lm_eval_defaults=benchmark_cfg.lm_eval_defaults,
        )

    return score


def uniform_grid(n: int) -> list[float]:
    """n evenly spaced ratios over [0, 1] (n >= 2 includes both parents; n = 1 is the midpoint)."""
    if n <= 1:
        return [0.5]
    return [i / (n - 1) for i in range(n)]


# a tie on dev goes to the candidate with fewer choices behind it: one ratio, then the MRI's fixed rule,
# then the searched genome (the max of more dev scores, so the more optimistic one)
SIMPLER_FIRST = ("uniform", "mri", "genome")


def choose_child(rows: list[dict]) -> dict:
    """The candidate with the highest ``dev`` score; a tie goes to the simpler kind (``SIMPLER_FIRST``)."""
    if not rows:
        raise ValueError("optimizer.child_candidates is empty: name at least one of genome, mri, uniform")
    # dev scores a float rounding apart (the same items right, summed in another order) are a tie
    return max(rows, key=lambda row: (round(row["dev"], 9), -SIMPLER_FIRST.index(row["kind"])))
