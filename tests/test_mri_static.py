"""Static MRI statistics and the prescription formulas, on hand-made tensors and numbers."""

import math

import pytest
import torch

from darwin_hydra.mri.config import MriConfig
from darwin_hydra.mri.prescribe import prescribe, share, transplant_decision
from darwin_hydra.mri.probes import ProbeScan
from darwin_hydra.mri.static import StaticScan, TensorStats, pair_stats, static_score, tensor_stats


def test_entropy_of_a_uniform_histogram_is_log2_bins():
    # 8 bins over [0, 8): the values 0.5, 1.5, ..., 7.5 fill every bin equally
    t = torch.arange(8).float().repeat(100) + 0.5
    s = tensor_stats(t, bins=8)
    assert s.entropy == pytest.approx(3.0)


def test_entropy_of_two_equal_spikes_is_one_bit_and_constant_is_zero():
    t = torch.tensor([0.0, 1.0] * 50)
    assert tensor_stats(t, bins=16).entropy == pytest.approx(1.0)
    assert tensor_stats(torch.full((10,), 3.0), bins=16).entropy == 0.0


def test_norm_std_and_nan_inf_counts():
    t = torch.tensor([3.0, 4.0, float("nan"), float("inf"), -float("inf")])
    s = tensor_stats(t, bins=4)
    assert (s.nan, s.inf, s.numel) == (1, 2, 5)
    assert s.norm == pytest.approx(5.0)  # finite values only
    assert s.std == pytest.approx(0.5)
    r = torch.randn(1000, dtype=torch.float64)
    s = tensor_stats(r)
    assert s.std == pytest.approx(float(r.std(unbiased=False)), rel=1e-9)
    assert s.norm == pytest.approx(float(r.norm()), rel=1e-9)


def test_chunked_stats_equal_whole_tensor_stats(monkeypatch):
    import darwin_hydra.mri.static as static

    t = torch.randn(5000)
    whole = tensor_stats(t, 64)
    monkeypatch.setattr(static, "_CHUNK", 777)
    chunked = tensor_stats(t, 64)
    assert chunked.entropy == pytest.approx(whole.entropy, abs=1e-9)
    assert chunked.std == pytest.approx(whole.std, rel=1e-9)


def test_pair_stats_cosine_and_relative_delta():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([1.0, 1.0])
    p = pair_stats(a, b)
    assert p.cosine == pytest.approx(1 / math.sqrt(2))
    assert p.rel_delta == pytest.approx(1.0)
    assert pair_stats(a, a).rel_delta == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        pair_stats(a, torch.zeros(3))


def test_static_score_v5_weights_on_hand_numbers():
    s = TensorStats(numel=10, norm=250.0, std=0.5, entropy=4.0, nan=0, inf=0)
    # 0.5*4 + 0.3*0.5 + 0.002*min(250, 100)
    assert static_score(s, 0.5, 0.3, 0.002, 100.0) == pytest.approx(2.0 + 0.15 + 0.2)


# ---- prescription ----------------------------------------------------------------------------


def _scan(imp: dict[str, list[float]]) -> ProbeScan:
    L = len(next(iter(imp.values())))
    return ProbeScan(
        sets=list(imp), num_layers=L, importance=imp, block_influence={k: [0.0] * L for k in imp},
        prompts={k: 1 for k in imp}, tokens={k: 1 for k in imp}, layer_evals=0, naive_layer_evals=0,
        batches=1, seconds=0.0,
    )


def _static(names, a: TensorStats, b: TensorStats) -> StaticScan:
    return StaticScan({n: a for n in names}, {n: b for n in names}, {})


NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]


def test_darwin_literal_formula_on_hand_numbers():
    a = TensorStats(1, norm=10.0, std=0.1, entropy=2.0, nan=0, inf=0)
    b = TensorStats(1, norm=10.0, std=0.1, entropy=3.0, nan=0, inf=0)
    fa = _scan({"MATH": [0.2, 0.1], "CODE": [0.1, 0.3]})
    fb = _scan({"MATH": [0.4, 0.1], "CODE": [0.1, 0.1]})
    cfg = MriConfig(blend="raw", probe_terms="all", sharpen="none", outside_layers="static")
    p = prescribe(fa, fb, _static(NAMES, a, b), cfg, NAMES, weights={"MATH": 1.0, "CODE": 2.0})
    sa = 0.3 * 2.0 + 0.2 * 0.1 + 0.002 * 10.0
    sb = 0.3 * 3.0 + 0.2 * 0.1 + 0.002 * 10.0
    # layer 0: probe_A = 0.2 + 2*0.1, probe_B = 0.4 + 2*0.1
    ca, cb = 0.4 * sa + 0.6 * 0.4, 0.4 * sb + 0.6 * 0.6
    assert p.r_mri[NAMES[0]] == pytest.approx(cb / (ca + cb))
    ca, cb = 0.4 * sa + 0.6 * 0.7, 0.4 * sb + 0.6 * 0.3
    assert p.r_mri[NAMES[1]] == pytest.approx(cb / (ca + cb))
    # outside layers, rule "static": the static-only ratio
    assert p.r_mri["lm_head.weight"] == pytest.approx(sb / (sa + sb))


