"""Merge engine: formulas on hand tensors, exact ranks, seeded masks, determinism (chunking, worker
count, tensor order, thread count), faults, the ratio map, and the export / in-memory modes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from darwin_hydra.merge import chunks
from darwin_hydra.merge import methods as M
from darwin_hydra.merge.config import METHODS, MergeConfig
from darwin_hydra.merge.engine import InMemoryMerger, merge_named, merge_to_disk
from darwin_hydra.merge.masks import dare_mask, father_bits, mother_bits, uniform_bits
from darwin_hydra.merge.methods import NonFiniteTensorError, merge_tensor
from darwin_hydra.merge.recipe import RatioMap, TensorRecipe, plain_ratio_map, tensor_seed
from darwin_hydra.merge.select import RankSelector, sample_positions
from darwin_hydra.merge.workers import use_processes

g = torch.Generator().manual_seed(0)
A = torch.randn(64, 32, generator=g)
B = A + 0.1 * torch.randn(64, 32, generator=g)
BASE = A - 0.1 * torch.randn(64, 32, generator=g)


def merge(method, a=A, b=B, base=BASE, seed=1, **kw):
    kw.setdefault("ratio", 0.3)
    return merge_tensor(a, b, base, TensorRecipe(method=method, **kw), seed)


def ref_top_k(d, density):
    """TRIM by definition: the k largest |d|, ties broken by flat index (later ranks higher)."""
    n = d.numel()
    k = max(1, int(density * n))
    order = torch.sort(d.abs().flatten(), stable=True).indices
    keep = torch.zeros(n)
    keep[order[n - k :]] = 1
    return d * keep.view_as(d)


def bf16_parents(shape=(700, 1000), seed=0):
    """Parents like real fine-tunes of a bf16 model: deltas take few distinct values (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    fa = (base.float() + 2e-4 * torch.randn(shape, generator=gen)).bfloat16()
    mo = (base.float() + 2e-4 * torch.randn(shape, generator=gen)).bfloat16()
    return fa, mo, base


# ---- formulas ------------------------------------------------------------------------------------


def test_linear_and_task_arithmetic_formulas():
    assert torch.allclose(merge("linear"), 0.7 * A + 0.3 * B, atol=1e-6)
    ta = merge("task_arithmetic", scale=2.0)
    assert torch.allclose(ta, BASE + 2.0 * (0.7 * (A - BASE) + 0.3 * (B - BASE)), atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_ties_family_without_base_is_father_plus_r_times_mother_delta(method):
    # no base: dA = 0, so every entry of dB agrees with the elected sign (V5: child = A + r DARE(B - A))
    out = merge(method, base=None, ratio=0.4)
    assert torch.allclose(out, A + 0.4 * (B - A), atol=1e-6)


def test_ties_sign_election_drops_disagreeing_entries_and_elects_plus_at_zero():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 1.0, -1.0, 2.0, 1.0])
    b = torch.tensor([1.0, -3.0, -1.0, -1.0, -1.0])
    out = merge_tensor(a, b, base, TensorRecipe(method="ties", ratio=0.5), 0)
    # 0.5a + 0.5b: +, -, -, +, 0 -> entry 1 keeps b, entry 3 keeps a, entry 4 (a tie) elects + as mergekit
    assert torch.equal(out, torch.tensor([1.0, -1.5, -1.0, 1.0, 0.5]))


def test_trim_keeps_exactly_the_top_share_ties_by_position():
    d = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 1.0])
    out = merge_tensor(torch.zeros(6), d, torch.zeros(6), TensorRecipe(method="ties", ratio=1.0, density_b=0.5), 0)
    assert torch.equal(out, torch.tensor([0.0, -5.0, 0.0, 4.0, 0.0, 1.0]))
    tied = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, 2.0])  # keep 3: 2.0 and the last two of the tied 1.0s
    out = merge_tensor(torch.zeros(6), tied, torch.zeros(6), TensorRecipe(method="ties", ratio=1.0, density_b=0.5), 0)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 2.0]))


@pytest.mark.parametrize("density", [0.5, 0.3, 0.9])
def test_trim_on_bf16_deltas_keeps_exactly_k_through_the_sampled_selection(density, monkeypatch):
    fa, mo, base = bf16_parents()  # 700k entries: past the gather-all size, median |d| shared by ~20%
    rec = TensorRecipe(method="ties", ratio=1.0, density_b=density)
    out = merge_tensor(fa, mo, base, rec, 0, out_dtype=torch.float32)
    expected = base.float() + ref_top_k(mo.float() - base.float(), density)
    assert torch.equal(out, expected)
    monkeypatch.setattr(chunks, "CHUNK_CPU", 1000)  # chunking changes nothing
    assert torch.equal(merge_tensor(fa, mo, base, rec, 0, out_dtype=torch.float32), out)


