"""The two-phase CMA-ES loop on a synthetic fitness: convergence, determinism, early stop, resume after SIGKILL."""

import subprocess
import sys
import textwrap

import optuna
import pytest
from darwin_hydra.config import compose

from darwin_hydra.search.genome import GenomeSpace
from darwin_hydra.search.loop import search

TARGET = {"global_ratio": 0.7, "attn_ratio": 0.3, "ffn_ratio": 0.6, "embed_ratio": 0.5, "density_a": 0.9, "density_b": 0.8}


def space():
    return GenomeSpace.from_config(compose(["genome=darwin_v5"]).genome, 4)


def sphere(genes):
    return -sum((genes[g] - TARGET[g]) ** 2 for g in TARGET)


def run(tmp_path, name="s", seed=0, **kw):
    sp = space()
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = dict(phase1_trials=30, phase2_top_k=3, phase2_trials=12, patience=100, min_delta=0.0)
    args.update(kw)
    return search(sp, sp.centre(), sphere, sphere, storage=f"sqlite:///{tmp_path}/study.db", study_name=name, seed=seed, **args)


def test_search_improves_on_start_and_phase2_uses_budget(tmp_path):
    res = run(tmp_path)
    start = sphere(space().centre())
    assert res.best_value > start
    assert res.best_phase == 2 and res.benchmark_evaluations == 12
    assert res.history[0].genes == pytest.approx(space().centre())  # the start genome is trial 0


def test_same_seed_same_best_genome(tmp_path):
    a = run(tmp_path / "a", seed=3)
    b = run(tmp_path / "b", seed=3)
    assert a.best_genes == b.best_genes and a.best_value == b.best_value


def test_early_stop_with_patience(tmp_path):
    res = search(space(), space().centre(), sphere, lambda g: 1.0, storage=f"sqlite:///{tmp_path}/s.db",
                 study_name="flat", seed=0, phase1_trials=5, phase2_top_k=2, phase2_trials=50, patience=3, min_delta=0.0)
    assert res.stopped_early and res.benchmark_evaluations == 4  # first trial sets best, then 3 without gain


def test_resuming_a_study_of_another_genome_space_names_the_missing_gene(tmp_path):
    run(tmp_path, phase1_trials=3, phase2_trials=0)
    cfg = compose(["genome=darwin_v5"]).genome
    cfg.revive_dead_experts = True  # the same space plus revive_gain
    sp = GenomeSpace.from_config(cfg, 4)
    with pytest.raises(ValueError, match=r"no value for gene\(s\) \['revive_gain'\]"):
        search(sp, sp.centre(), sphere, sphere, storage=f"sqlite:///{tmp_path}/study.db", study_name="s", seed=0,
               phase1_trials=5, phase2_top_k=1, phase2_trials=0, patience=100, min_delta=0.0)


def test_resume_after_sigkill_reruns_the_killed_trial_in_place_and_matches_an_unkilled_search(tmp_path):
    """SIGKILL inside a trial (its parameters asked, its value not told), then resume: no finished trial is
    evaluated again, the killed trial is re-run under its own number with its own parameters, and the
    study ends exactly as a search that was never killed (same parameters, trial by trial)."""
    script = textwrap.dedent("""
        import os, signal, sys
        from darwin_hydra.config import compose
        from darwin_hydra.search.genome import GenomeSpace
        from darwin_hydra.search.loop import search
        sp = GenomeSpace.from_config(compose(["genome=darwin_v5"]).genome, 4)
        calls = 0
        def fit(g):
            global calls
            calls += 1
            if calls == 8 and sys.argv[1] == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            return -sum((g[k] - 0.3) ** 2 for k in g if k in sp.genes)
        res = search(sp, sp.centre(), fit, fit, storage=f"sqlite:///{sys.argv[2]}", study_name="k", seed=0,
                     phase1_trials=12, phase2_top_k=2, phase2_trials=6, patience=50, min_delta=0.0)
        print("CALLS", calls)
    """)
    db, ref = tmp_path / "study.db", tmp_path / "reference.db"
    p = subprocess.run([sys.executable, "-c", script, "die", str(db)], capture_output=True, text=True)
    assert p.returncode == -9
    study = optuna.load_study(study_name="k-phase1", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.COMPLETE) == 7
    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1 and running[0].number == 7
    killed_params = running[0].params

    p = subprocess.run([sys.executable, "-c", script, "live", str(db)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "CALLS 11" in p.stdout  # 12 - 7 phase-1 trials, then 6 of phase 2: no finished trial evaluated again
    p = subprocess.run([sys.executable, "-c", script, "live", str(ref)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    for phase in ("k-phase1", "k-phase2"):
        resumed = optuna.load_study(study_name=phase, storage=f"sqlite:///{db}").trials
        never_killed = optuna.load_study(study_name=phase, storage=f"sqlite:///{ref}").trials
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in resumed)
        assert [t.params for t in resumed] == [t.params for t in never_killed], phase
    assert optuna.load_study(study_name="k-phase1", storage=f"sqlite:///{db}").trials[7].params == killed_params


def test_uniform_seeds_follow_the_start_genome_in_phase_one(tmp_path):
    from darwin_hydra.search.genome import uniform_genome

    sp = space()
    res = run(tmp_path, phase1_trials=8, phase2_trials=0, uniform_seeds=3)
    phase1 = [h for h in res.history if h.phase == 1]
    assert phase1[0].genes == pytest.approx(sp.centre())
    for h, r in zip(phase1[1:4], (0.25, 0.5, 0.75)):
        assert h.genes == pytest.approx(uniform_genome(sp, sp.centre(), r), abs=1e-9)
    assert len(phase1) == 8  # the seeds count in phase 1's budget
