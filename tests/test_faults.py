"""Fault injection (issue 15): the installed command killed inside every stage, trials included, and
resumed each time with README's resume command, ends with the child of a run never killed, and never
leaves a finished-looking partial output. SIGTERM unwinds an export without leaving its temporary
directory. (scripts/fault_inject.py kills at random moments, many times.)"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from darwin_hydra.testing import console_script

ROOT = Path(__file__).resolve().parents[1]
# mri.cache=false: every attempt really scans (a cached scan would skip the scan's fault point)
ARGS = ["experiment=test_tiny", "logger=none", "mri.cache=false"]


def darwin_hydra(run_dir, *overrides, fault=None):
    cmd = console_script("darwin-hydra")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.pop("DARWIN_HYDRA_FAULT", None)
    if fault:
        env["DARWIN_HYDRA_FAULT"] = fault
    return subprocess.run(cmd + [*overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


def assert_nothing_half_done(run_dir: Path, finished: bool = False):
    """What a dead run leaves: a child only whole (checksums of every tensor), a report only at the end;
    a SIGKILLed export's ``child.tmp-*`` (named as unfinished) until the run is resumed, then nothing."""
    from darwin_hydra.reproduce import verify_dir

    if finished:
        assert not list(run_dir.glob("child.tmp-*")) and not list(run_dir.rglob(".*.tmp"))
    if (run_dir / "child").exists():
        sums = json.loads((run_dir / "child" / "checksums.json").read_text())["tensors"]
        assert verify_dir(run_dir / "child", sums) == []
    if (run_dir / "report.md").exists():
        assert (run_dir / "health.json").exists() and (run_dir / "benchmark.json").exists()


@pytest.mark.slow
def test_killed_in_every_stage_and_resumed_the_run_ends_with_the_unkilled_child(tmp_path):
    from darwin_hydra.reproduce import reproduce

    reference = tmp_path / "reference"
    p = darwin_hydra(reference, *ARGS)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "killed"
    # scan; a phase-1 trial; a phase-2 trial (4 phase-1 trials, the killed one re-run, then phase 2's
    # first); the export after its first tensor; the health stage; the report before report.md
    faults = ["scan", "trial:2", "trial:4", "export", "stage:health", "report"]
    p = darwin_hydra(run_dir, *ARGS, fault=faults[0])
    assert p.returncode == -9, p.stderr[-3000:]
    for fault in faults[1:] + [None]:
        assert_nothing_half_done(run_dir)
        p = darwin_hydra(run_dir, fault=fault)  # README's resume: the run directory only
        assert p.returncode == (-9 if fault else 0), (fault, p.stderr[-3000:])
    assert_nothing_half_done(run_dir, finished=True)
    genome, ref = (json.loads((d / "genome.json").read_text()) for d in (run_dir, reference))
    assert genome["genome_hash"] == ref["genome_hash"]
    assert (json.loads((run_dir / "child" / "checksums.json").read_text())
            == json.loads((reference / "child" / "checksums.json").read_text()))
    assert reproduce(run_dir) == ([], [])


@pytest.mark.slow
def test_sigterm_during_an_export_leaves_no_temporary_directory(tmp_path):
    run_dir = tmp_path / "run"
    p = darwin_hydra(run_dir, *ARGS, "pipeline.stages=[merge]", fault="export:1:TERM")
    assert p.returncode == 143, p.stderr[-3000:]
    assert not (run_dir / "child").exists() and not list(run_dir.glob("child.tmp-*"))
    p = darwin_hydra(run_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "child" / "checksums.json").exists()