def test_rank_selector_is_exact_with_ties_and_when_the_sample_misleads():
    n = 600_000
    v = torch.randint(0, 50, (n,)).float()
    v[: n // 2] = torch.rand(n // 2)  # half continuous, half heavily tied
    ks = [1, 7, n // 3, n // 2, n - 5, n]
    for sample in (v[sample_positions(n)], torch.zeros(65536)):  # a true sample, a lying one
        sel = RankSelector(n, ks, sample)
        for s in range(0, n, 100_000):
            sel.update(v[s : s + 100_000])
        res = sel.result()
        if res is None:
            for s in range(0, n, 100_000):
                sel.update_full(v[s : s + 100_000])
            res = sel.result_full()
        srt = v.sort().values
        assert [r[0] for r in res] == [float(srt[k - 1]) for k in ks]
        assert [r[1] for r in res] == [int((v < srt[k - 1]).sum()) for k in ks]


def test_dare_drops_with_probability_one_minus_density_and_rescales():
    base = torch.zeros(100_000)
    d = torch.ones(100_000)
    out = merge_tensor(base, d, base, TensorRecipe(method="dare_linear", ratio=1.0, density_b=0.3), 5)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    again = merge_tensor(base, d, base, TensorRecipe(method="dare_linear", ratio=1.0, density_b=0.3), 5)
    other = merge_tensor(base, d, base, TensorRecipe(method="dare_linear", ratio=1.0, density_b=0.3), 6)
    assert torch.equal(out, again) and not torch.equal(out, other)
    # density 1 is task arithmetic
    assert torch.equal(merge("dare_linear", density_a=1.0, density_b=1.0), merge("task_arithmetic"))


def test_dare_ties_v5_rule_without_base():
    # child = A + r * DARE(B - A): kept entries move by r (B - A) / p, dropped ones stay the father's
    out = merge("dare_ties", base=None, ratio=0.6, density_b=0.5, seed=3)
    moved = out != A
    assert 0.4 < moved.float().mean() < 0.6
    assert torch.allclose(out[moved], (A + 0.6 * (B - A) / 0.5)[moved], atol=1e-6)


def test_masks_are_a_function_of_seed_and_index():
    full = uniform_bits(99, 0, 300_000)
    assert torch.equal(uniform_bits(99, 123_457, 50_000), full[123_457:173_457])  # any chunk, any order
    assert not torch.equal(uniform_bits(98, 0, 300_000), full)
    fb, mb = father_bits(full).float(), mother_bits(full).float()
    assert fb.min() >= 0 and fb.max() <= 65535 and mb.min() >= 0 and mb.max() <= 65535
    assert abs(fb.mean() / 65535 - 0.5) < 0.01 and abs(mb.mean() / 65535 - 0.5) < 0.01
    assert abs(torch.corrcoef(torch.stack([fb, mb]))[0, 1]) < 0.01  # father's and mother's masks independent
    edges = torch.tensor([-(2**31), -(2**31) + 65535, -1, 0, 65535, 65536, 2**31 - 65537, 2**31 - 1], dtype=torch.int32)
    full = torch.cat([full, edges])  # the draws at the ends of the int32 range and around 0
    for q in (0, 1, 20_000, 32_767, 32_768, 32_769, 65_535):
        assert torch.equal(dare_mask(full, True, q), (father_bits(full) < q).float())
        assert torch.equal(dare_mask(full, False, q), (mother_bits(full) < q).float())
    # one threshold per element (the batched in-memory path): the same bits, and 65536 keeps all
    qs = (0, 1, 20_000, 32_767, 32_768, 32_769, 65_535, 65_536)
    per_element = torch.tensor(qs, dtype=torch.int32).repeat_interleave(full.numel())
    many = full.repeat(len(qs))
    for father in (True, False):
        scalar = [dare_mask(full, father, q) if q < 65_536 else torch.ones(full.numel()) for q in qs]
        assert torch.equal(dare_mask(many, father, per_element), torch.cat(scalar))


def test_breadcrumbs_drops_both_tails():
    d = torch.arange(1, 101, dtype=torch.float32)
    z = torch.zeros(100)
    out = merge_tensor(z, d, z, TensorRecipe(method="breadcrumbs", ratio=1.0, density_b=0.5, gamma=0.1), 0)
    kept = d[out != 0]
    assert kept.numel() == 50 and kept.min() == 41 and kept.max() == 90


def test_della_keeps_large_entries_more_often_and_rescales_by_keep_probability():
    z = torch.zeros(20_000)
    d = torch.linspace(0.01, 1.0, 20_000)  # a 1-D tensor is one row: rank over the whole tensor
    out = merge_tensor(z, d, z, TensorRecipe(method="della_linear", ratio=1.0, density_b=0.5, epsilon=0.2), 2)
    kept = (out != 0).float()
    assert kept[:5000].mean() < 0.4 < 0.6 < kept[-5000:].mean()
    p = 0.3 + 0.4 * torch.arange(20_000) / 19_999
    assert torch.allclose(out[out != 0], (d / p)[out != 0], rtol=1e-5)


def test_slerp_endpoints_orthogonal_midpoint_and_parallel_fallback(monkeypatch):
    assert torch.allclose(merge("slerp", ratio=0.0), A, atol=1e-5)
    assert torch.allclose(merge("slerp", ratio=1.0), B, atol=1e-5)
    assert torch.allclose(merge("slerp", b=2 * A, ratio=0.5), 1.5 * A, atol=1e-6)  # parallel: linear
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # orthogonal as whole tensors
    out = merge_tensor(x, y, None, TensorRecipe(method="slerp", ratio=0.5), 0)
    assert torch.allclose(out, torch.tensor([[0.5**0.5, 0.0], [0.0, 0.5**0.5]]))
    fa, mo, _ = bf16_parents((300, 1000))
    whole = merge_tensor(fa, mo, None, TensorRecipe(method="slerp", ratio=0.3), 0)
    monkeypatch.setattr(chunks, "CHUNK_CPU", 1 << 12)  # statistics summed over other chunks: same child
    assert torch.equal(merge_tensor(fa, mo, None, TensorRecipe(method="slerp", ratio=0.3), 0), whole)


def test_model_stock_needs_a_base_and_interpolates():
    with pytest.raises(ValueError, match="base"):
        merge("model_stock", base=None)
    out = merge("model_stock")
    da, db = A - BASE, B - BASE
    cos = (da * db).sum() / (da.norm() * db.norm())
    t = 2 * cos / (1 + cos)
    assert torch.allclose(out, t * (A + B) / 2 + (1 - t) * BASE, atol=1e-5)


def test_method_weight_blends_with_the_blend_method():
    r = TensorRecipe(method="ties", ratio=0.5, method_weight=0.25, blend_method="slerp")
    out = merge_tensor(A, B, BASE, r, 0)
    expected = 0.25 * merge("ties", ratio=0.5) + 0.75 * merge("slerp", ratio=0.5)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_computes_in_float32_and_returns_the_parent_dtype(method):
    fa, mo, base = bf16_parents((40, 50))
    out = merge_tensor(fa, mo, base, TensorRecipe(method=method, ratio=0.3, density_a=0.6, density_b=0.5), 7)
    assert out.dtype == torch.bfloat16 and out.shape == fa.shape and torch.isfinite(out.float()).all()
    wide = merge_tensor(fa, mo, base, TensorRecipe(method=method, ratio=0.3, density_a=0.6, density_b=0.5), 7,
                        out_dtype=torch.float32)
    assert torch.equal(wide.bfloat16(), out)  # one rounding, at the end
    assert torch.equal(fa, bf16_parents((40, 50))[0])  # inputs untouched


def test_transplant_and_source_return_the_parent_tensor_itself():
    assert merge_tensor(A, B, None, TensorRecipe(ratio=0.05, t_lo=0.15, t_hi=0.85), 0) is A
    assert merge_tensor(A, B, None, TensorRecipe(ratio=0.9, t_lo=0.15, t_hi=0.85), 0) is B
    assert merge_tensor(A, B, None, TensorRecipe(ratio=0.5, source="mother"), 0) is B
    assert merge_tensor(A, B, None, TensorRecipe(ratio=0.5, t_lo=0.15, t_hi=0.85), 0) is not A


def test_rows_from_copies_router_rows_at_the_childs_scale():
    r = TensorRecipe(method="linear", ratio=0.5, rows_from=(("father", (1, 3)),))
    out = merge_tensor(A, B, None, r, 0)
    rest = [i for i in range(A.shape[0]) if i not in (1, 3)]
    s = out[rest].norm(dim=-1).mean() / A[rest].norm(dim=-1).mean()
    assert torch.allclose(out[1], A[1] * s) and torch.allclose(out[3], A[3] * s)
    assert torch.allclose(out[0], 0.5 * (A[0] + B[0]))
    # The father's rows into the father's own tensor: scale exactly 1, bit-identical rows.
    out = merge_tensor(A, B, None, TensorRecipe(ratio=0.5, source="father", rows_from=(("father", (1,)),)), 0)
    assert torch.equal(out, A)


def test_rows_from_checks_its_rows_and_its_source():
    with pytest.raises(ValueError, match=r"rows_from names rows \[99\]"):
        merge_tensor(A, B, None, TensorRecipe(ratio=0.5, rows_from=(("father", (99,)),)), 0, name="gate")
    bad = A.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match="father tensor 'gate'"):
        merge_tensor(bad, B, None, TensorRecipe(ratio=0.5, source="mother", rows_from=(("father", (1,)),)), 0, name="gate")
    # rows asked from the transplanted side itself are its own rows, not rescaled (no dtype drift)
    out = merge_tensor(A, B, None, TensorRecipe(ratio=0.05, t_lo=0.15, rows_from=(("father", (1,)),)), 0,
                       out_dtype=torch.bfloat16)
    assert torch.equal(out, A.bfloat16())


def test_rows_from_applies_to_a_transplanted_router_too():
    # Darwin's recipe: the mother's router whole, with the revived experts' rows from the father.
    big = B * 10
    r = TensorRecipe(ratio=0.5, source="mother", rows_from=(("father", (2,)),))
    out = merge_tensor(A, big, None, r, 0)
    rest = [i for i in range(A.shape[0]) if i != 2]
    assert torch.equal(out[rest], big[rest])
    s = big[rest].norm(dim=-1).mean() / A[rest].norm(dim=-1).mean()
    assert torch.allclose(out[2], A[2] * s)
    assert not torch.equal(big[2], out[2]) and big.data_ptr() != out.data_ptr()  # the mother's tensor is untouched
    r_hi = TensorRecipe(ratio=0.95, t_lo=0.15, t_hi=0.85, rows_from=(("father", (2,)),))
    assert torch.allclose(merge_tensor(A, big, None, r_hi, 0)[2], A[2] * s)
    # the revive gain multiplies the copied rows only, and survives the ratio map's JSON
    g = TensorRecipe(ratio=0.5, source="mother", rows_from=(("father", (2,)),), rows_gain=2.5)
    out_g = merge_tensor(A, big, None, g, 0)
    assert torch.allclose(out_g[2], A[2] * s * 2.5) and torch.equal(out_g[rest], big[rest])
    assert RatioMap.from_json(RatioMap({"gate": g}).to_json())["gate"] == g
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="rows_gain"):
            TensorRecipe(rows_gain=bad)


