"""mergekit 0.1.5 as an oracle (dev extra): with equivalent settings our child equals its output.

Equivalences (docs/merge.md): our ratio r is mergekit's weights (1 - r, r) for father and mother;
our TIES family is mergekit's with ``normalize: false`` (we do not renormalise by the weights of the
agreeing parents: DESIGN's child = b + (1-r) dA' + r dB'); DARE compared at density 1 because the
random masks (and mergekit's rescaling) differ by design.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit")

from darwin_hydra.io.checkpoint import CheckpointReader  # noqa: E402
from darwin_hydra.merge.engine import merge_to_disk  # noqa: E402
from darwin_hydra.merge.recipe import RatioMap, TensorRecipe  # noqa: E402

R = 0.3


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from darwin_hydra.testing.tiny import perturbed_copy, save_tiny

    root = tmp_path_factory.mktemp("mk")
    base = save_tiny("llama", root / "base", seed=0)
    perturbed_copy(base, root / "father", scale=0.05, seed=1)
    perturbed_copy(base, root / "mother", scale=0.05, seed=2)
    return root


def mergekit(root: Path, method: str, with_base: bool, params: str = "") -> Path:
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        pytest.skip("mergekit-yaml not on PATH")
    out = root / f"mk_{method}"
    if out.exists():
        return out
    if method == "slerp":
        yml = f"""merge_method: slerp
base_model: {root}/father
models:
  - model: {root}/father
  - model: {root}/mother
parameters: {{t: {R}}}
dtype: float32
"""
    else:
        base = f"base_model: {root}/base\n" if with_base else ""
        yml = f"""merge_method: {method}
{base}models:
  - model: {root}/father
    parameters: {{weight: {1 - R}, density: 1.0}}
  - model: {root}/mother
    parameters: {{weight: {R}, density: 1.0}}
parameters: {{normalize: false{params}}}
dtype: float32
"""
    (root / f"{method}.yml").write_text(yml)
    p = subprocess.run([exe, str(root / f"{method}.yml"), str(out), "--no-lazy-unpickle"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def ours(root: Path, method: str, with_base: bool) -> Path:
    father, mother = CheckpointReader(root / "father"), CheckpointReader(root / "mother")
    base = CheckpointReader(root / "base") if with_base else None
    rmap = RatioMap({n: TensorRecipe(method=method, ratio=R) for n in father.names})
    return merge_to_disk(father, mother, base, rmap, "oracle", root / f"ours_{method}", progress=False, overwrite=True)


@pytest.mark.parametrize(
    "method,with_base",
    [("linear", False), ("slerp", False), ("task_arithmetic", True), ("ties", True), ("dare_ties", True), ("dare_linear", True)],
)
def test_child_equals_mergekit(zoo, method, with_base):
    a = CheckpointReader(mergekit(zoo, method, with_base))
    b = CheckpointReader(ours(zoo, method, with_base))
    assert set(a.names) == set(b.names)
    for n in a.names:
        x, y = a.get(n).float(), b.get(n).float()
        # within bf16 rounding of the values
        assert torch.allclose(x, y, rtol=2**-8, atol=1e-6), (method, n, (x - y).abs().max())


def test_ties_differs_from_mergekit_default_normalisation_on_purpose(zoo):
    """mergekit's default (normalize: true) divides by the weights of the agreeing parents; we don't."""
    out = zoo / "mk_ties_norm"
    if not out.exists():
        yml = f"""merge_method: ties
base_model: {zoo}/base
models:
  - model: {zoo}/father
    parameters: {{weight: {1 - R}, density: 1.0}}
  - model: {zoo}/mother
    parameters: {{weight: {R}, density: 1.0}}
dtype: float32
"""
        (zoo / "ties_norm.yml").write_text(yml)
        subprocess.run([shutil.which("mergekit-yaml"), str(zoo / "ties_norm.yml"), str(out), "--no-lazy-unpickle"],
                       check=True, capture_output=True)
    a, b = CheckpointReader(out), CheckpointReader(ours(zoo, "ties", True))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(a.get(name), b.get(name), rtol=2**-8, atol=1e-6)