def test_share_blend_own_sets_and_outside_rule_nearest():
    s = TensorStats(1, norm=1.0, std=0.1, entropy=5.0, nan=0, inf=0)
    fa = _scan({"MATH": [0.1, 0.1], "CODE": [0.2, 0.6]})
    fb = _scan({"MATH": [0.3, 0.1], "CODE": [0.2, 0.2]})
    cfg = MriConfig(blend="share", probe_terms="own", sharpen="none", outside_layers="nearest", alpha=0.4)
    p = prescribe(fa, fb, _static(NAMES, s, s), cfg, NAMES)
    # relative advantage: MATH (0.4-0.2)/0.6 = 1/3, CODE (0.4-0.8)/1.2 = -1/3; above the mean (0): MATH is hers
    assert p.mother_sets == ["MATH"] and p.father_sets == ["CODE"]
    # profiles normalised over layers: mother MATH (0.75, 0.25), father CODE (0.25, 0.75)
    assert p.probe_mother == pytest.approx([0.75, 0.25]) and p.probe_father == pytest.approx([0.25, 0.75])
    assert p.r_mri[NAMES[0]] == pytest.approx(0.4 * 0.5 + 0.6 * 0.75)
    assert p.r_mri[NAMES[1]] == pytest.approx(0.4 * 0.5 + 0.6 * 0.25)
    # given mother_sets win over the inference
    q = prescribe(fa, fb, _static(NAMES, s, s), cfg, NAMES, mother_sets=["CODE"])
    assert q.mother_sets == ["CODE"] and q.father_sets == ["MATH"]
    assert p.r_mri["model.embed_tokens.weight"] == pytest.approx(p.per_layer[0])
    assert p.r_mri["lm_head.weight"] == pytest.approx(p.per_layer[1])
    assert p.r_mri["model.norm.weight"] == pytest.approx(p.per_layer[1])


def test_sharpening_stretch_and_temperature():
    s = TensorStats(1, norm=1.0, std=0.1, entropy=5.0, nan=0, inf=0)
    fa = _scan({"MATH": [0.1, 0.2]})
    fb = _scan({"MATH": [0.2, 0.1]})
    base = dict(blend="share", probe_terms="all", alpha=0.0, outside_layers="half")
    raw = prescribe(fa, fb, _static(NAMES, s, s), MriConfig(sharpen="none", **base), NAMES)
    assert raw.per_layer == pytest.approx([2 / 3, 1 / 3])
    st = prescribe(fa, fb, _static(NAMES, s, s), MriConfig(sharpen="stretch", stretch_to=0.45, **base), NAMES)
    assert st.per_layer == pytest.approx([0.95, 0.05])
    assert st.r_mri["lm_head.weight"] == 0.5
    assert st.transplant[NAMES[0]] == "mother" and st.transplant[NAMES[1]] == "father"
    assert st.transplant["lm_head.weight"] == "merge"
    te = prescribe(fa, fb, _static(NAMES, s, s), MriConfig(sharpen="temperature", temperature=0.5, **base), NAMES)
    # sigmoid(logit(2/3)/0.5) = 4/5
    assert te.per_layer == pytest.approx([0.8, 0.2])


def test_stretch_floor_leaves_indistinguishable_parents_alone():
    s = TensorStats(1, norm=1.0, std=0.1, entropy=5.0, nan=0, inf=0)
    fa = _scan({"MATH": [0.1, 0.1]})
    p = prescribe(fa, fa, _static(NAMES, s, s), MriConfig(sharpen="stretch"), NAMES)
    assert all(v == pytest.approx(0.5) for v in p.r_mri.values())


def test_transplant_thresholds_and_share():
    assert transplant_decision(0.1, 0.15, 0.85) == "father"
    assert transplant_decision(0.9, 0.15, 0.85) == "mother"
    assert transplant_decision(0.5, 0.15, 0.85) == "merge"
    assert share(0.0, 0.0) == 0.5


def test_config_errors_name_the_option():
    from darwin_hydra.config import ConfigError, compose
    from darwin_hydra.mri.config import ProbesConfig

    with pytest.raises(ValueError, match="mri.sharpen='sharp' is not one of"):
        MriConfig(sharpen="sharp")
    with pytest.raises(ConfigError, match="mri.alpah"):
        compose(["+mri.alpah=0.3"])
    with pytest.raises(ValueError, match=r"probes.sets.MATH: unknown key\(s\) \['feild'\]"):
        ProbesConfig(name="x", sets={"MATH": {"source": "a.jsonl", "feild": "text"}})
    with pytest.raises(ValueError, match="mri.mother_sets"):
        fa = _scan({"MATH": [0.1]})
        prescribe(fa, fa, _static(NAMES[:1], TensorStats(1, 1, 1, 1, 0, 0), TensorStats(1, 1, 1, 1, 0, 0)),
                  MriConfig(mother_sets=["CODE"]), NAMES[:1])


def test_mri_presets_carry_darwins_weights_and_thresholds():
    """Each preset composes to Darwin's published weights and thresholds (golden values from the V5/V6
    cards); the literal presets switch off every step beyond Darwin's formula."""
    from darwin_hydra.config import compose

    for name, w, alpha, t in (("darwin_v5", (0.5, 0.3, 0.002), 0.5, (0.05, 0.95)),
                              ("darwin_v6", (0.3, 0.2, 0.002), 0.4, (0.15, 0.85))):
        for preset in (name, f"{name}_literal"):
            m = compose([f"mri={preset}", "parents.dtype=bfloat16", "device=cuda"]).mri
            assert m.name == preset
            assert (m.w_entropy, m.w_std, m.w_norm, m.norm_cap) == (*w, 100.0)
            assert (m.alpha, m.t_lo, m.t_hi) == (alpha, *t)
            assert (m.dtype, m.device) == ("bfloat16", "cuda")  # the run's dtype and device
            literal = preset.endswith("_literal")
            assert (m.blend, m.probe_terms, m.sharpen, m.delta_probe) == (
                ("raw", "all", "none", False) if literal else ("share", "delta", "none", True))