@pytest.mark.parametrize("role", ["father", "mother", "base"])
def test_nan_or_inf_in_a_parent_is_reported_by_name(role):
    bad = {"father": A.clone(), "mother": B.clone(), "base": BASE.clone()}
    bad[role][3, 4] = float("nan") if role != "base" else float("inf")
    with pytest.raises(NonFiniteTensorError, match=rf"{role} tensor 'model\.layers\.3\.mlp\.up_proj\.weight'"):
        merge_named("model.layers.3.mlp.up_proj.weight", bad["father"], bad["mother"], bad["base"],
                    TensorRecipe(method="dare_ties", density_b=0.5), "h")


def test_nan_in_a_transplanted_tensor_is_reported_too():
    bad = B.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteTensorError, match="mother tensor 'w'"):
        merge_named("w", A, bad, None, TensorRecipe(ratio=0.99, t_hi=0.85), "h")


def _stored_parents(tmp_path, shape=(700, 401)):  # above select.SMALL: TIES ranks a sample first
    """bf16 father, mother, base saved as safetensors; returns (in-memory tensors, StoredTensors)."""
    from safetensors.torch import save_file

    from darwin_hydra.io.reader import CheckpointReader

    fa, mo, base = bf16_parents(shape, seed=3)
    stored = []
    for role, t in (("father", fa), ("mother", mo), ("base", base)):
        save_file({"pad": torch.ones(7, dtype=torch.bfloat16), "w": t}, tmp_path / f"{role}.safetensors")
        stored.append(CheckpointReader(tmp_path / f"{role}.safetensors").stored("w"))
    return (fa, mo, base), stored


