"""The MRI on the zoo: dead experts vs the zoo's own routing counts, the probe scan end to end on the
tiny zoo, and (slow, the default zoo) the mother's strongest layers vs the layers her training changed."""

import pytest
import torch

from darwin_hydra.config import compose
from darwin_hydra.mri.config import MriConfig
from darwin_hydra.mri.moe import moe_scan
from darwin_hydra.mri.probes import load_probe_prompts
from darwin_hydra.mri.scan import load_model, load_tokenizer, run_scan


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is fastest, and immune to other processes on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _zoo(name: str, cache):
    from darwin_hydra.zoo import ensure_zoo, load_metadata, resolve_zoo_uri
    from darwin_hydra.zoo.config import load_zoo_config

    cfg = load_zoo_config(name)
    root = ensure_zoo(cfg, cache)
    return root, load_metadata(root), (lambda u: str(resolve_zoo_uri(u, cfg, cache)))


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    return _zoo("tiny", tmp_path_factory.getbasetemp() / "zoo-cache")


def _check_dead_experts(root, meta, resolve, probes_yaml):
    """The zoo counts routing itself (output_router_logits, top-k per prompt token) on each skill's probe
    split; the MRI, from hooks on the routers, must report the same dead experts on the same prompts."""
    pair = meta["pairs"]["moe"]
    probes = compose([f"probes={probes_yaml.removesuffix('.yaml')}"]).probes
    for cat, s in probes.sets.items():
        s.n = meta["probes"][cat]["n"]  # every probe prompt, as the zoo used
    prompts = load_probe_prompts(probes, resolve)
    tok = load_tokenizer(root / "moe" / "father")
    threshold = float(meta["config"]["dead_expert_threshold"])
    checked = dead = 0
    for role in ("father", "mother"):
        model = load_model(root / "moe" / role)
        for skill, counted in pair["experts"]["per_member"][role].items():
            scan = moe_scan(model, tok, prompts[meta["skill_to_category"][skill]], dead_threshold=threshold,
                            progress=False)
            assert scan.dead_experts() == {l: d for l, d in enumerate(counted["dead"])}, (role, skill)
            for row, shares in zip(scan.frequency, counted["shares"]):
                assert row == pytest.approx(shares, abs=1e-4)
            checked += 1
            dead += sum(map(len, counted["dead"]))
    assert checked == 2 * len(meta["skills"])
    return dead


def test_moe_dead_experts_equal_the_zoo_routing_counts(tiny_zoo):
    _check_dead_experts(*tiny_zoo, "zoo_tiny.yaml")


@pytest.mark.slow
def test_moe_dead_experts_equal_the_zoo_routing_counts_on_the_default_zoo():
    from darwin_hydra.zoo import default_cache_dir

    assert _check_dead_experts(*_zoo("default", default_cache_dir()), "zoo.yaml") > 0


@pytest.mark.parametrize("pair", ["dense", "moe"])
def test_run_scan_on_the_tiny_zoo(tiny_zoo, tmp_path, pair):
    root, meta, resolve = tiny_zoo
    probes = compose(["probes=zoo_tiny"]).probes
    res = run_scan(f"zoo://{pair}/father", f"zoo://{pair}/mother", probes, MriConfig(progress=False), resolve,
                   tmp_path / "cache", tmp_path / "scan")
    L = meta["pairs"][pair]["num_layers"]
    assert res.num_layers == L
    assert res.probe_father.layer_evals == res.probe_father.batches * (L + L * (L - 1) // 2)
    assert (res.moe_father is not None) == (pair == "moe")
    assert (tmp_path / "scan" / "scan.json").exists()
    assert set(res.r_mri) == set(res.static.pair)


def _overlap(result, gt_layers, category):
    ranked = result.mother_advantage_ranking([category])
    top = ranked[: len(gt_layers)]
    return len(set(top) & set(gt_layers)) / len(gt_layers), ranked


@pytest.mark.slow
def test_mother_strongest_layers_are_where_her_training_changed_her(tmp_path):
    """Default zoo, dense pair: the layers where the mother's own version matters most for her skill
    (delta probe) are the layers her fine-tune updated (the zoo's ground truth) -- exactly with the base
    as reference, and mostly with the father as reference (no base known)."""
    from darwin_hydra.zoo import default_cache_dir

    root, meta, resolve = _zoo("default", default_cache_dir())
    gt = meta["pairs"]["dense"]["ground_truth"]
    probes = compose(["probes=zoo"]).probes
    found = {}
    for reference, base in (("base", "zoo://dense/base"), ("father", None)):
        res = run_scan("zoo://dense/father", "zoo://dense/mother", probes, MriConfig(progress=False), resolve,
                       tmp_path / "cache", tmp_path / reference, base_path=base)
        found[reference], ranked = _overlap(res, gt["mother_layers"], gt["mother_category"])
        print(f"reference {reference}: mother layers {gt['mother_layers']}, ranked by her "
              f"{gt['mother_category']} delta {ranked}: overlap {found[reference]:.2f}")
    assert found["base"] == 1.0
    assert found["father"] >= 0.75
