"""Score an in-memory model on lm-eval tasks, in process, offline, many times over.

Search trials change a model's weights in place and score it again: the ``TaskManager`` and the
loaded task objects (datasets, prompts) are cached per ``(include_path, lm_eval_defaults, tasks)``, and
the lm-eval wrapper per model, so a repeated call costs the forward passes (or generations) plus
lm-eval's request building (see ``scripts/build_zoo.py --overhead`` for the measured figure).

Every task is scored by a per-item 0/1 metric (``ITEM_METRICS``), so that scores have Wilson intervals
and two models can be compared item by item (paired bootstrap):

- ``exact_match``: ``generate_until`` tasks; the greedy generation, cut at the task's stop sequences,
  equals the target (the model must also stop after the answer, which ``acc`` does not check);
- ``acc_norm``: ``multiple_choice`` tasks that list it (the choice with the highest length-normalised
  log-likelihood is the right one);
- ``acc``: ``loglikelihood`` (``is_greedy``) and ``multiple_choice`` tasks.

Tasks come from ``include_path`` (the project's YAMLs, e.g. the zoo's) and, with ``lm_eval_defaults``,
from lm-eval's built-in definitions plus darwin-hydra's split variants of them (``tasks/*.yaml`` beside
this file: thin YAMLs that ``include:`` an lm-eval task file and change its split).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from darwin_hydra.evaluate.stats import mean_ci

log = logging.getLogger(__name__)

# Per-item 0/1 metrics, in the order a task's own metric list is searched when benchmark.metric is null:
# a generation task's exact match first, then the length-normalised choice, then plain accuracy.
ITEM_METRICS = ("exact_match", "acc_norm", "acc")

# darwin-hydra's variants of lm-eval's built-in tasks (indexed with lm_eval_defaults)
VARIANTS_DIR = Path(__file__).with_name("tasks")

# lm-eval's simple_evaluate seeds these before it builds requests; we call its evaluate() directly
_PYTHON_SEED = 0  # process_docs that shuffle answer choices (GPQA) draw from `random`
_FEWSHOT_SEED = 1234


@dataclass
class TaskScore:
    """One task's score: the share of items right (``accuracy``, in [0, 1]) by ``metric`` over ``n`` items,
    its 95% CI (Wilson), and the per-item 0/1 values in document order (for paired bootstraps).
    ``metric`` is lm-eval's key: ``acc``, ``acc_norm``, ``exact_match``, with ``,<filter>`` when the
    task's output passes through a named filter (``exact_match,strict-match``)."""

    task: str
    accuracy: float
    n: int
    ci_low: float
    ci_high: float
    correct: np.ndarray = field(repr=False)
    metric: str = "acc"

    def as_dict(self, items: bool = False) -> dict:
        d = {"accuracy": self.accuracy, "n": self.n, "ci95": [self.ci_low, self.ci_high], "metric": self.metric}
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
    def metrics(self) -> dict[str, str]:
        return {name: s.metric for name, s in self.tasks.items()}

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


# ------------------------------------------------------------------------------------- which metric


def task_metric(task, metric: str | None = None) -> tuple[str, str] | None:
    """``(metric, filter)`` that scores ``task`` (an lm-eval Task) item by item, or None when it has none.

    ``metric`` (benchmark.metric) names one, optionally with a filter (``exact_match,flexible-extract``);
    None picks the first of ``ITEM_METRICS`` the task reports. The filter defaults to the task's first
    (``none`` when it has no filter list)."""
    listed = list(task.aggregation())  # the task's metrics (its metric_list, or lm-eval's per output type)
    filters = [f["name"] for f in (task.config.filter_list or [])] or ["none"]
    if metric:
        name, _, flt = metric.partition(",")
        if name not in listed or (flt and flt not in filters):
            return None
        return name, flt or filters[0]
    for name in ITEM_METRICS:
        if name in listed:
            return name, filters[0]
    return None


def _metric_key(name: str, flt: str) -> str:
    return name if flt == "none" else f"{name},{flt}"


# ------------------------------------------------------------------------------------ loading tasks