STREAM_RECIPES = [
    TensorRecipe(method="dare_ties", ratio=0.4, density_a=0.6, density_b=0.5),
    TensorRecipe(method="dare_ties", ratio=0.4, density_b=0.5, method_weight=0.7),  # blended with linear
    TensorRecipe(method="dare_linear", ratio=0.7, density_a=0.3, density_b=0.9),
    TensorRecipe(method="task_arithmetic", ratio=0.6, scale=1.2),
    TensorRecipe(method="linear", ratio=0.25),
    TensorRecipe(method="slerp", ratio=0.5),
    TensorRecipe(method="model_stock"),
    TensorRecipe(method="ties", ratio=0.5, density_a=0.4, density_b=0.3),
    TensorRecipe(method="breadcrumbs_ties", ratio=0.5, density_a=0.8, density_b=0.7),
    TensorRecipe(method="della", ratio=0.5, density_a=0.6, density_b=0.5),
    TensorRecipe(method="ties", ratio=0.5, density_b=0.3, method_weight=0.4, blend_method="slerp"),
    TensorRecipe(method="breadcrumbs", ratio=0.3, density_a=0.9, density_b=0.8),
    TensorRecipe(method="della_linear", ratio=0.5, density_a=0.7, density_b=0.4),
    TensorRecipe(method="dare_ties", ratio=0.0, density_a=0.5, density_b=0.5),
    TensorRecipe(method="dare_ties", ratio=1.0, density_a=0.5, density_b=0.5),
    TensorRecipe(method="task_arithmetic", ratio=0.5, scale=0.0),
]


