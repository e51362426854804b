"""Building the zoo: held-out files, then base -> (father, mother) per pair in worker processes, then the
ground truth (which layers and tensors each parent's training changed), scores and expert routing.

``ensure_zoo`` is the entry point: it returns ``<cache_dir>/zoo-<hash>/``, building it first if absent.
A build writes into ``zoo-<hash>.tmp-<pid>/`` and renames it into place when complete, under a file
lock, so a killed build never leaves a finished-looking zoo and two processes never both build.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from darwin_hydra.arch import tensor_info
from darwin_hydra.io.atomic import write_text_atomic
from darwin_hydra.zoo.config import ZOO_FORMAT_VERSION, ZooConfig, as_dict, pair_spec, to_zoo_config, validate, zoo_hash
from darwin_hydra.zoo.score import dead_experts, expert_shares, greedy_correct
from darwin_hydra.zoo.skills import SkillParams, stream_seed, eval_splits, get_skill
from darwin_hydra.zoo.tasks import group_name, task_name, write_probes, write_task_data, write_task_yamls
from darwin_hydra.zoo.tokenizer import char_tokenizer
from darwin_hydra.zoo.train import (
    Encoder,
    TrainJob,
    one_thread,
    portable_numerics_env,
    run_job,
    trainable_layers,
    training_mixture,
)

log = logging.getLogger(__name__)

METADATA = "metadata.json"
ROLES = ("base", "father", "mother")
DEFAULT_CACHE_ENV = "DARWIN_HYDRA_CACHE"


def default_cache_dir() -> Path:
    """``$DARWIN_HYDRA_CACHE`` or ``~/.cache/darwin_hydra``."""
    return Path(os.environ.get(DEFAULT_CACHE_ENV) or Path.home() / ".cache" / "darwin_hydra").expanduser()


def zoo_root(cfg: ZooConfig, cache_dir: str | Path) -> Path:
    """Where the zoo of ``cfg`` lives (built or not): ``<cache_dir>/zoo-<hash>``."""
    return Path(cache_dir).expanduser().resolve() / f"zoo-{zoo_hash(to_zoo_config(cfg))}"


def load_metadata(root: str | Path) -> dict:
    """The zoo's ``metadata.json`` as a dict."""
    path = Path(root) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a built zoo (build it with ensure_zoo)")
    return json.loads(path.read_text())


