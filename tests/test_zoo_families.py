"""Zoo families (issue 18): each family's recipe built at toy size in seconds, checked for what it is
made of (which members start from which, which layers each changed), not for scores; the experiment
files that select them; the merge table on parents that both changed every layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from darwin_hydra.zoo import ensure_zoo, load_metadata, zoo_hash
from darwin_hydra.zoo.config import load_zoo_config, validate

FAMILIES = ("full", "distill", "uniform")

# conf/zoo/tiny.yaml's sizes, on top of a family's recipe (its layers, mixtures, init, learning rates)
TINY = [
    "string_max_len=5", "dev_items=24", "test_items=24", "probe_items=8",
    "dense.hidden_size=16", "dense.num_layers=4", "dense.num_heads=2", "dense.num_kv_heads=1",
    "dense.intermediate_size=32",
    "base.steps=12", "base.batch_size=16", "base.warmup_steps=2",
    "father.steps=6", "father.batch_size=16", "father.warmup_steps=1", "father.keep_batch_size=8",
    "mother.steps=6", "mother.batch_size=16", "mother.warmup_steps=1", "mother.keep_batch_size=8",
    "workers=1",
]
LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("family-zoos")


@pytest.fixture(scope="module")
def roots(cache) -> dict[str, Path]:
    return {name: ensure_zoo(load_zoo_config(name, TINY), cache) for name in FAMILIES}


def _weights(root: Path, role: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / "dense" / role / "model.safetensors"))


def _layer(name: str) -> int | None:
    from darwin_hydra.arch import tensor_info

    return tensor_info(name).layer


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", FAMILIES)
def test_family_zoos_are_valid_dense_only_and_new(name):
    cfg = load_zoo_config(name)
    validate(cfg)
    assert cfg.pairs == ["dense"]
    assert cfg.name == name and zoo_hash(cfg) != zoo_hash(load_zoo_config("default"))
    # the same base as the default zoo's: every field the base's training reads is the default's
    default = load_zoo_config("default")
    for key in ("seed", "skills", "add_digits", "string_min_len", "string_max_len", "dev_items", "test_items",
                "probe_items", "dense", "base"):
        assert getattr(cfg, key) == getattr(default, key), key


def test_init_is_hashed_only_when_set_and_checked():
    # the field added for the distill family leaves every zoo built before it where it was
    assert zoo_hash(load_zoo_config("default", ["mother.init=base", "father.init=base"])) == "f350fad1fb3a"
    assert zoo_hash(load_zoo_config("default", ["mother.init=father"])) != "f350fad1fb3a"
    with pytest.raises(ValueError, match=r"zoo.father.init='father'.*only the mother"):
        validate(load_zoo_config("default", ["father.init=father"]))
    with pytest.raises(ValueError, match=r"zoo.mother.init='mother'"):
        validate(load_zoo_config("default", ["mother.init=mother"]))


@pytest.mark.parametrize(
    "family, zoo, base, mother_skill",
    [
        ("split", "default", "zoo://dense/base", "MATH"),
        ("full", "full", "zoo://dense/base", "MATH"),
        ("distill", "distill", None, "MATH"),
        ("uniform", "uniform", "zoo://dense/base", None),
    ],
)
def test_family_experiments_select_their_zoo_and_parents(family, zoo, base, mother_skill):
    from darwin_hydra.config import compose

    cfg = compose([f"experiment=family_{family}"])
    assert cfg.zoo.name == zoo
    assert zoo_hash(cfg.zoo) == zoo_hash(load_zoo_config(zoo))
    assert (cfg.parents.father, cfg.parents.mother) == ("zoo://dense/father", "zoo://dense/mother")
    assert cfg.parents.base == base
    assert cfg.parents.mother_skill == mother_skill


# ------------------------------------------------------------------------------------------- builds


def test_full_parents_differ_from_the_base_in_every_tensor(roots):
    root = roots["full"]
    meta = load_metadata(root)["pairs"]["dense"]
    base = _weights(root, "base")
    for role in ("father", "mother"):
        member = meta["members"][role]
        assert member["init"] == "base" and member["trained_layers"] == LAYERS
        assert member["updated_layers"] == LAYERS
        w = _weights(root, role)
        same = [k for k in base if torch.equal(base[k], w[k])]
        assert not same, f"{role} left {same} at the base's values"  # embeddings and head too
    assert meta["ground_truth"]["mother_layers"] == meta["ground_truth"]["father_layers"] == LAYERS


def test_distill_mother_starts_from_the_father(roots, cache):
    root = roots["distill"]
    meta = load_metadata(root)["pairs"]["dense"]
    mother = meta["members"]["mother"]
    assert mother["init"] == "father"
    assert mother["updated_vs_init_layers"] == LAYERS  # her own training changed every layer of his
    father_w, mother_w = _weights(root, "father"), _weights(root, "mother")
    assert all(not torch.equal(father_w[k], mother_w[k]) for k in father_w)

    # the same recipe with the mother training her lower half only: everything else is the father's,
    # bit for bit (and the father's is not the base's: she did not start from the base)
    half = ensure_zoo(load_zoo_config("distill", [*TINY, "mother.layers=lower"]), cache)
    base_w, father_w, mother_w = (_weights(half, r) for r in ("base", "father", "mother"))
    untouched = [k for k in mother_w if _layer(k) is None or _layer(k) >= 2]
    assert untouched and all(torch.equal(mother_w[k], father_w[k]) for k in untouched)
    assert all(not torch.equal(father_w[k], base_w[k]) for k in untouched)
    assert load_metadata(half)["pairs"]["dense"]["members"]["mother"]["updated_vs_init_layers"] == [0, 1]


def test_distill_builds_the_same_in_worker_processes(roots, tmp_path):
    # the mother's job waits for the father's checkpoint in a pool too; one thread per job: same bits
    again = ensure_zoo(load_zoo_config("distill", [*TINY, "workers=2"]), tmp_path)
    for role in ("base", "father", "mother"):
        rel = Path("dense") / role / "model.safetensors"
        assert (again / rel).read_bytes() == (roots["distill"] / rel).read_bytes(), f"{rel} differs"


def test_uniform_parents_share_their_recipe_but_not_their_seed(roots):
    root = roots["uniform"]
    members = load_metadata(root)["pairs"]["dense"]["members"]
    father, mother = members["father"], members["mother"]
    assert father["train_mixture"] == mother["train_mixture"] and len(father["train_mixture"]) == 4
    assert father["updated_layers"] == mother["updated_layers"] == LAYERS
    # one recipe (apart from what is off or MoE-only in a dense keep_weight-0 fine-tune); only the
    # member's seed and data stream differ
    cfg = load_zoo_config("uniform")
    ignore = ("keep", "router_aux_loss", "router_lr_scale")
    assert cfg.father.keep_weight == cfg.mother.keep_weight == 0.0
    assert {k: v for k, v in vars(cfg.father).items() if k not in ignore} == {
        k: v for k, v in vars(cfg.mother).items() if k not in ignore
    }
    f, m = _weights(root, "father"), _weights(root, "mother")
    assert any(not torch.equal(f[k], m[k]) for k in f)


# -------------------------------------------------------------------------------------------- table


def test_merge_table_of_overlapping_parents_splits_the_layers_in_halves(roots):
    from darwin_hydra.zoo.table import (
        HALVES_GRID,
        fairness,
        format_table,
        uniform_merge_table,
    )

    assert (1.0, 0.0) in HALVES_GRID and (0.0, 1.0) in HALVES_GRID and all(a != b for a, b in HALVES_GRID)
    table = uniform_merge_table(roots["distill"], ratios=(0.0, 0.5, 1.0), block_grid=((1.0, 0.0),), limit=4)
    assert table.overlapping and table.block_a == [0, 1] and table.block_b == [2, 3]
    assert [r.name for r in table.rows] == ["base", "r=0.0", "father", "r=0.5", "r=1.0", "mother", "blocks 1.0/0.0"]
    assert [r.name for r in table.children] == ["r=0.5", "blocks 1.0/0.0"]  # the base is not a child
    text = format_table(table)
    assert "| base (the father's start; no merge input) |" in text
    assert "| mother from the father (layers 0-3) |" in text
    assert "| two-block: r=1.0 in layers 0-1, r=0.0 in 2-3 |" in text
    verdict = fairness(table)
    assert verdict["best_child_minus_best_uniform"] >= 0 and "base_mean" in verdict