@pytest.mark.parametrize("shape", [(700, 401), (30001,)], ids=["2d", "1d"])
@pytest.mark.parametrize("recipe", STREAM_RECIPES, ids=lambda r: f"{r.method}-r{r.ratio}-w{r.method_weight}-s{r.scale}")
def test_parents_left_in_their_files_stream_and_give_the_same_bits(recipe, shape, tmp_path, monkeypatch):
    """Export mode reads a streaming method's parents chunk by chunk from the files: same child, bit
    for bit, and no parent is ever loaded whole."""
    from darwin_hydra.io.reader import StoredTensor

    monkeypatch.setattr(chunks, "CHUNK_CPU", 4096)  # many chunks, and one partial chunk at the end
    tensors, stored = _stored_parents(tmp_path, shape)
    assert M.streams(recipe)
    want = merge_tensor(*tensors, recipe, 77, name="w")
    monkeypatch.setattr(StoredTensor, "load", lambda self: pytest.fail("a streaming merge loaded a parent whole"))
    got = merge_tensor(*stored, recipe, 77, name="w", device="cpu")
    assert got.dtype == torch.bfloat16 and got.shape == tensors[0].shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # signed zeros included


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_parents_left_in_their_files_are_loaded_for_a_transplant_or_a_gpu(device, tmp_path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tensors, stored = _stored_parents(tmp_path, shape=(40, 30))
    recipe = TensorRecipe(method="dare_ties", ratio=0.95, t_hi=0.9) if device == "cpu" else STREAM_RECIPES[0]
    assert M.streams(recipe) == (device == "cuda")
    got = merge_tensor(*stored, recipe, 5, name="w", device=device).cpu()
    assert torch.equal(got, merge_tensor(*tensors, recipe, 5, name="w", device=device).cpu())


# (recipe, parent the child ignores under it, shape): the finite check must still cover that parent
IGNORED = [
    (TensorRecipe(method="dare_ties", ratio=1.0, density_a=0.5, density_b=0.5), "father", (64, 32)),  # wA = 0
    (TensorRecipe(method="dare_ties", ratio=0.0, density_a=0.5, density_b=0.5), "mother", (64, 32)),  # wB = 0
    (TensorRecipe(method="task_arithmetic", ratio=0.5, scale=0.0), "mother", (64, 32)),
    (TensorRecipe(method="linear", ratio=0.5), "base", (64, 32)),
    (TensorRecipe(method="slerp", ratio=0.5, method_weight=0.5), "base", (64, 32)),  # slerp blended with linear
    (TensorRecipe(method="breadcrumbs", ratio=0.5, density_b=0.1), "mother", (8,)),  # int(0.1 * 8) = 0 kept
    (TensorRecipe(method="breadcrumbs_ties", ratio=0.5, density_a=0.5), "father", (1,)),
]


@pytest.mark.parametrize("where", ["memory", "file"])
@pytest.mark.parametrize("recipe,role,shape", IGNORED, ids=[f"{r.method}-{who}" for r, who, _ in IGNORED])
def test_nan_in_a_parent_the_child_does_not_depend_on_is_still_reported(recipe, role, shape, where, tmp_path):
    from safetensors.torch import save_file

    from darwin_hydra.io.reader import CheckpointReader

    gen = torch.Generator().manual_seed(4)
    tensors = {r: torch.randn(shape, generator=gen) for r in ("father", "mother", "base")}
    clean = merge_tensor(*tensors.values(), recipe, 3, name="w")
    moved = dict(tensors, **{role: tensors[role] + 1.0})  # the premise: the child ignores that parent
    assert torch.equal(merge_tensor(*moved.values(), recipe, 3, name="w"), clean)
    bad = dict(tensors, **{role: tensors[role].clone()})
    bad[role].view(-1)[-1] = float("inf")
    if where == "file":
        for r, t in bad.items():
            save_file({"w": t}, tmp_path / f"{r}.safetensors")
        bad = {r: CheckpointReader(tmp_path / f"{r}.safetensors").stored("w") for r in bad}
    with pytest.raises(NonFiniteTensorError, match=f"{role} tensor 'w' holds 0 NaN and 1 Inf"):
        merge_tensor(bad["father"], bad["mother"], bad["base"], recipe, 3, name="w", device="cpu")


def test_a_merge_whose_sum_overflows_checks_stored_parents_by_chunk(tmp_path, monkeypatch):
    """Finite parents and a finite child whose float32 chunk sums overflow: the output check fires, the
    exact check reads the stored parents a chunk at a time (no parent loaded whole), finds nothing,
    and the merge goes on."""
    from safetensors.torch import save_file

    from darwin_hydra.io.reader import CheckpointReader, StoredTensor

    monkeypatch.setattr(chunks, "CHUNK_CPU", 4096)
    gen = torch.Generator().manual_seed(5)
    stored = []
    for role in ("father", "mother", "base"):
        save_file({"w": torch.randn(100, 100, generator=gen).abs()}, tmp_path / f"{role}.safetensors")
        stored.append(CheckpointReader(tmp_path / f"{role}.safetensors").stored("w"))
    calls = []
    real = chunks.check_finite_chunked
    monkeypatch.setattr(chunks, "check_finite_chunked", lambda t, role, name: calls.append(role) or real(t, role, name))
    monkeypatch.setattr(StoredTensor, "load", lambda self: pytest.fail("loaded a parent whole"))
    out = merge_tensor(*stored, TensorRecipe(method="linear", ratio=0.5), 1, name="w", device="cpu")
    assert calls == [] and bool(torch.isfinite(out).all())  # an ordinary merge: no exact check at all
    out = merge_tensor(*stored, TensorRecipe(method="task_arithmetic", ratio=0.5, scale=1e37), 1, name="w",
                       device="cpu")
    assert calls == ["father", "mother", "base"] and bool(torch.isfinite(out.float()).all())


def test_stored_tensor_reads_ranges_and_refuses_what_it_cannot(tmp_path):
    from darwin_hydra.io.reader import CheckpointReader

    tensors, stored = _stored_parents(tmp_path, shape=(10, 9))
    flat = tensors[1].reshape(-1)
    mo = stored[1]
    assert mo.shape == (10, 9) and mo.dtype == torch.bfloat16 and mo.numel() == 90 and mo.is_floating_point()
    assert torch.equal(mo.read(13, 61), flat[13:61]) and mo.read(90, 90).numel() == 0
    assert torch.equal(mo.load(), tensors[1])
    with pytest.raises(IndexError, match="'w'"):
        mo.read(80, 91)
    with pytest.raises(ValueError, match="merge device"):
        merge_tensor(*stored, TensorRecipe(), 1, name="w")
    (tmp_path / "pickled").mkdir()
    torch.save({"w": tensors[0]}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        CheckpointReader(tmp_path / "pickled", allow_pickle=True).stored("w")


# ---- recipes and config ---------------------------------------------------------------------------


def test_seed_depends_on_hash_and_name_only():
    assert tensor_seed("abc", "w") == tensor_seed("abc", "w")
    assert len({tensor_seed("abc", "w"), tensor_seed("abd", "w"), tensor_seed("abc", "v")}) == 3


def test_recipe_validation_names_the_option():
    with pytest.raises(ValueError, match="warp"):
        TensorRecipe(method="warp")
    with pytest.raises(ValueError, match="ratio"):
        TensorRecipe(ratio=1.5)
    with pytest.raises(ValueError, match="merge.method='tis'"):
        MergeConfig(method="tis")


def test_ratio_map_json_round_trip_plain_map_and_summary():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight",
             "model.layers.1.mlp.up_proj.weight"]
    cfg = MergeConfig(method="ties", ratio=0.5, layer_ratios=[0.0, 1.0], component_ratios={"embed": 0.1},
                      t_lo=0.15, t_hi=0.85)
    rmap = plain_ratio_map(names, cfg, 4)
    assert [rmap[n].ratio for n in names] == pytest.approx([0.1, 0.0, 1.0, 1 / 3])
    back = RatioMap.from_json(rmap.to_json())
    assert dict(back) == dict(rmap)
    assert rmap.transplanted() == {"father": names[:2], "mother": names[2:3]}
    summary = rmap.summary()
    assert "from father 2" in summary and "from mother 1" in summary and "'ties': 1" in summary
    with pytest.raises(ValueError, match="warp"):
        plain_ratio_map(names, MergeConfig(component_ratios={"warp": 0.3}), 4)


@pytest.mark.parametrize("method", METHODS)
def test_every_merge_method_has_an_option_that_selects_it(method):
    from darwin_hydra.config import compose

    assert compose([f"merge={method}"]).merge.method == method


# ---- engine: export and in memory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny

    root = tmp_path_factory.mktemp("parents")
    base = save_tiny("qwen3_5_moe", root / "base", seed=0, dtype=torch.bfloat16)
    father = perturbed_copy(base, root / "father", scale=0.05, seed=1)
    mother = perturbed_copy(base, root / "mother", scale=0.05, seed=2)
    return base, father, mother


def _readers(paths):
    from darwin_hydra.io.reader import CheckpointReader

    return [CheckpointReader(p) for p in paths]


def _checksums(path):
    return json.loads((Path(path) / "checksums.json").read_text())["tensors"]


def test_export_is_bit_identical_across_workers_threads_and_order(parents, tmp_path, monkeypatch):
    from darwin_hydra.io.reader import CheckpointReader

    base, father, mother = _readers(parents)
    recipes = [TensorRecipe(method=m, ratio=0.6, density_a=0.5, density_b=0.4) for m in ("dare_ties", "ties", "slerp")]
    rmap = RatioMap({n: recipes[i % 3] for i, n in enumerate(father.names)})
    one = merge_to_disk(father, mother, base, rmap, "g1", tmp_path / "one", workers=1, progress=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the caller's thread setting does not matter either
        two = merge_to_disk(father, mother, base, rmap, "g1", tmp_path / "two", workers=3, progress=False)
        three = merge_to_disk(father, mother, base, rmap, "g1", tmp_path / "threads", workers=3, progress=False,
                              processes=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert _checksums(one) == _checksums(two) == _checksums(three)
    # forked workers writing into reserved slots give the very files an in-order writer gives
    for f in sorted(p.name for p in Path(one).iterdir()):
        assert (Path(one) / f).read_bytes() == (Path(two) / f).read_bytes() == (Path(three) / f).read_bytes(), f
    # the cyclic GC is paused while merging (nested merges too) and restored afterwards
    import gc

    from darwin_hydra.merge import engine

    seen = []
    monkeypatch.setattr(engine, "merge_tensor", lambda *a, **k: seen.append(gc.isenabled()) or merge_tensor(*a, **k))
    assert gc.isenabled()
    merge_to_disk(father, mother, base, rmap, "g1", tmp_path / "gc", workers=2, progress=False, processes=False)
    assert seen and not any(seen) and gc.isenabled() and torch.get_num_threads() == threads
    with engine.merging():  # nested: the outer section's state holds until it ends
        merge_to_disk(father, mother, base, rmap, "g1", tmp_path / "gc2", workers=2, progress=False, processes=False)
        assert not gc.isenabled() and torch.get_num_threads() == 1
    assert gc.isenabled() and torch.get_num_threads() == threads
    monkeypatch.undo()
    # one tensor on its own (any order, any chunking) gives the same bits
    monkeypatch.setattr(chunks, "CHUNK_CPU", 4096)
    name = father.names[-3]
    alone = merge_named(name, father.get(name), mother.get(name), base.get(name), rmap[name], "g1")
    assert torch.equal(alone, CheckpointReader(one).get(name))
    other = merge_to_disk(father, mother, base, rmap, "g2", tmp_path / "three", workers=2, progress=False)
    assert _checksums(other) != _checksums(one)


def test_in_memory_equals_export_including_fused_experts(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    base, father, mother = _readers(parents)
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.3, density_b=0.7) for n in father.names})
    out = merge_to_disk(father, mother, base, rmap, "h", tmp_path / "child", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    model = AutoModelForCausalLM.from_pretrained(father.path).eval()
    tensors = [{n: r.get(n) for n in r.names} for r in (father, mother, base)]
    merger = InMemoryMerger(model, tensors[0], tensors[1], tensors[2])
    assert merger.apply(rmap, "h") == len(father.names)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), exported.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # nothing changed -> nothing re-merged; a new hash re-merges only the random tensors
    assert merger.apply(rmap, "h") == 0
    lin = RatioMap({n: TensorRecipe(method="linear", ratio=0.3) for n in father.names})
    merger.apply(lin, "x")
    assert merger.apply(lin, "y") == 0
    assert merger.apply(RatioMap({**lin, father.names[0]: TensorRecipe(method="linear", ratio=0.4)}), "y") == 1


@pytest.mark.parametrize("with_base", [True, False])
def test_in_memory_fast_path_gives_the_export_bits_for_mixed_recipes(parents, tmp_path, with_base):
    """The batched path (small models, Darwin's dare_ties with a linear blend) and the per-tensor path
    (everything else) together give exactly the exported child."""
    from transformers import AutoModelForCausalLM

    base, father, mother = _readers(parents)
    base = base if with_base else None
    kinds = [TensorRecipe(method="dare_ties", ratio=0.4, density_a=0.6, density_b=0.5, method_weight=0.7),
             TensorRecipe(method="dare_linear", ratio=0.2, density_b=0.8),
             TensorRecipe(method="task_arithmetic", ratio=0.6, scale=1.3),
             TensorRecipe(method="ties", ratio=0.5, density_b=0.5),
             TensorRecipe(method="dare_ties", ratio=0.9, t_hi=0.85),
             TensorRecipe(method="dare_ties", ratio=1.0, density_b=0.5)]
    rmap = RatioMap({n: kinds[i % len(kinds)] for i, n in enumerate(father.names)})
    out = merge_to_disk(father, mother, base, rmap, "hh", tmp_path / "child", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out).eval().state_dict()
    tensors = [None if r is None else {n: r.get(n) for n in r.names} for r in (father, mother, base)]
    fast = InMemoryMerger(AutoModelForCausalLM.from_pretrained(father.path).eval(), *tensors)
    assert fast.batch is not None
    fast.apply(rmap, "hh")
    for k, v in fast.model.state_dict().items():
        assert torch.equal(v, exported[k]), k
    InMemoryMerger.BATCH_MAX_ELEMENTS, saved = 0, InMemoryMerger.BATCH_MAX_ELEMENTS
    try:
        slow = InMemoryMerger(AutoModelForCausalLM.from_pretrained(father.path).eval(), *tensors)
    finally:
        InMemoryMerger.BATCH_MAX_ELEMENTS = saved
    assert slow.batch is None
    slow.apply(rmap, "hh")
    def bits(t):  # compare bit patterns (signed zeros included)
        return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    for (k, v), (k2, v2) in zip(fast.model.state_dict().items(), slow.model.state_dict().items()):
        assert torch.equal(bits(v), bits(v2)), k


def test_in_memory_merger_names_a_nan_parent_tensor_at_once(parents):
    from transformers import AutoModelForCausalLM

    base, father, mother = _readers(parents)
    tensors = [{n: r.get(n) for n in r.names} for r in (father, mother)]
    name = father.names[4]
    tensors[1][name] = tensors[1][name].clone()
    tensors[1][name].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match=f"mother tensor '{name}'"):
        InMemoryMerger(AutoModelForCausalLM.from_pretrained(father.path).eval(), *tensors)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_export_keeps_its_tensors_in_flight_under_the_memory_bound(parents, tmp_path, monkeypatch, processes):
    """max_inflight_bytes bounds the tensors held whole (transplants here) scheduled at once (one
    always may): at 1 byte the workers take one at a time; with room they overlap. Streamed tensors
    hold nothing and always overlap. Same child either way."""
    import multiprocessing
    import time

    from darwin_hydra.merge import engine

    if processes and not use_processes(None, torch.device("cpu"), 2):
        pytest.skip("forked export workers need Linux")
    base, father, mother = _readers(parents)
    # shared with forked workers (and safe across threads)
    active, peak = (multiprocessing.get_context("fork").Value("i", 0) for _ in range(2))

    def counted(*a, **k):
        with active.get_lock():
            active.value += 1
            peak.value = max(peak.value, active.value)
        time.sleep(0.005)
        try:
            return merge_tensor(*a, **k)
        finally:
            with active.get_lock():
                active.value -= 1

    monkeypatch.setattr(engine, "merge_tensor", counted)
    whole = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.1, density_b=0.5, t_lo=0.2) for n in father.names})
    one = merge_to_disk(father, mother, base, whole, "h", tmp_path / "one", workers=3, progress=False,
                        max_inflight_bytes=1, dtype="float32", processes=processes)
    assert peak.value == 1
    peak.value = 0
    many = merge_to_disk(father, mother, base, whole, "h", tmp_path / "many", workers=3, progress=False,
                         dtype="float32", processes=processes)
    assert peak.value > 1
    assert _checksums(one) == _checksums(many)
    peak.value = 0
    streamed = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.4, density_b=0.5) for n in father.names})
    merge_to_disk(father, mother, base, streamed, "h", tmp_path / "streamed", workers=3, progress=False,
                  max_inflight_bytes=1, processes=processes)
    assert peak.value > 1


