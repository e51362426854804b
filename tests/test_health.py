"""Health-check flags on hand-made importance curves."""

from darwin_hydra.health import health_check

F = {"MATH": [0.10, 0.30, 0.05, 0.20], "CODE": [0.1, 0.1, 0.1, 0.1]}
M = {"MATH": [0.12, 0.25, 0.06, 0.40], "CODE": [0.1, 0.1, 0.1, 0.1]}


def test_child_between_parents_is_healthy():
    child = {"MATH": [0.11, 0.27, 0.05, 0.30], "CODE": [0.1, 0.1, 0.1, 0.1]}
    rep = health_check(child, F, M)
    assert rep.verdict == "healthy" and rep.flags == []


def test_zeroed_layer_is_function_loss_and_spike_is_interference():
    child = {"MATH": [0.11, 0.0, 0.30, 0.30], "CODE": [0.1, 0.001, 0.1, 0.1]}
    rep = health_check(child, F, M)
    assert rep.verdict == "flagged"
    kinds = {(f.kind, f.probe_set, f.layer) for f in rep.flags}
    assert ("function_loss", "MATH", 1) in kinds and ("function_loss", "CODE", 1) in kinds
    assert ("interference", "MATH", 2) in kinds
    assert rep.flagged_layers == [1, 2]
    assert "layer 1" in rep.flags[0].describe()


def test_thresholds_are_respected():
    child = {"MATH": [0.11, 0.27, 0.09, 0.30], "CODE": [0.1, 0.1, 0.1, 0.1]}
    # 0.09 < 2 * 0.06: no interference at the default factor; flagged with factor 1.2
    assert health_check(child, F, M).verdict == "healthy"
    assert health_check(child, F, M, interference_factor=1.2).flagged_layers == [2]
