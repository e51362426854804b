"""Structured configs: the one truth of every option, its type and its default.

Each config group has a dataclass here or in its stage's package (merge, mri, zoo); the root
``DarwinConfig`` ties them together and is registered in Hydra's ConfigStore as ``darwin_schema``,
which ``conf/config.yaml`` lists first in its defaults. The option YAMLs in ``conf/`` hold only what
differs from these defaults.

Two checks, both before any model is touched:

- at composition: a misspelt key (``merge.ratoi=0.3``) or a value outside a choice
  (``merge.method=tis``: the choices are Enums) is an error naming it;
- at the start of a run, ``load_config``: keys added with ``+`` that the schema does not know
  (``+parents.fahter=/x``) are refused, and ``OmegaConf.to_object`` builds the typed config, whose
  ``__post_init__`` checks ranges and relations (bounds, thresholds, budgets) with errors naming the
  option. Everything after that works on the typed ``DarwinConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from darwin_hydra.choices import ChildCandidate, LoggerMode, OutsideDecoder, Proxy, ProxyTeacher, RouterSource
from darwin_hydra.dtypes import Dtype
from darwin_hydra.merge.config import MergeConfig, MergeMethod
from darwin_hydra.mri.config import MriConfig, ProbesConfig
from darwin_hydra.zoo.config import ZooConfig


class ConfigError(ValueError):
    """A config value or key the schema refuses; the message names the option."""


@dataclass
class ParentsConfig:
    """The parent pair. Each of father/mother/base is a local directory, a Hub id or a ``zoo://`` URI."""

    name: str = "local"
    # no default: every parents option names its pair (conf/parents/*.yaml), or the user does
    father: str = MISSING
    mother: str = MISSING
    base: Optional[str] = None
    # Hub ids resolve from huggingface_hub's cache; downloading must be asked for.
    allow_download: bool = False
    revision: Optional[str] = None
    # Pickle (.bin) weights are refused unless this is set; then loaded with weights_only=True.
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # dtype the parents are loaded in for scans and search trials (the export keeps the parents' dtype).
    dtype: Dtype = Dtype.float32
    # the probe set the mother is known to be better at (e.g. REASONING): the MRI assigns it to her
    # instead of inferring who owns which set, and the proxy follows her there; None = inferred
    mother_skill: Optional[str] = None
    # the child's tensors outside the text decoder (vision/audio towers, projectors, MTP heads): the
    # father's whole (default: the mother is a text fine-tune; a text-only mother has none), the
    # mother's, or merged by the same recipe as the decoder
    outside_decoder: OutsideDecoder = OutsideDecoder.father

    def __post_init__(self):
        self.dtype = _choice("parents.dtype", Dtype, self.dtype)
        self.outside_decoder = _choice("parents.outside_decoder", OutsideDecoder, self.outside_decoder)
        for role in ("father", "mother"):
            if not getattr(self, role):
                raise ConfigError(f"parents.{role} is empty: give a local directory, a Hub id or a zoo:// URI")


@dataclass
class GenomeConfig:
    """A genome space: named genes with bounds. See darwin_hydra.search.genome for how a genome
    becomes a ratio map (``genome_to_ratio_map``)."""

    name: str = "darwin_v6"
    # ordered gene names; "block_*" genes split the decoder layers into equal blocks,
    # "layer_*" genes (genome=layerwise) give each layer its own ratio.
    genes: list[str] = field(default_factory=list)
    # gene -> [low, high]; override one with genome.bounds.mri_trust=[0.5,1.0]
    bounds: dict[str, list[float]] = field(default_factory=dict)
    # value a gene takes when it is not in the genome (e.g. V5 has no mri_trust)
    fixed: dict[str, float] = field(default_factory=dict)
    # layerwise: add one gene per layer (and per component when per_component is true)
    layerwise: bool = False
    per_component: bool = False
    # the method the genome's merge_method_weight blends dare_ties with
    blend_method: MergeMethod = MergeMethod.linear
    # MoE: where each block's router (gate) comes from, blocks splitting the layers equally:
    # e.g. [mother, mother, father] is Darwin-35B-A3B-Opus's B,B,A; "merge" follows the ratio map
    router_source: Optional[list[RouterSource]] = None
    # MoE: experts dead in the mother's scan and alive in the father's take the father's weights
    # (and the father's router rows for them); dead = the MRI's moe_dead_rule
    revive_dead_experts: bool = False

    def __post_init__(self):
        self.blend_method = _choice("genome.blend_method", MergeMethod, self.blend_method)
        if self.router_source is not None:
            self.router_source = [_choice("genome.router_source", RouterSource, s) for s in self.router_source]
        self.bounds = {str(k): [float(x) for x in v] for k, v in self.bounds.items()}
        self.fixed = {str(k): float(v) for k, v in self.fixed.items()}
        for gene, b in self.bounds.items():
            if len(b) != 2 or b[0] > b[1]:
                raise ConfigError(f"genome.bounds.{gene}={b}: give [low, high] with low <= high")
        # the layer count is known only with the parents: GenomeSpace.from_config checks the rest