def test_export_writes_the_requested_dtype(parents, tmp_path):
    base, father, mother = _readers(parents)
    rmap = RatioMap({n: TensorRecipe(method="linear", ratio=0.5) for n in father.names})
    out = merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", dtype="float32", progress=False)
    child = _readers([out])[0]
    assert {child.dtype(n) for n in child.names if father.dtype(n).is_floating_point} == {torch.float32}


def test_export_refuses_a_map_missing_tensors(parents, tmp_path):
    base, father, mother = _readers(parents)
    rmap = RatioMap({n: TensorRecipe() for n in father.names[1:]})
    with pytest.raises(KeyError, match="no recipe"):
        merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_nan_during_export_names_the_tensor_and_leaves_no_child(parents, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base, father, mother = _readers(parents)
    bad_dir = tmp_path / "bad"
    shutil.copytree(mother.path, bad_dir)
    sd = load_file(bad_dir / "model.safetensors")
    name = sorted(sd)[5]
    sd[name][..., 0] = float("inf")
    save_file(sd, bad_dir / "model.safetensors", metadata={"format": "pt"})
    rmap = RatioMap({n: TensorRecipe(method="ties", ratio=0.5) for n in father.names})
    with pytest.raises(NonFiniteTensorError, match=name.replace(".", r"\.")):
        merge_to_disk(father, _readers([bad_dir])[0], base, rmap, "h", tmp_path / "child", progress=False)
    assert not (tmp_path / "child").exists()
    assert not list(tmp_path.glob("child.tmp*"))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_killed_export_leaves_no_finished_looking_child(parents, tmp_path, processes):
    """SIGKILL in the middle of the export: no ``child`` directory, no worker left behind, and the
    next export succeeds."""

    if processes and not use_processes(None, torch.device("cpu"), 2):
        pytest.skip("forked export workers need Linux")
    base, father, mother = (str(p) for p in parents)
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, signal
        from darwin_hydra.io.reader import CheckpointReader
        from darwin_hydra.io.writer import CheckpointWriter as W
        from darwin_hydra.merge import engine
        from darwin_hydra.merge.engine import merge_to_disk
        from darwin_hydra.merge.recipe import RatioMap, TensorRecipe
        fill, merge = W.fill, engine.merge_tensor
        def then_die(self):
            if len(self.checksums) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        W.fill = lambda self, *a: (fill(self, *a), then_die(self))[0]
        def merge_noting_pid(*a, **k):
            with open({str(pids)!r}, "a") as out:
                out.write(f"{{os.getpid()}}\\n")
            return merge(*a, **k)
        engine.merge_tensor = merge_noting_pid
        open({str(tmp_path / "parent")!r}, "w").write(str(os.getpid()))
        f, m, b = (CheckpointReader(p) for p in ({father!r}, {mother!r}, {base!r}))
        rmap = RatioMap({{n: TensorRecipe(method="ties", ratio=0.5) for n in f.names}})
        merge_to_disk(f, m, b, rmap, "h", {str(tmp_path / "child")!r}, progress=False, workers=2,
                      processes={processes!r})
    """)
    log = tmp_path / "log"
    with open(log, "w") as out:  # not a pipe: a lingering worker would hold it open, and run() wait for it
        p = subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    assert p.returncode == -9, log.read_text()[-2000:]
    assert not (tmp_path / "child").exists()
    assert list(tmp_path.glob("child.tmp*"))  # the partial work is under a temporary name
    workers = {int(x) for x in pids.read_text().split()} - {int((tmp_path / "parent").read_text())}
    assert bool(workers) == processes
    deadline = time.monotonic() + 10
    try:
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "export workers outlived the killed merge"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    b, f, m = _readers(parents)
    rmap = RatioMap({n: TensorRecipe(method="ties", ratio=0.5) for n in f.names})
    merge_to_disk(f, m, b, rmap, "h", tmp_path / "child", progress=False)
    assert (tmp_path / "child" / "checksums.json").exists() and not list(tmp_path.glob("child.tmp*"))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_nan_in_a_parent_file_stops_the_export_by_name(parents, tmp_path, processes):
    """Raised in a worker (a forked one included), reported by tensor and parent; nothing is left."""
    import shutil

    from safetensors.torch import load_file, save_file


    if processes and not use_processes(None, torch.device("cpu"), 2):
        pytest.skip("forked export workers need Linux")
    base, father, mother = parents
    bad = tmp_path / "mother"
    shutil.copytree(mother, bad)
    tensors = load_file(bad / "model.safetensors")
    name = sorted(n for n in tensors if n.endswith("mlp.gate.weight") or n.endswith("down_proj.weight"))[0]
    tensors[name].view(-1)[7] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    b, f, m = _readers([base, father, bad])
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.5, density_b=0.5) for n in f.names})
    with pytest.raises(NonFiniteTensorError, match=rf"mother tensor '{name}' holds 1 NaN"):
        merge_to_disk(f, m, b, rmap, "h", tmp_path / "child", workers=2, progress=False, processes=processes)
    assert not (tmp_path / "child").exists() and not list(tmp_path.glob("child.tmp*"))


def test_export_workers_are_processes_only_where_they_work(monkeypatch):
    from darwin_hydra.merge import workers

    cpu = torch.device("cpu")
    assert not use_processes(None, cpu, 1)  # one worker: no pool unless asked
    if sys.platform == "linux":
        assert use_processes(True, cpu, 1) and use_processes(None, cpu, 2)
    assert not use_processes(False, cpu, 4)
    assert not use_processes(None, torch.device("cuda"), 4)
    with pytest.raises(ValueError, match="merge.processes=true merges on the CPU only"):
        use_processes(True, torch.device("cuda"), 4)
    monkeypatch.setattr(workers.sys, "platform", "darwin")
    assert not use_processes(None, cpu, 4)
    with pytest.raises(ValueError, match="merge.processes=true needs fork"):
        use_processes(True, cpu, 4)


def test_a_parent_truncated_under_a_forked_worker_stops_the_export(parents, tmp_path, monkeypatch):
    """Forked workers read the parents through mmap: a file cut short while mapped kills the worker
    (SIGBUS), not the merging process, which stops with an error and leaves nothing."""
    import shutil

    from darwin_hydra.merge import engine

    if not use_processes(None, torch.device("cpu"), 2):
        pytest.skip("forked export workers need Linux")
    copies = [shutil.copytree(p, tmp_path / p.name) for p in parents]
    base, father, mother = _readers(copies)
    target = sorted(father.names)[-1]
    shard = mother.file_of(target)

    def truncating(*a, name="tensor", **k):
        if name == target:
            os.truncate(shard, 64)
        return merge_tensor(*a, name=name, **k)

    monkeypatch.setattr(engine, "merge_tensor", truncating)
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.4, density_b=0.5) for n in father.names})
    with pytest.raises(RuntimeError, match="an export worker process died .*truncated"):
        merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", workers=2, progress=False, processes=True)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("c.tmp*"))


class _TwoArgError(Exception):
    def __init__(self, a, b):  # does not unpickle from its args alone
        super().__init__(f"{a} and {b}")


def test_a_worker_error_names_its_tensor_even_one_that_does_not_unpickle(parents, tmp_path, monkeypatch):
    from darwin_hydra.merge import engine

    base, father, mother = _readers(parents)
    target = sorted(father.names)[3]

    def failing(*a, name="tensor", **k):
        if name == target:
            raise _TwoArgError("this", "that")
        return merge_tensor(*a, name=name, **k)

    monkeypatch.setattr(engine, "merge_tensor", failing)
    rmap = RatioMap({n: TensorRecipe(method="dare_ties", ratio=0.4, density_b=0.5) for n in father.names})
    for processes in ([False, True] if use_processes(None, torch.device("cpu"), 2) else [False]):
        with pytest.raises((_TwoArgError, RuntimeError), match="this and that") as info:
            merge_to_disk(father, mother, base, rmap, "h", tmp_path / "c", workers=2, progress=False,
                          processes=processes)
        assert f"(while merging tensor {target!r})" in info.value.__notes__
        assert processes == (info.type is RuntimeError)  # a forked worker's error crossed as its message
        assert not (tmp_path / "c").exists() and not list(tmp_path.glob("c.tmp*"))


def test_the_plain_merge_hash_ignores_how_the_export_runs():
    from darwin_hydra.stages.merge import plain_hash

    fps = {"father": "f", "mother": "m"}
    perf = [dict(processes=p, workers=w, device=d) for p in (None, False, True) for w in (0, 1, 2) for d in ("cpu", "auto")]
    assert len({plain_hash(MergeConfig(method="dare_ties", **kw), fps) for kw in perf}) == 1
    assert plain_hash(MergeConfig(method="dare_ties", ratio=0.4), fps) != plain_hash(MergeConfig(method="dare_ties"), fps)
    # version 1, the hash of plain children exported before version 2 (computed by 783b9f0's code): it kept
    # workers and device, and darwin-hydra-reproduce still rebuilds those children with it
    assert plain_hash(MergeConfig(method="dare_ties"), fps, version=1) == "9d9a7c3ecdf44ecd"
    assert plain_hash(MergeConfig(method="ties", ratio=0.3, workers=2), fps, version=1) == "4931bba4194abdc7"
    assert plain_hash(MergeConfig(method="ties", ratio=0.3, workers=1), fps, version=1) != "4931bba4194abdc7"


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["dare_ties", "ties", "linear", "breadcrumbs"])
def test_cuda_gives_the_cpu_child(method):
    fa, mo, base = bf16_parents((700, 1000))
    rec = TensorRecipe(method=method, ratio=0.4, density_a=0.5, density_b=0.6)
    cpu = merge_tensor(fa, mo, base, rec, 11)
    gpu = merge_tensor(fa, mo, base, rec, 11, device="cuda")
    assert torch.equal(cpu, gpu.cpu())