def ensure_zoo(cfg: ZooConfig, cache_dir: str | Path | None = None) -> Path:
    """The zoo root for ``cfg`` under ``cache_dir`` (default ``default_cache_dir()``), built first if absent.

    Layout: ``metadata.json``; ``<pair>/{base,father,mother}/`` HF checkpoints; ``tasks/`` lm-eval YAML +
    jsonl; ``probes/<CATEGORY>.jsonl``.
    """
    cfg = to_zoo_config(cfg)
    validate(cfg)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cache = cache.resolve()
    h = zoo_hash(cfg)
    root = cache / f"zoo-{h}"
    if (root / METADATA).is_file() and _points_here(root):
        write_task_yamls(root / "tasks", list(cfg.skills))  # tasks added to the code since the build
        return root
    with FileLock(str(cache / f"zoo-{h}.lock")):
        if (root / METADATA).is_file():
            _relocate(root, cfg)
            return root
        if root.exists():  # not ours to trust: no metadata means no finished build
            shutil.rmtree(root)
        for stale in cache.glob(f"zoo-{h}.tmp-*"):
            log.info("removing an unfinished zoo build %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache / f"zoo-{h}.tmp-{os.getpid()}"
        try:
            build_zoo(cfg, tmp, final_root=root)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def resolve_zoo_uri(uri: str, cfg: ZooConfig, cache_dir: str | Path | None = None) -> Path:
    """``zoo://<path under the zoo root>`` -> a real path, building the zoo on first use.

    ``zoo://dense/father``, ``zoo://moe/mother``, ``zoo://tasks``, ``zoo://probes/MATH.jsonl``; any other
    string is returned as a path unchanged.
    """
    prefix = "zoo://"
    if not uri.startswith(prefix):
        return Path(uri).expanduser()
    rel = uri[len(prefix):].strip("/")
    root = ensure_zoo(cfg, cache_dir)
    path = (root / rel).resolve() if rel else root
    if root != path and root not in path.parents:
        raise ValueError(f"{uri}: points outside the zoo root {root}")
    if not path.exists():
        meta = load_metadata(root)
        raise FileNotFoundError(
            f"{uri}: {path} does not exist in the zoo (pairs built: {sorted(meta['pairs'])}; "
            f"members: {list(ROLES)}; also 'tasks', 'probes/<CATEGORY>.jsonl')"
        )
    return path


def _points_here(root: Path) -> bool:
    try:
        return load_metadata(root).get("root") == str(root)
    except (OSError, ValueError):
        return False


def _relocate(root: Path, cfg: ZooConfig) -> None:
    # lm-eval needs absolute data_files paths: a zoo copied or moved elsewhere gets its YAMLs rewritten.
    meta = load_metadata(root)
    if meta.get("root") == str(root):
        return
    log.info("zoo moved from %s to %s: rewriting task YAMLs", meta.get("root"), root)
    write_task_yamls(root / "tasks", list(cfg.skills))
    meta["root"] = str(root)
    _write_json(root / METADATA, meta)


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def skill_params(cfg: ZooConfig) -> SkillParams:
    return SkillParams(
        add_digits=cfg.add_digits,
        string_min_len=cfg.string_min_len,
        string_max_len=cfg.string_max_len,
        kv_pairs=cfg.kv_pairs,
    )


def held_out_splits(cfg: ZooConfig) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """skill -> split (dev, test, probe) -> items, exactly as the build writes them."""
    sizes = {"dev": cfg.dev_items, "test": cfg.test_items, "probe": cfg.probe_items}
    return {s: eval_splits(s, skill_params(cfg), sizes, cfg.seed) for s in cfg.skills}


# ----------------------------------------------------------------------------------------- training


def _upcycled(cfg: ZooConfig, pair: str) -> bool:
    return pair == "moe" and cfg.upcycle_moe


def _jobs(cfg: ZooConfig, out: Path, held: frozenset[str]) -> dict[tuple[str, str], TrainJob]:
    jobs = {}
    for pair in cfg.pairs:
        for role in ROLES:
            train = getattr(cfg, role)
            if role == "base" and _upcycled(cfg, pair):
                train = cfg.moe_base
            jobs[(pair, role)] = TrainJob(
                pair=pair,
                role=role,
                model=pair_spec(cfg, pair),
                train=train,
                skills=list(cfg.skills),
                params=skill_params(cfg),
                held_out=held,
                seed=stream_seed(cfg.seed, "model", pair, role) % (2**31),
                out_dir=str(out / pair / role),
                init_from=None if role == "base" else str(out / pair / train.init),
                upcycle_from=str(out / "dense" / "base") if role == "base" and _upcycled(cfg, pair) else None,
            )
    return jobs


def _ready(cfg: ZooConfig, done: set[tuple[str, str]]) -> list[tuple[str, str]]:
    # A job can start once what it starts from is saved: fine-tunes need their base (a mother with
    # init: father, the father), an upcycled MoE base needs the dense base.
    ready = []
    for pair in cfg.pairs:
        for role in ROLES:
            if (pair, role) in done:
                continue
            if role == "base":
                ok = not _upcycled(cfg, pair) or ("dense", "base") in done
            else:
                ok = (pair, getattr(cfg, role).init) in done
            if ok:
                ready.append((pair, role))
    # Bases first: an MoE base is on the critical path, the dense fine-tunes are not.
    return sorted(ready, key=lambda k: k[1] != "base")


_PROGRESS: "mp.Queue | None" = None


def _init_worker(progress_queue) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue
    torch.set_num_threads(1)


def _worker(job: TrainJob) -> dict:
    pending = [0]

    def tick(n: int) -> None:
        pending[0] += n
        if pending[0] >= 10 and _PROGRESS is not None:
            _PROGRESS.put(pending[0])
            pending[0] = 0

    result = run_job(job, tick)
    if pending[0] and _PROGRESS is not None:
        _PROGRESS.put(pending[0])
    return result


def train_all(cfg: ZooConfig, out: Path, held: frozenset[str]) -> dict[tuple[str, str], dict]:
    """Train every member: the bases first, each pair's father and mother as soon as its base is saved.

    Jobs run in ``max(cfg.workers, 1)`` spawned processes (one torch thread each) started with
    ``PORTABLE_NUMERICS``, so a zoo's weights are the same on every x86-64 machine.
    """
    jobs = _jobs(cfg, out, held)
    total = sum(j.train.steps for j in jobs.values())
    results: dict[tuple[str, str], dict] = {}
    bar = tqdm(total=total, desc=f"zoo {cfg.name}: training", unit="step", dynamic_ncols=True)
    try:
        ctx = mp.get_context("spawn")
        progress = ctx.Queue()
        with portable_numerics_env(), ProcessPoolExecutor(
            max(cfg.workers, 1), mp_context=ctx, initializer=_init_worker, initargs=(progress,)
        ) as pool:
            running: dict[Future, tuple[str, str]] = {}
            while len(results) < len(jobs):
                for key in _ready(cfg, set(results)):
                    if key not in running.values():
                        running[pool.submit(_worker, jobs[key])] = key
                done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(progress, bar)
                for fut in done:
                    key = running.pop(fut)
                    results[key] = fut.result()
                    log.info("trained %s/%s in %.1f s", *key, results[key]["seconds"])
            _drain(progress, bar)
    finally:
        bar.close()
    return results


def _drain(progress, bar) -> None:
    while True:
        try:
            bar.update(progress.get_nowait())
        except queue.Empty:
            return


# ------------------------------------------------------------------------------------ ground truth


def updated_tensors(base_dir: Path, member_dir: Path) -> list[str]:
    """Names (on-disk, canonical) of the tensors that differ between two checkpoints."""
    changed = []
    with safe_open(base_dir / "model.safetensors", "pt") as fb, safe_open(member_dir / "model.safetensors", "pt") as fm:
        for name in sorted(fm.keys()):
            if not torch.equal(fb.get_tensor(name), fm.get_tensor(name)):
                changed.append(name)
    return changed


def _layers_of(names: list[str]) -> list[int]:
    return sorted({i.layer for i in map(tensor_info, names) if i.layer is not None})


def _components_of(names: list[str]) -> list[str]:
    return sorted({tensor_info(n).component for n in names})


def measure_pair(cfg: ZooConfig, root: Path, pair: str, splits: dict) -> dict:
    """Scores on the test split and (MoE) expert routing per member, by the fast in-memory scorer."""
    enc = Encoder(char_tokenizer())
    out: dict = {"scores_test": {}, "experts": {}}
    for role in ROLES:
        model = AutoModelForCausalLM.from_pretrained(root / pair / role, dtype=torch.float32).eval()
        if cfg.score_members:
            acc = {s: float(greedy_correct(model, enc, splits[s]["test"]).mean()) for s in cfg.skills}
            acc["mean"] = float(np.mean([acc[s] for s in cfg.skills]))
            out["scores_test"][role] = acc
        spec = pair_spec(cfg, pair)
        if spec.num_experts:
            per_skill = {}
            for s in cfg.skills:
                shares = expert_shares(model, enc, splits[s]["probe"])
                dead = dead_experts(shares, spec.experts_per_token, cfg.dead_expert_threshold)
                per_skill[s] = {
                    "dead": dead,
                    "dead_share": sum(map(len, dead)) / shares.size,
                    "shares": np.round(shares, 4).tolist(),
                }
            out["experts"][role] = per_skill
    return out


def _expert_summary(cfg: ZooConfig, experts: dict) -> dict:
    # The headline: share of (layer, expert) slots dead on the skills other than the mother's.
    others = [s for s in cfg.skills if s != cfg.mother_skill]
    summary = {}
    for role, per_skill in experts.items():
        summary[role] = {
            "dead_share_other_skills": float(np.mean([per_skill[s]["dead_share"] for s in others])) if others else 0.0,
            "dead_share_mother_skill": per_skill[cfg.mother_skill]["dead_share"],
        }
    return summary


# ------------------------------------------------------------------------------------------- build


def build_zoo(cfg: ZooConfig, out: str | Path, final_root: str | Path | None = None) -> Path:
    """Build the whole zoo of ``cfg`` into ``out`` (which must not exist); ``final_root`` is where it will
    live (task YAMLs point their data files there). ``metadata.json`` is written last."""
    cfg = to_zoo_config(cfg)
    validate(cfg)
    out = Path(out)
    final = Path(final_root or out).resolve()
    out.mkdir(parents=True, exist_ok=False)
    start = time.perf_counter()
    log.info("building zoo %r (hash %s) in %s", cfg.name, zoo_hash(cfg), out)

    splits = held_out_splits(cfg)
    held = frozenset(p for by_split in splits.values() for items in by_split.values() for p, _ in items)
    write_task_data(out / "tasks", splits)
    task_names = write_task_yamls(out / "tasks", list(cfg.skills), data_dir=final / "tasks")
    category_of = {s: get_skill(s).category for s in cfg.skills}
    probe_counts = write_probes(out / "probes", splits, category_of)

    trained = train_all(cfg, out, held)
    train_seconds = time.perf_counter() - start

    pairs = {}
    for pair in tqdm(cfg.pairs, desc=f"zoo {cfg.name}: measuring", dynamic_ncols=True):
        spec = pair_spec(cfg, pair)
        n_layers = spec.num_layers
        members = {}
        for role in ROLES:
            tspec = getattr(cfg, role)
            entry = {
                "path": f"{pair}/{role}",
                **({"upcycled_from": "dense/base"} if role == "base" and _upcycled(cfg, pair) else {}),
                "trained_layers": trainable_layers(tspec.layers, n_layers),
                "train_skills": list(mixture := training_mixture(tspec, list(cfg.skills))),
                "train_mixture": mixture,
                "train": {k: v for k, v in trained[(pair, role)].items() if k not in ("pair", "role")},
            }
            if role != "base":
                # "updated": against the base, the common ancestor; a member started from another one
                # (init) also records what its own training changed there.
                names = updated_tensors(out / pair / "base", out / pair / role)
                entry["init"] = tspec.init
                entry["updated_layers"] = _layers_of(names)
                entry["updated_components"] = _components_of(names)
                entry["updated_tensors"] = names
                if tspec.init != "base":
                    own = updated_tensors(out / pair / tspec.init, out / pair / role)
                    entry["updated_vs_init_layers"] = _layers_of(own)
                    entry["updated_vs_init_tensors"] = own
            members[role] = entry
        members["mother"]["specialised_skill"] = cfg.mother_skill
        with one_thread():
            measured = measure_pair(cfg, out, pair, splits)
        for role in ROLES:
            if role in measured["scores_test"]:
                members[role]["scores_test"] = measured["scores_test"][role]
        pairs[pair] = {
            "arch": spec.arch,
            "num_layers": n_layers,
            "num_experts": spec.num_experts,
            "experts_per_token": spec.experts_per_token,
            "members": members,
            # Ground truth for the MRI: where each parent's change lives.
            "ground_truth": {
                "mother_skill": cfg.mother_skill,
                "mother_category": category_of[cfg.mother_skill],
                "mother_layers": members["mother"]["updated_layers"],
                "father_layers": members["father"]["updated_layers"],
                "father_skills": members["father"]["train_skills"],
            },
        }
        if measured["experts"]:
            pairs[pair]["experts"] = {
                "dead_threshold": f"share < {cfg.dead_expert_threshold} * k/E",
                "summary": _expert_summary(cfg, measured["experts"]),
                "per_member": measured["experts"],
            }

    meta = {
        "format": ZOO_FORMAT_VERSION,
        "name": cfg.name,
        "hash": zoo_hash(cfg),
        "root": str(final),
        "config": as_dict(cfg),
        "skills": {s: {"category": category_of[s], "description": get_skill(s).description} for s in cfg.skills},
        "skill_to_category": category_of,
        "mother_skill": cfg.mother_skill,
        "tasks": {
            "include_path": "tasks",
            "dev": [task_name(s, "dev") for s in cfg.skills],
            "test": [task_name(s, "test") for s in cfg.skills],
            "groups": {"dev": group_name("dev"), "test": group_name("test")},
            "items": {"dev": cfg.dev_items, "test": cfg.test_items},
            "all": task_names,
        },
        "probes": {cat: {"path": f"probes/{cat}.jsonl", "n": n, "answers": False} for cat, n in probe_counts.items()},
        "pairs": pairs,
        "seconds": {"train": round(train_seconds, 1), "total": round(time.perf_counter() - start, 1)},
    }
    _write_json(out / METADATA, meta)
    log.info("zoo %r built in %.1f s", cfg.name, time.perf_counter() - start)
    return out


def with_overrides(cfg: ZooConfig, **changes) -> ZooConfig:
    """A copy of ``cfg`` with top-level fields replaced (a convenience for scripts and tests)."""
    return replace(cfg, **changes)