@dataclass
class OptimizerConfig:
    """Optuna CMA-ES driving both search phases through ask/tell."""

    name: str = "cmaes"
    seed: int = 0
    # phase 1: cheap in-memory proxy on probe prompts
    phase1_trials: int = 60
    proxy: Proxy = Proxy.teacher_kl
    proxy_prompts: int = 16
    # who teaches each probe set: "mri" (the scan's assignment, parents.mother_skill first) or "nll"
    # (the parent with the lower NLL on the prompts); the KL is taken on that many of the teacher's
    # greedy answer tokens (0: on the prompt tokens)
    proxy_teacher: ProxyTeacher = ProxyTeacher.mri
    proxy_answer_tokens: int = 8
    # phase 2: benchmark (lm-eval, dev split) on the best phase-1 genomes, then further CMA-ES steps
    phase2_top_k: int = 4
    phase2_trials: int = 16
    patience: int = 6
    min_delta: float = 0.002
    popsize: Optional[int] = None
    # where the study lives: null -> sqlite file in the run dir (one process); or any Optuna storage URL
    # (postgresql+psycopg://user@host/db), shared by the run's coordinator and its workers: `darwin-hydra-worker
    # RUN_DIR` (docs/distributed.md)
    storage: Optional[str] = None
    # on a storage URL: every process records a heartbeat of the trial it runs this often (seconds)
    heartbeat_s: float = 30.0
    # on a storage URL: a trial whose last heartbeat is this old (seconds) was left by a dead worker, and
    # another worker runs its parameters again; null: 4 x heartbeat_s. In the run's own file (no storage
    # URL, one process at a time) every running trial is re-run in place
    stale_after_s: Optional[float] = None
    # on a storage URL: how many processes run trials (the coordinator included): CMA-ES's population is
    # at least this, so that each generation spans every worker
    workers: int = 1
    # on a storage URL: the coordinator runs trials beside the workers (true) or only starts each phase,
    # waits for the workers and reads the study (false)
    coordinator_trials: bool = True
    study_name: str = "darwin"
    # start CMA-ES from the MRI prescription (true) or from the centre of the bounds (false)
    mri_seeded: bool = True
    # phase 1's next trials after the start genome: this many uniform-merge genomes at ratios i/(k+1)
    # (search/genome.py uniform_genome; at most phase1_trials - 1), so the search starts from plain
    # interpolation too where it beats the MRI's prescription (docs/search.md)
    uniform_seeds: int = 4
    # after phase 2, the child is the best of these on the dev split (a tie: the simpler one): the search's
    # best genome, the MRI's own child (one more benchmark evaluation), the best uniform ratio of the baseline.
    # [genome]: the search's genome whatever the baselines score
    child_candidates: list[ChildCandidate] = field(
        default_factory=lambda: [ChildCandidate.genome, ChildCandidate.mri, ChildCandidate.uniform])

    def __post_init__(self):
        self.proxy = _choice("optimizer.proxy", Proxy, self.proxy)
        self.proxy_teacher = _choice("optimizer.proxy_teacher", ProxyTeacher, self.proxy_teacher)
        self.child_candidates = [_choice("optimizer.child_candidates", ChildCandidate, c) for c in self.child_candidates]
        if not self.child_candidates or len(set(self.child_candidates)) < len(self.child_candidates):
            raise ConfigError(f"optimizer.child_candidates={[str(c) for c in self.child_candidates]}: one or more of "
                              "genome, mri, uniform, each once")
        if self.phase2_trials == 0 and ChildCandidate.genome not in self.child_candidates:
            raise ConfigError(
                f"optimizer.child_candidates={[str(c) for c in self.child_candidates]} with optimizer.phase2_trials=0: "
                "the candidates are compared on the benchmark's dev split, which only phase 2 uses; without it the "
                "child is the search's genome (add genome, or give phase 2 trials)")
        for key in ("phase1_trials", "proxy_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"optimizer.{key}={getattr(self, key)} must be >= 1")
        for key in ("phase2_top_k", "phase2_trials", "patience", "proxy_answer_tokens", "uniform_seeds"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optimizer.{key}={getattr(self, key)} must be >= 0")
        if self.popsize is not None and self.popsize < 2:
            raise ConfigError(f"optimizer.popsize={self.popsize}: null (CMA-ES's default) or >= 2")
        if self.workers < 1 or not self.heartbeat_s > 0:
            raise ConfigError(f"optimizer.workers={self.workers} must be >= 1 and optimizer.heartbeat_s="
                              f"{self.heartbeat_s} > 0")
        if self.storage and self.stale_after_s is not None and self.stale_after_s <= self.heartbeat_s:
            raise ConfigError(
                f"optimizer.stale_after_s={self.stale_after_s} must exceed optimizer.heartbeat_s={self.heartbeat_s} "
                "(a live worker's trial would look stale): a few heartbeats, e.g. 4 x heartbeat_s, or null"
            )


@dataclass
class BenchmarkConfig:
    """lm-eval tasks: fitness on one split, the report on a disjoint one."""

    name: str = "zoo_skills"
    # directory of task YAMLs (include_path); zoo:// URIs allowed; null: none (lm_eval_defaults alone)
    include_path: Optional[str] = "zoo://tasks"
    # also index lm-eval's built-in task definitions (arc_challenge, gpqa_diamond_zeroshot, ...) and
    # darwin-hydra's split variants of them (darwin_hydra/evaluate/tasks/, e.g. arc_challenge_validation);
    # their data come from the Hugging Face Hub through `datasets`
    lm_eval_defaults: bool = False
    fitness_tasks: list[str] = field(default_factory=lambda: ["zoo_skills_dev"])
    report_tasks: list[str] = field(default_factory=lambda: ["zoo_skills_test"])
    # the per-item 0/1 score: null = per task (exact_match for generation tasks, else acc_norm when the
    # task lists it, else acc); or acc, acc_norm, exact_match for every task, optionally with the lm-eval
    # filter whose output is scored (default: the task's first): 'benchmark.metric="exact_match,flexible-extract"'
    metric: Optional[str] = None
    # requests per forward pass: a count, or "auto" (lm-eval finds the largest that fits; "auto:N"
    # searches again N times over the run)
    batch_size: Any = 64
    limit: Optional[int] = None
    # bootstrap resamples for paired child-vs-parent intervals in the report
    n_bootstrap: int = 10000
    # refuse to run when fitness and report tasks overlap, unless this is set (issue: honest evaluation)
    allow_fitness_on_report: bool = False

    def __post_init__(self):
        if not self.fitness_tasks or not self.report_tasks:
            raise ConfigError("benchmark.fitness_tasks and benchmark.report_tasks each need at least one task")
        auto = isinstance(self.batch_size, str) and re.fullmatch(r"auto(:\d+)?", self.batch_size)
        if not auto:
            try:
                self.batch_size = int(self.batch_size)
            except (TypeError, ValueError):
                raise ConfigError(f"benchmark.batch_size={self.batch_size!r}: a count >= 1, 'auto' or 'auto:N'") from None
        if (not auto and self.batch_size < 1) or (self.limit is not None and self.limit < 1) or self.n_bootstrap < 100:
            raise ConfigError(f"benchmark: batch_size >= 1, limit null or >= 1, n_bootstrap >= 100 (got "
                              f"{self.batch_size}, {self.limit}, {self.n_bootstrap})")
        if self.include_path is None and not self.lm_eval_defaults:
            raise ConfigError("benchmark.include_path=null finds no tasks: give a directory of task YAMLs or set "
                              "benchmark.lm_eval_defaults=true (lm-eval's own tasks)")
        if self.metric is not None:
            from darwin_hydra.evaluate.benchmark import ITEM_METRICS

            if self.metric.partition(",")[0] not in ITEM_METRICS:
                raise ConfigError(f"benchmark.metric={self.metric!r}: null (per task) or one of {list(ITEM_METRICS)}, "
                                  "optionally with an lm-eval filter (exact_match,flexible-extract)")


@dataclass
class HealthConfig:
    """Layer-by-layer health check of the child against both parents (probe importance)."""

    # interference: child importance above max(parents) by this factor and this absolute margin
    interference_factor: float = 2.0
    interference_margin: float = 0.02
    # function loss: a parent's importance at least this, the child's below fraction x that parent's
    loss_min_parent: float = 0.02
    loss_fraction: float = 0.2

    def __post_init__(self):
        if self.interference_factor < 1 or min(self.interference_margin, self.loss_min_parent) < 0 \
                or not 0 <= self.loss_fraction <= 1:
            raise ConfigError("health: interference_factor >= 1, margins >= 0 and loss_fraction in [0, 1]")


@dataclass
class LoggerConfig:
    """Weights & Biases tracking. mode: online | offline | disabled."""

    name: str = "wandb"
    enabled: bool = True
    project: str = "darwin-hydra"
    entity: Optional[str] = None
    mode: LoggerMode = LoggerMode.offline
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.mode = _choice("logger.mode", LoggerMode, self.mode)


@dataclass
class PathsConfig:
    """Where things go. output_dir is Hydra's run directory."""

    root_dir: str = "."
    output_dir: str = "."
    cache_dir: str = "~/.cache/darwin_hydra"


@dataclass
class PipelineConfig:
    """The stages to run, in order, and how each is built (``_target_`` per stage name)."""

    stages: list[str] = field(default_factory=list)
    registry: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportConfig:
    """The exported child."""

    dir_name: str = "child"
    max_shard_bytes: int = 2_000_000_000
    overwrite: bool = False
    push_to_hub: bool = False
    hub_repo_id: Optional[str] = None
    hub_private: bool = True

    def __post_init__(self):
        if self.push_to_hub and not self.hub_repo_id:
            raise ConfigError("export.push_to_hub=true needs export.hub_repo_id (e.g. me/my-child)")
        if self.max_shard_bytes < 1:
            raise ConfigError(f"export.max_shard_bytes={self.max_shard_bytes} must be >= 1")


@dataclass
class MemoryConfig:
    """Where the models live and what the run may use: the memory plan (``darwin_hydra.memory``) checks
    it in preflight, and ``darwin-hydra 'pipeline.stages=[plan]'`` prints it."""

    # the trial model's and the MRI's placement: null = whole on `device`; auto / balanced / sequential:
    # accelerate spreads the layers over the GPUs within max_memory (a trial writes every parameter in
    # place, so the trial model must fit on them); or {module name: device}
    device_map: Optional[Any] = None
    # per-device limits, e.g. {0: 70GiB, 1: 70GiB, cpu: 100GiB}; a device not named: what it has free
    max_memory: dict[str, str] = field(default_factory=dict)
    # host RAM the run may use; null = MemAvailable (/proc/meminfo) plus what the process already holds
    host_ram: Optional[str] = None
    # a run the plan says cannot fit is refused in preflight (false: it runs, with a warning)
    enforce: bool = True

    def __post_init__(self):
        from darwin_hydra.memory import DEVICE_MAP_CHOICES, max_memory_bytes, parse_bytes

        self.max_memory = {str(k): str(v) for k, v in self.max_memory.items()}
        try:
            max_memory_bytes(self.max_memory)
            if self.host_ram is not None:
                parse_bytes(self.host_ram, "memory.host_ram")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dm = self.device_map
        if dm is not None and not hasattr(dm, "items") and dm not in DEVICE_MAP_CHOICES:
            raise ConfigError(f"memory.device_map={dm!r}: null, one of {list(DEVICE_MAP_CHOICES)}, or {{module: device}}")
        if hasattr(dm, "items"):
            self.device_map = {str(k): str(v) for k, v in dm.items()}


@dataclass
class DarwinConfig:
    parents: ParentsConfig = field(default_factory=ParentsConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    genome: GenomeConfig = field(default_factory=GenomeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    mri: MriConfig = field(default_factory=MriConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    seed: int = 0
    # torch threads for this process (0 = torch's default)
    threads: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads}: 0 (torch's default) or a positive count")
        dev = str(self.device)
        if dev != "cpu" and dev != "cuda" and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ConfigError(f"device={dev!r}: use cpu, cuda or cuda:N")
        if self.parents.mother_skill and self.parents.mother_skill not in self.probes.sets:
            raise ConfigError(
                f"parents.mother_skill={self.parents.mother_skill!r} is not a probe set of probes={self.probes.name} "
                f"({sorted(self.probes.sets)}): choose probes with that set (e.g. probes=darwin_v6 for the Hub "
                f"presets), one of those sets, or parents.mother_skill=null to infer it"
            )


def _choice(option: str, enum: type[StrEnum], value: Any) -> Any:
    """``value`` as a member of ``enum``, or a ConfigError naming the option and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"{option}={value!r} is not one of {[e.value for e in enum]}") from None


# dict options whose keys are the user's (gene names, probe set names): new keys may be added from the
# command line without '+'; their values are checked when the typed config is built
_OPEN_DICTS = ("genome.bounds", "genome.fixed", "probes.sets", "memory.max_memory")


def schema():
    """The root schema as an OmegaConf node, with the user-keyed dicts open for new keys."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(DarwinConfig)
    for key in _OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(node, key), False)
    return node


def register_configs() -> None:
    """Register the root schema (``darwin_schema``) with Hydra's ConfigStore."""
    ConfigStore.instance().store(name="darwin_schema", node=schema())


def unknown_keys(cfg: Any, schema: type | None = None, where: str = "") -> list[str]:
    """Dotted keys of ``cfg`` (a DictConfig) that its dataclass schema does not define: what ``+key=...``
    can add past Hydra's struct check, and what ``OmegaConf.to_object`` would silently drop."""
    import typing

    from omegaconf import DictConfig

    schema = schema or DarwinConfig
    hints = typing.get_type_hints(schema)
    out = []
    for key in cfg.keys():
        if key not in hints:
            out.append(f"{where}{key}")
            continue
        node = cfg._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(node, DictConfig) and not node._is_none():
            out += unknown_keys(node, hints[key], f"{where}{key}.")
    return out


def load_config(cfg: Any) -> "DarwinConfig":
    """The typed run config of a composed ``DictConfig``: unknown keys refused (naming them and the
    nearest known key), values checked by each dataclass's ``__post_init__``. Interpolations are
    resolved here, once."""
    import difflib

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DarwinConfig):
        return cfg
    if OmegaConf.get_type(cfg) is not DarwinConfig:  # a saved config.yaml: plain data, put it on the schema
        try:
            cfg = OmegaConf.merge(schema(), cfg)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}") from None
    bad = unknown_keys(cfg)
    if bad:
        hints = []
        for key in bad:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            near = difflib.get_close_matches(leaf, [k for k in node.keys() if k != leaf], n=1)
            hints.append(f"{key}" + (f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}. `darwin-hydra --cfg job` lists the keys.")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as e:  # a missing mandatory value, an interpolation that fails
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # a dataclass's __post_init__: the message names the option
        raise ConfigError(str(e)) from None


def compose(overrides: list[str] | tuple[str, ...] = (), output_dir: str = ".") -> DarwinConfig:
    """The typed config ``darwin-hydra OVERRIDES`` would run with (for scripts, notebooks and tests):
    composed from the installed ``conf/`` by Hydra's compose API, then ``load_config``."""
    import copy

    return load_config(copy.deepcopy(_composed(tuple(overrides), str(output_dir))))


@functools.lru_cache(maxsize=64)
def _composed(overrides: tuple[str, ...], output_dir: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or another initialize block
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    else:
        with initialize_config_module(config_module="darwin_hydra_conf", version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    cfg.paths.output_dir = output_dir
    return cfg


def plain_config(cfg: "DarwinConfig") -> dict:
    """The typed config as plain JSON-able data (Enums as their strings), for W&B, hashes and records."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
