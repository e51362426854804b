"""Structured configs: the schema every composed run is validated against.

Each config group has a dataclass here or in its stage's package (merge, mri, zoo); the root
``DarwinConfig`` ties them together and is registered in Hydra's ConfigStore as ``darwin_schema``,
which ``conf/config.yaml`` lists first in its defaults. A misspelt key anywhere is an error at
composition time, before any model is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from darwin_hydra.merge.config import MergeConfig
from darwin_hydra.mri.config import MriConfig, ProbesConfig
from darwin_hydra.zoo.config import ZooConfig


@dataclass
class ParentsConfig:
    """The parent pair. Each of father/mother/base is a local directory, a Hub id or a ``zoo://`` URI."""

    name: str = "zoo_dense"
    father: str = "zoo://dense/father"
    mother: str = "zoo://dense/mother"
    base: Optional[str] = None
    # Hub ids resolve from huggingface_hub's cache; downloading must be asked for.
    allow_download: bool = False
    revision: Optional[str] = None
    # Pickle (.bin) weights are refused unless this is set; then loaded with weights_only=True.
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # dtype the parents are loaded in for scans and search trials (the export keeps the parents' dtype).
    dtype: str = "float32"
    # the probe set the mother is known to be better at (e.g. REASONING): the MRI assigns it to her
    # instead of inferring who owns which set, and the proxy follows her there; None = inferred
    mother_skill: Optional[str] = None


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
    blend_method: str = "linear"
    # MoE: where each block's router (gate) comes from, blocks splitting the layers equally:
    # e.g. [mother, mother, father] is Darwin-35B-A3B-Opus's B,B,A; "merge" follows the ratio map
    router_source: Optional[list[str]] = None
    # MoE: experts dead in the mother's scan and alive in the father's take the father's weights
    # (and the father's router rows for them); dead = the MRI's moe_dead_rule
    revive_dead_experts: bool = False


@dataclass
class OptimizerConfig:
    """Optuna CMA-ES driving both search phases through ask/tell."""

    name: str = "cmaes"
    seed: int = 0
    # phase 1: cheap in-memory proxy on probe prompts
    phase1_trials: int = 60
    proxy: str = "teacher_kl"
    proxy_prompts: int = 16
    # who teaches each probe set: "mri" (the scan's assignment, parents.mother_skill first) or "nll"
    # (the parent with the lower NLL on the prompts); the KL is taken on that many of the teacher's
    # greedy answer tokens (0: on the prompt tokens)
    proxy_teacher: str = "mri"
    proxy_answer_tokens: int = 8
    # phase 2: benchmark (lm-eval, dev split) on the best phase-1 genomes, then further CMA-ES steps
    phase2_top_k: int = 4
    phase2_trials: int = 16
    patience: int = 6
    min_delta: float = 0.002
    popsize: Optional[int] = None
    # where the study lives: null -> sqlite file in the run dir; or any Optuna storage URL
    storage: Optional[str] = None
    study_name: str = "darwin"
    # start CMA-ES from the MRI prescription (true) or from the centre of the bounds (false)
    mri_seeded: bool = True


@dataclass
class BenchmarkConfig:
    """lm-eval tasks: fitness on one split, the report on a disjoint one."""

    name: str = "zoo_skills"
    # directory of task YAMLs (include_path); zoo:// URIs allowed
    include_path: str = "zoo://tasks"
    fitness_tasks: list[str] = field(default_factory=lambda: ["zoo_skills_dev"])
    report_tasks: list[str] = field(default_factory=lambda: ["zoo_skills_test"])
    batch_size: int = 64
    limit: Optional[int] = None
    # bootstrap resamples for paired child-vs-parent intervals in the report
    n_bootstrap: int = 10000
    # refuse to run when fitness and report tasks overlap, unless this is set (issue: honest evaluation)
    allow_fitness_on_report: bool = False


@dataclass
class HealthConfig:
    """Layer-by-layer health check of the child against both parents (probe importance)."""

    # interference: child importance above max(parents) by this factor and this absolute margin
    interference_factor: float = 2.0
    interference_margin: float = 0.02
    # function loss: a parent's importance at least this, the child's below fraction x that parent's
    loss_min_parent: float = 0.02
    loss_fraction: float = 0.2


@dataclass
class LoggerConfig:
    """Weights & Biases tracking. mode: online | offline | disabled."""

    name: str = "wandb"
    enabled: bool = True
    project: str = "darwin-hydra"
    entity: Optional[str] = None
    mode: str = "offline"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


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
    seed: int = 0
    # torch threads for this process (0 = torch's default)
    threads: int = 0
    device: str = "cpu"


def register_configs() -> None:
    """Register the root schema (``darwin_schema``) with Hydra's ConfigStore."""
    ConfigStore.instance().store(name="darwin_schema", node=DarwinConfig)
