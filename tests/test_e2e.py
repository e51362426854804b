"""End to end on the tiny zoo through the installed command: the whole pipeline, its outputs, W&B files,
reproduction bit for bit, a damaged tensor named by the reproduce command, the honest-split refusal,
MoE rules, multirun sweeps. (Resume: tests/test_run_contract.py and tests/test_faults.py.)"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from darwin_hydra.io.reader import CheckpointReader
from darwin_hydra.testing import console_script

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["experiment=test_tiny"]


def run_app(run_dir, *overrides, check=True, quick=True):
    """The installed command with ``QUICK`` (the tiny zoo, small budgets) unless ``quick=False``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    p = subprocess.run(console_script("darwin-hydra") + (QUICK if quick else []) + [f"hydra.run.dir={run_dir}", *overrides],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def reproduce(run_dir):
    return subprocess.run(console_script("darwin-hydra-reproduce") + [str(run_dir)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    run_app(run_dir)
    return run_dir


@pytest.mark.slow
def test_pipeline_writes_every_output(full_run):
    d = full_run
    genome = json.loads((d / "genome.json").read_text())
    assert len(genome["genome_hash"]) == 16 and set(genome["genes"]) >= {"mri_trust", "global_ratio"}
    assert (d / ".hydra" / "config.yaml").exists()
    assert (d / "scan" / "scan.json").exists() and (d / "study.db").exists()
    child = d / "child"
    assert (child / "checksums.json").exists() and (child / "README.md").exists()
    assert (child / "tokenizer_config.json").exists() or (child / "tokenizer.json").exists()
    assert genome["genome_hash"] in (child / "README.md").read_text()
    report = (d / "report.md").read_text()
    # every chart the report names exists
    for line in report.splitlines():
        if line.startswith("!["):
            assert (d / line.split("](")[1].rstrip(")")).exists(), line
    assert "evolution" in report and "health" in report.lower() and "benchmark" in report.lower()
    bench = json.loads((d / "benchmark.json").read_text())
    assert {"father", "mother", "child"} <= set(bench["models"])
    # the report's numbers are the run's numbers
    child_mean = bench["models"]["child"]["mean"]
    assert f"{100 * child_mean:.1f}" in report
    assert list(d.glob("wandb/offline-run-*"))


@pytest.mark.slow
def test_reproduce_bit_for_bit_then_names_a_damaged_tensor(full_run):
    p = reproduce(full_run)
    assert p.returncode == 0, p.stderr
    child = full_run / "child"
    reader = CheckpointReader(child)
    name = reader.names[len(reader.names) // 2]
    file = reader.file_of(name)
    entry = reader.entry(name)
    reader.close()
    data = bytearray(file.read_bytes())
    start = entry.offset if hasattr(entry, "offset") else entry.start
    data[start] ^= 0xFF
    file.write_bytes(bytes(data))
    p = reproduce(full_run)
    assert p.returncode == 1
    assert name in p.stderr


@pytest.mark.slow
def test_fitness_on_the_report_split_is_refused(tmp_path):
    p = run_app(tmp_path / "r", "benchmark.fitness_tasks=[zoo_skills_test]", check=False)
    assert p.returncode != 0
    assert "allow_fitness_on_report" in p.stderr
    assert not (tmp_path / "r" / "scan").exists()  # refused before any work


@pytest.mark.slow
def test_moe_pair_end_to_end_with_router_source_and_revival(tmp_path):
    d = tmp_path / "moe"
    run_app(d, "parents=zoo_moe", "genome.revive_dead_experts=true", "genome.router_source=[mother,mother,father]")
    health = json.loads((d / "health.json").read_text())
    assert set(health["moe"]) == {"father", "mother", "child"}
    genome = json.loads((d / "genome.json").read_text())
    assert genome["router_source"] == ["mother", "mother", "father"]
    assert "MoE health" in (d / "report.md").read_text()
    assert reproduce(d).returncode == 0


@pytest.mark.slow
def test_multirun_sweep_gives_two_searches_in_one_wandb_group(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    p = subprocess.run(
        console_script("darwin-hydra") + ["-m", *QUICK, "pipeline.stages=[scan,prescribe,search]", "optimizer.phase2_trials=0",
                                "genome.bounds.mri_trust=[0.0,0.5],[0.5,1.0]", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    runs = sorted((tmp_path / "sweep").glob("*/tracking.json"))
    assert len(runs) == 2
    a, b = (json.loads(r.read_text()) for r in runs)
    assert a["group"] == b["group"] and a["group"] and a["run_id"] != b["run_id"]
    bounds = [json.loads((r.parent / "genome.json").read_text())["genes"]["mri_trust"] for r in runs]
    assert 0.0 <= bounds[0] <= 0.5 <= bounds[1] <= 1.0


@pytest.mark.slow
def test_revival_leaves_the_child_fewer_dead_experts_than_the_mother_on_the_default_moe_zoo(tmp_path):
    """Issue 8's claim on the default zoo's MoE pair (small search budgets; README has the full runs):
    the mother's dead experts are revived, and the child, scanned on the same calibration prompts, has
    fewer dead experts than she has."""
    d = tmp_path / "moe"
    run_app(d, "parents=zoo_moe", "genome.revive_dead_experts=true", "optimizer.phase1_trials=12",
            "optimizer.phase2_top_k=1", "optimizer.phase2_trials=2", "optimizer.patience=2",
            "benchmark.n_bootstrap=200", "logger=none", quick=False)
    genome = json.loads((d / "genome.json").read_text())
    assert genome["revived_experts"], "the default MoE mother has experts dead where the father's live"
    moe = json.loads((d / "health.json").read_text())["moe"]
    assert moe["child"]["dead"] < moe["mother"]["dead"], moe