@functools.cache
def _variants_dir() -> str:
    """darwin-hydra's variant YAMLs, written out with absolute ``include:`` paths into lm-eval's task tree
    (lm-eval resolves a relative include against the including file's directory)."""
    import atexit
    import shutil
    import tempfile

    import lm_eval.tasks
    import yaml

    lm_tasks = Path(lm_eval.tasks.__file__).parent
    out = Path(tempfile.mkdtemp(prefix="darwin_hydra_lm_eval_tasks_"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    for src in sorted(VARIANTS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(src.read_text(encoding="utf-8"))
        base = lm_tasks / cfg["include"]
        if not base.is_file():
            import lm_eval

            raise FileNotFoundError(f"{src}: includes {cfg['include']}, which lm-eval {lm_eval.__version__} "
                                    f"does not have under {lm_tasks}")
        cfg["include"] = str(base)
        (out / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return str(out)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, lm_eval_defaults: bool):
    from lm_eval.tasks import TaskManager

    paths = ([_variants_dir()] if lm_eval_defaults else []) + ([include_path] if include_path else [])
    with _quiet():
        return TaskManager(include_path=paths or None, include_defaults=lm_eval_defaults)


def _where(include_path: str | None, lm_eval_defaults: bool) -> str:
    parts = ([f"under {include_path}"] if include_path else []) + (["in lm-eval's own tasks"] if lm_eval_defaults else [])
    return " or ".join(parts)


@functools.lru_cache(maxsize=8)
def _load_tasks(include_path: str | None, lm_eval_defaults: bool, tasks: tuple[str, ...]):
    manager = _task_manager(include_path, lm_eval_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        more = "" if lm_eval_defaults else " (lm-eval's built-in tasks need benchmark.lm_eval_defaults=true)"
        raise ValueError(f"lm-eval tasks {unknown} not found {_where(include_path, lm_eval_defaults)}{more}; "
                         f"close names: {hints}")
    with _quiet(), _seeded():
        task_dict = manager.load(list(tasks))
    for task in task_dict["tasks"].values():
        task.set_fewshot_seed(seed=_FEWSHOT_SEED)
    return task_dict


def _include(include_path: str | Path | None) -> str | None:
    if include_path is None:
        return None
    include = Path(include_path).expanduser().resolve()
    if not include.is_dir():
        raise FileNotFoundError(f"lm-eval include_path {include} is not a directory")
    return str(include)


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
        # lm-eval's own switch for the per-request progress bars
        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    with _quiet():
        lm = _QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    _LM_CACHE["lm"] = (key, model, lm)
    return lm


def clear_cache() -> None:
    """Forget the cached tasks, task index and lm-eval wrapper (frees the model they reference)."""
    _load_tasks.cache_clear()
    _task_manager.cache_clear()
    _LM_CACHE.clear()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # lm-eval logs per task and draws a progress bar per request build (with no switch to turn it off);
    # a search calls this hundreds of times, so logging goes quiet and stderr, where tqdm draws, is kept
    # for the duration of the call: what is not a progress bar is logged at DEBUG.
    import datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    captured = io.StringIO()
    try:
        datasets.disable_progress_bars()
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        text = "\n".join(line for line in captured.getvalue().splitlines() if line.strip() and "\r" not in line
                         and "it/s]" not in line and "s/it]" not in line)
        if text:
            log.debug("lm-eval stderr:\n%s", text)


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    # GPQA's process_docs shuffles the answer choices with `random`: the same order for every model and
    # every run, without changing the caller's random state
    state = random.getstate()
    random.seed(_PYTHON_SEED)
    try:
        yield
    finally:
        random.setstate(state)


def _load_hint(e: Exception) -> str:
    text = str(e)
    if "gated" in text.lower():
        return (" (a gated dataset: accept its terms on its Hub page and log in with `hf auth login`, or set "
                "HF_TOKEN; then allow downloads once: HF_DATASETS_OFFLINE=0)")
    if "offline" in text.lower() or "couldn't reach" in text.lower() or "connection" in text.lower():
        return " (not in the Hugging Face datasets cache: download it once with HF_DATASETS_OFFLINE=0 and network)"
    return ""


# ------------------------------------------------------------------------------------ public calls


def check_tasks(
    tasks: list[str],
    include_path: str | Path | None,
    what: str = "benchmark tasks",
    metric: str | None = None,
    lm_eval_defaults: bool = False,
) -> list[str]:
    """Problems with lm-eval ``tasks`` (unknown names, a task scored by none of ``ITEM_METRICS``, or not
    by ``metric`` when one is named), found by loading the task definitions and their data (no model):
    the preflight's check, so that a bad task fails before the scan rather than after phase 1."""
    if include_path is None and not lm_eval_defaults:
        return [f"{what}: no task source (benchmark.include_path=null and benchmark.lm_eval_defaults=false)"]
    try:
        include = _include(include_path)
    except FileNotFoundError as e:
        return [f"{what}: {e}"]
    try:
        task_dict = _load_tasks(include, lm_eval_defaults, tuple(tasks))
    except Exception as e:  # lm-eval and datasets raise many kinds while loading YAMLs and data
        if len(tasks) == 1:
            return [f"{what} {list(tasks)}: {type(e).__name__}: {e}{_load_hint(e)}"]
        # name every task that fails, not only the first one lm-eval met
        return [p for t in tasks for p in check_tasks([t], include_path, what, metric, lm_eval_defaults)]
    problems = []
    for name, task in task_dict["tasks"].items():
        if task_metric(task, metric) is None:
            filters = [f["name"] for f in (task.config.filter_list or [])] or ["none"]
            wanted = f"benchmark.metric={metric!r}" if metric else f"a per-item {' / '.join(ITEM_METRICS)}"
            problems.append(
                f"{what}: lm-eval task {name!r} (output_type {task.OUTPUT_TYPE}) reports {list(task.aggregation())} "
                f"(filters {filters}), not {wanted}; use a generate_until task scored by exact_match or a "
                f"loglikelihood / multiple_choice task scored by acc or acc_norm"
            )
    return problems


def evaluate_model(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | None = None,
    metric: str | None = None,
    lm_eval_defaults: bool = False,
) -> BenchmarkResult:
    """Score ``model`` (already loaded, possibly changed in place since the last call) on lm-eval ``tasks``.

    ``tasks`` may name groups (e.g. ``zoo_skills_dev``); they are expanded into their tasks. Each task is
    scored per item by ``metric`` or, when None, by the first of ``ITEM_METRICS`` it reports
    (``task_metric``). ``limit`` keeps the first ``limit`` items of each task; ``device`` defaults to the
    model's. Tasks come from
    ``include_path`` and, with ``lm_eval_defaults``, from lm-eval's built-in definitions (their data
    from the Hub's datasets cache; nothing is downloaded while ``HF_DATASETS_OFFLINE`` is set).
    """
    from lm_eval.evaluator import evaluate

    if not tasks:
        raise ValueError("evaluate_model: no tasks given")
    if include_path is None and not lm_eval_defaults:
        raise ValueError("evaluate_model: give include_path or lm_eval_defaults=True")
    start = time.perf_counter()
    task_dict = _load_tasks(_include(include_path), lm_eval_defaults, tuple(tasks))
    chosen = {}
    for name, task in task_dict["tasks"].items():
        chosen[name] = task_metric(task, metric)
        if chosen[name] is None:
            raise ValueError(f"lm-eval task {name!r} (output_type {task.OUTPUT_TYPE}) reports {list(task.aggregation())}: "
                             f"no per-item {metric or ' / '.join(ITEM_METRICS)} to score it by")
    lm = _lm_for(model, tokenizer, batch_size, device or str(next(model.parameters()).device))
    was_training = model.training
    model.eval()
    try:
        with _quiet(), _seeded():
            out = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=True)
    finally:
        model.train(was_training)
    scores: dict[str, TaskScore] = {}
    for name, (key, flt) in chosen.items():
        samples = sorted((s for s in out["samples"][name] if s.get("filter", "none") == flt), key=lambda s: s["doc_id"])
        if not samples or key not in samples[0]:
            raise ValueError(f"lm-eval task {name!r} logged no per-item {_metric_key(key, flt)!r}")
        values = np.array([float(s[key]) for s in samples])
        if not np.all((values == 0) | (values == 1)):
            raise ValueError(f"lm-eval task {name!r}: {_metric_key(key, flt)} is not 0/1 per item")
        correct = values.astype(np.int8)
        acc, lo, hi = mean_ci(correct)
        scores[name] = TaskScore(name, acc, int(correct.size), lo, hi, correct, _metric_key(key, flt))
    mean = float(np.mean([s.accuracy for s in scores.values()]))
    return BenchmarkResult(scores, mean, round(time.perf_counter() - start, 3))
