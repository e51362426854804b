"""Report charts on edge-case numbers a real run produces."""

import numpy as np

from darwin_hydra.evaluate.stats import mean_ci
from darwin_hydra.report import charts


def test_benchmark_bars_accepts_a_perfect_score(tmp_path):
    # A skill at 100% (the zoo's map): the Wilson upper bound is 1 up to rounding, which may fall
    # below the estimate; the chart must still draw (a run once died here, after its whole search).
    perfect = mean_ci(np.ones(400))
    half = mean_ci(np.r_[np.ones(200), np.zeros(200)])
    table = {
        model: {"map": tuple(100 * v for v in perfect), "add": tuple(100 * v for v in half)}
        for model in ("father", "mother", "child")
    }
    path = charts.benchmark_bars(table, tmp_path / "benchmark.png")
    assert path.is_file() and path.stat().st_size > 1000
