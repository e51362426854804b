"""Config composition: every option of every group composes against the schema; typos are errors
that name the key; the installed command prints the composed config from any directory."""

import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from darwin_hydra.config import register_configs
from darwin_hydra.testing import console_script

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("__"))


def _compose(overrides):
    register_configs()
    with initialize_config_module(config_module="darwin_hydra_conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def options():
    for group in GROUPS:
        for f in sorted((CONF / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group,option", list(options()))
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "parents" and option == "local":
        overrides += ["parents.father=/tmp/a", "parents.mother=/tmp/b"]
    cfg = _compose(overrides)
    # everything but Hydra's own runtime interpolations resolves
    cfg.paths.output_dir = "/tmp/run"
    OmegaConf.to_container(cfg, resolve=True)


def test_every_stage_target_builds_from_the_composed_config():
    """Every ``_target_`` of pipeline.registry instantiates, taking its config groups by name."""
    from darwin_hydra.config import compose
    from darwin_hydra.pipeline import Stage, build_stage

    cfg = compose([])
    # every registered stage runs in the full pipeline but plan, which runs alone (preflight plans too)
    assert set(cfg.pipeline.stages) == set(cfg.pipeline.registry) - {"plan"}
    for name in cfg.pipeline.registry:
        stage = build_stage(cfg, name)
        assert isinstance(stage, Stage) and stage.name == name
        for group, value in vars(stage).items():  # each constructor argument is its typed config group
            if hasattr(cfg, group):
                assert value == getattr(cfg, group), (name, group)


def test_misspelt_key_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException, match="ratoi"):
        _compose(["merge.ratoi=0.5"])
    with pytest.raises(ConfigCompositionException, match="phase1_trialz"):
        _compose(["optimizer.phase1_trialz=3"])


def test_unknown_group_option_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException, match="gemma9"):
        _compose(["parents=gemma9"])


def test_bounds_override_narrows_one_gene():
    cfg = _compose(["genome.bounds.mri_trust=[0.5,1.0]"])
    assert list(cfg.genome.bounds.mri_trust) == [0.5, 1.0]
    assert list(cfg.genome.bounds.global_ratio) == [0.0, 1.0]


def test_revive_gain_overrides_compose_and_are_checked():
    from darwin_hydra.search.genome import GenomeSpace

    cfg = _compose(["parents=zoo_moe", "genome.revive_dead_experts=true", "+genome.bounds.revive_gain=[0.0,0.5]"])
    assert GenomeSpace.from_config(cfg.genome, 8).bounds["revive_gain"] == (0.0, 0.5)
    cfg = _compose(["parents=zoo_moe", "genome.revive_dead_experts=true", "+genome.fixed.revive_gain=0"])
    assert "revive_gain" not in GenomeSpace.from_config(cfg.genome, 8).genes
    cfg = _compose(["genome.revive_dead_experts=true", "+genome.fixed.revive_gain=2"])
    with pytest.raises(ValueError, match=r"genome.fixed.revive_gain=2.0 must lie in \[0, 1\]"):
        GenomeSpace.from_config(cfg.genome, 8)
    cfg = _compose(["+genome.bounds.revive_gain=[0.0,0.5]"])
    with pytest.raises(ValueError, match="only with genome.revive_dead_experts=true"):
        GenomeSpace.from_config(cfg.genome, 8)


def test_cli_prints_composed_config_from_any_directory(tmp_path):
    cmd = console_script("darwin-hydra")
    p = subprocess.run(cmd + ["--cfg", "job", "parents=gemma4_31b"], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, HYDRA_FULL_ERROR="0"))
    assert p.returncode == 0, p.stderr
    assert "google/gemma-4-31B-it" in p.stdout and "TeichAI/gemma-4-31B-it-Claude-Opus-Distill" in p.stdout
    p = subprocess.run(cmd + ["--cfg", "job", "parents=nope"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode != 0 and "nope" in p.stderr


def test_mother_skill_outside_the_probe_sets_is_refused_before_any_work(tmp_path):
    # The Hub presets name the mother's skill (REASONING); with the zoo's probes the run must say so at
    # once, not after scanning both parents (or, here, before it even looks for their weights).
    p = subprocess.run(console_script("darwin-hydra") + ["parents=gemma4_31b", "pipeline.stages=[scan]", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert p.returncode != 0
    assert "parents.mother_skill='REASONING' is not a probe set of probes=zoo" in p.stderr
    assert "probes=darwin_v6" in p.stderr
    assert not (tmp_path / "run" / "scan" / "scan.json").exists()


def test_every_subpackage_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((CONF.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    pkgs = {
        ".".join(p.parent.relative_to(CONF.parent).parts)
        for p in (CONF.parent / "darwin_hydra").rglob("__init__.py")
    }
    assert pkgs <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(pkgs - listed)}"


def test_cli_main_leaves_the_garbage_collector_on_even_when_the_app_fails(monkeypatch):
    """``main`` turns the collector off for start-up and freezes what is loaded; a caller in the same
    process (tests, notebooks) must get it back on, whether the app returns or raises."""
    import gc

    from darwin_hydra import cli

    seen = []
    monkeypatch.setattr(cli, "_app", lambda: seen.append(gc.isenabled()))
    cli.main()

    def boom():
        seen.append(gc.isenabled())
        raise RuntimeError("app failed")

    monkeypatch.setattr(cli, "_app", boom)
    with pytest.raises(RuntimeError, match="app failed"):
        cli.main()
    assert seen == [False, False]
    assert gc.isenabled()
    monkeypatch.setattr(cli, "_app", lambda: seen.append(gc.isenabled()))
    gc.disable()  # a caller that had it off keeps it off
    try:
        cli.main()
        assert not gc.isenabled()
    finally:
        gc.enable()
