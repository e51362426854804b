"""Benchmark scores with honest uncertainty: lm-eval in process on in-memory models (benchmark), and
confidence intervals / paired bootstraps (stats)."""

from darwin_hydra.evaluate.stats import bootstrap_ci, mean_ci, paired_bootstrap, skill_average


def evaluate_model(*args, **kwargs):
    """See ``darwin_hydra.evaluate.benchmark.evaluate_model`` (imported lazily: it pulls in lm-eval)."""
    from darwin_hydra.evaluate.benchmark import evaluate_model as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["bootstrap_ci", "evaluate_model", "mean_ci", "paired_bootstrap", "skill_average"]
