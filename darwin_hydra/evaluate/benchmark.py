"""Score an in-memory model on lm-eval tasks, in process, offline, many times over.

Search trials change a model's weights in place and score it again: the ``TaskManager`` and the
loaded task objects (datasets, prompts) are cached per ``(include_path, tasks)``, and the lm-eval
wrapper per model, so a repeated call costs the forward passes plus lm-eval's request building
(see ``scripts/build_zoo.py --overhead`` for the measured figure).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from darwin_hydra.evaluate.stats import mean_ci

log = logging.getLogger(__name__)

METRIC = "acc"


@dataclass
class TaskScore:
    """One task's score: accuracy in [0, 1] over ``n`` items, its 95% CI (Wilson), and the per-item
    0/1 correctness in document order (for paired bootstraps)."""

    task: str
    accuracy: float
    n: int
    ci_low: float
    ci_high: float
    correct: np.ndarray = field(repr=False)

    def as_dict(self, items: bool = False) -> dict:
        d = {"accuracy": self.accuracy, "n": self.n, "ci95": [self.ci_low, self.ci_high]}
        if items:
            d["correct"] = self.correct.astype(int).tolist()
        return d


@dataclass
class BenchmarkResult:
    """Scores per leaf task (groups are expanded into their tasks) and ``mean``: the unweighted mean of
    the task accuracies, i.e. the skill average a group like ``zoo_skills_test`` reports."""

    tasks: dict[str, TaskScore]
    mean: float
    seconds: float = 0.0

    @property
    def accuracies(self) -> dict[str, float]:
        return {name: s.accuracy for name, s in self.tasks.items()}

    @property
    def correct(self) -> dict[str, np.ndarray]:
        """task -> per-item 0/1 array: the input ``paired_bootstrap`` takes for skill averages."""
        return {name: s.correct for name, s in self.tasks.items()}

    def as_dict(self, items: bool = False) -> dict:
        return {
            "mean": self.mean,
            "seconds": self.seconds,
            "tasks": {name: s.as_dict(items) for name, s in self.tasks.items()},
        }


@functools.lru_cache(maxsize=8)
def _load_tasks(include_path: str, tasks: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-eval tasks {unknown} not found under {include_path}; known there: {manager.all_tasks[:20]}"
        )
    with _quiet():
        return manager.load(list(tasks))


_LM_CACHE: dict = {}


def _lm_for(model, tokenizer, batch_size: int, device: str):
    # One lm-eval wrapper per (model, tokenizer, batch size, device): it only holds references, so the
    # model's in-place weight changes are seen by the next call. Keeps the latest wrapper alone.
    key = (id(model), id(tokenizer), batch_size, device)
    hit = _LM_CACHE.get("lm")
    if hit is not None and hit[0] == key and hit[1] is model:
        return hit[2]
    from lm_eval.models.huggingface import HFLM

    class _QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    with _quiet():
        lm = _QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    _LM_CACHE["lm"] = (key, model, lm)
    return lm


def clear_cache() -> None:
    """Forget the cached tasks and lm-eval wrapper (frees the model they reference)."""
    _load_tasks.cache_clear()
    _LM_CACHE.clear()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # lm-eval logs per task and draws a progress bar per request build; a search calls this hundreds
    # of times, so both go quiet for the duration of the call.
    import datasets
    import lm_eval.api.task as task_mod
    from tqdm import tqdm

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    old_tqdm = task_mod.tqdm
    bars = datasets.is_progress_bar_enabled()
    try:
        datasets.disable_progress_bars()
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        task_mod.tqdm = functools.partial(tqdm, disable=True)
        yield
    finally:
        task_mod.tqdm = old_tqdm
        if bars:
            datasets.enable_progress_bars()
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def check_tasks(tasks: list[str], include_path: str | Path, what: str = "benchmark tasks") -> list[str]:
    """Problems with lm-eval ``tasks`` under ``include_path`` (unknown names, a task that reports no
    per-item ``acc``), found by loading the task definitions and their data (no model): the preflight's
    check, so that a bad task fails before the scan rather than after phase 1."""
    include = Path(include_path).expanduser().resolve()
    if not include.is_dir():
        return [f"{what}: lm-eval include_path {include} is not a directory"]
    try:
        task_dict = _load_tasks(str(include), tuple(tasks))
    except Exception as e:  # lm-eval raises many kinds while loading YAMLs and data
        return [f"{what} {list(tasks)}: {type(e).__name__}: {e}"]
    problems = []
    for name, task in task_dict["tasks"].items():
        metrics = [m.get("metric") for m in (getattr(task.config, "metric_list", None) or [])]
        if METRIC not in metrics:
            problems.append(f"{what}: lm-eval task {name!r} (output_type {task.OUTPUT_TYPE}) reports {metrics}, "
                            f"not a per-item {METRIC!r}; use an output_type loglikelihood/multiple_choice task")
    return problems


def evaluate_model(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | Path,
    batch_size: int = 64,
    limit: int | None = None,
    device: str = "cpu",
) -> BenchmarkResult:
    """Score ``model`` (already loaded, possibly changed in place since the last call) on lm-eval ``tasks``.

    ``tasks`` may name groups (e.g. ``zoo_skills_dev``); they are expanded into their tasks. Every task
    must report ``acc`` per item (the zoo's tasks do). ``limit`` keeps the first ``limit`` items of each
    task. No network: tasks come from ``include_path`` only (lm-eval's built-in tasks are not indexed).
    """
    from lm_eval.evaluator import evaluate

    if not tasks:
        raise ValueError("evaluate_model: no tasks given")
    include = str(Path(include_path).expanduser().resolve())
    if not Path(include).is_dir():
        raise FileNotFoundError(f"lm-eval include_path {include} is not a directory")
    start = time.perf_counter()
    task_dict = _load_tasks(include, tuple(tasks))
    lm = _lm_for(model, tokenizer, batch_size, device)
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            out = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=True)
    finally:
        model.train(was_training)
    scores: dict[str, TaskScore] = {}
    for name in task_dict["tasks"]:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        if not samples or METRIC not in samples[0]:
            raise ValueError(f"lm-eval task {name!r} reports no per-item {METRIC!r}; use output_type loglikelihood")
        correct = np.array([int(s[METRIC]) for s in samples], dtype=np.int8)
        acc, lo, hi = mean_ci(correct)
        scores[name] = TaskScore(name, acc, int(correct.size), lo, hi, correct)
    mean = float(np.mean([s.accuracy for s in scores.values()]))
    return BenchmarkResult(scores, mean, round(time.perf_counter() - start, 3))
