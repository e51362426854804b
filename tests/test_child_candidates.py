"""The child is the best candidate measured on dev: the search's genome, the MRI's own child or the best
uniform ratio (issue 18). A child that is not a genome is exported, reported, resumed and reproduced like
one; the proxy of every benchmarked model is kept for the proxy-vs-dev rank correlation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from darwin_hydra.config import compose
from darwin_hydra.io.reader import CheckpointReader
from darwin_hydra.reproduce import reproduce
from darwin_hydra.run import run
from darwin_hydra.search.fitness import choose_child

TINY = ["experiment=test_tiny", "logger=none"]


def test_the_highest_dev_score_wins_and_a_tie_goes_to_the_simpler_candidate():
    rows = [{"kind": "genome", "dev": 0.8}, {"kind": "mri", "dev": 0.7}, {"kind": "uniform", "dev": 0.7}]
    assert choose_child(rows)["kind"] == "genome"
    rows[0]["dev"] = 0.7
    assert choose_child(rows)["kind"] == "uniform"
    assert choose_child(rows[:2])["kind"] == "mri"
    # a float-rounding tie (the same items right, summed in another order) is a tie
    assert choose_child([{"kind": "genome", "dev": 0.9550000000000001}, {"kind": "uniform", "dev": 0.955}])["kind"] \
        == "uniform"
    with pytest.raises(ValueError, match="child_candidates is empty"):
        choose_child([])


def test_child_candidates_are_checked_when_composed():
    assert [str(c) for c in compose([]).optimizer.child_candidates] == ["genome", "mri", "uniform"]
    from darwin_hydra.config import ConfigError

    with pytest.raises(ConfigError, match="each once"):
        compose(["optimizer.child_candidates=[uniform,uniform]"])
    with pytest.raises(Exception, match="child_candidates"):
        compose(["optimizer.child_candidates=[unifrm]"])
    with pytest.raises(ConfigError, match="only phase 2 uses"):
        compose(["optimizer.child_candidates=[uniform]", "optimizer.phase2_trials=0"])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cand") / "default"
    run(TINY + ["pipeline.stages=[preflight,scan,prescribe,search]"], run_dir)
    return run_dir


@pytest.mark.slow
def test_every_candidate_is_scored_on_dev_and_the_child_is_the_best(default_run):
    record = json.loads((default_run / "search.json").read_text())
    genome = json.loads((default_run / "genome.json").read_text())
    rows = record["candidates"]["rows"]
    assert [r["kind"] for r in rows] == ["genome", "mri", "uniform"]
    chosen = record["candidates"]["chosen"]
    assert chosen["dev"] == max(r["dev"] for r in rows) and genome["genome_hash"] == chosen["genome_hash"]
    assert rows[2]["dev"] == record["uniform_baseline"]["best_dev"]
    # every model scored on dev carries its proxy: phase 2's genomes, the uniform grid, the MRI's child
    assert len(record["benchmark_log"]) == record["benchmark_evaluations"] > 0
    assert all(isinstance(e["proxy"], float) for e in record["benchmark_log"])
    n = len(record["benchmark_log"]) + len(record["uniform_baseline"]["grid"]) + 1
    assert record["proxy_vs_dev"]["n"] == n


@pytest.mark.slow
def test_a_resumed_search_keeps_the_benchmark_log_of_trials_run_before(default_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(default_run, resumed)
    for name in ("genome.json", "search.json"):
        (resumed / name).unlink()
    run(TINY + ["pipeline.stages=[preflight,scan,prescribe,search]"], resumed)
    before, after = (json.loads((d / "search.json").read_text()) for d in (default_run, resumed))
    assert after["benchmark_log"] == before["benchmark_log"]  # replayed from the study, not re-evaluated
    assert after["candidates"] == before["candidates"]
    assert json.loads((resumed / "genome.json").read_text()) == json.loads((default_run / "genome.json").read_text())


@pytest.mark.slow
def test_a_uniform_child_is_exported_reported_resumed_and_reproduced(tmp_path):
    run_dir = tmp_path / "uniform"
    run(TINY + ["optimizer.child_candidates=[uniform]"], run_dir)
    genome = json.loads((run_dir / "genome.json").read_text())
    record = json.loads((run_dir / "search.json").read_text())
    r = record["uniform_baseline"]["best_ratio"]
    assert genome["child"] == {"kind": "uniform", "ratio": r}
    assert genome["genome_hash"] == record["candidates"]["chosen"]["genome_hash"]
    child_record = json.loads((run_dir / "child" / "darwin_hydra.json").read_text())
    assert child_record["kind"] == "search-uniform" and child_record["genome_hash"] == genome["genome_hash"]

    # the child's tensors are (1 - r) father + r mother
    cfg = json.loads((run_dir / "child" / "darwin_hydra.json").read_text())["config"]
    from darwin_hydra.zoo import resolve_zoo_uri
    from darwin_hydra.zoo.config import load_zoo_config

    zoo = load_zoo_config("tiny")
    father, mother = (CheckpointReader(resolve_zoo_uri(cfg["parents"][k], zoo)) for k in ("father", "mother"))
    child = CheckpointReader(run_dir / "child")
    name = next(n for n in child.names if n.endswith("mlp.down_proj.weight"))
    want = ((1 - r) * father.get(name).float() + r * mother.get(name).float()).to(child.get(name).dtype)
    torch.testing.assert_close(child.get(name), want, atol=1e-2, rtol=1e-2)

    report = (run_dir / "report.md").read_text()
    assert "## Dev candidates" in report and "uniform **(child)**" in report
    card = (run_dir / "child" / "README.md").read_text()
    assert "the child is the search's **uniform** candidate" in card

    assert reproduce(run_dir) == ([], [])
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "genome.json", run_dir / "report.md")}
    run(TINY + ["optimizer.child_candidates=[uniform]"], run_dir)  # resumed: every stage verifies, nothing redone
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


@pytest.mark.slow
def test_an_mri_only_child_reproduces(tmp_path):
    run_dir = tmp_path / "mri"
    run(TINY + ["optimizer.child_candidates=[mri]"], run_dir)
    genome = json.loads((run_dir / "genome.json").read_text())
    assert genome["child"] == {"kind": "mri"}
    assert json.loads((run_dir / "child" / "darwin_hydra.json").read_text())["kind"] == "search-mri"
    assert reproduce(run_dir) == ([], [])
