"""Every knob of the zoo build, as data: ``conf/zoo/*.yaml`` carry exactly these fields.

The zoo is a family of small causal LMs trained here on CPU: per pair (``dense``, ``moe``) a ``base``
trained on a mixture of the skills, then a ``father`` and a ``mother`` fine-tuned from it (the default:
on disjoint decoder layers, so that where each parent's change lives is known; the zoo families of
issue 18 fine-tune every layer, or start the mother from the father, see docs/zoo.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bump when a change to the builder changes what a given config produces: it is part of the cache hash.
# 3: members trained with portable numerics (zoo/train.py PORTABLE_NUMERICS), the same on every x86-64 CPU.
ZOO_FORMAT_VERSION = 3

# Fields that do not change the built zoo (how the work is spread, not what it computes).
_NOT_HASHED = ("workers",)

LAYER_SPANS = ("all", "lower", "upper")

# What a fine-tune starts from (``TrainSpec.init``): the pair's base, or (the mother only) the father.
INIT_SOURCES = ("base", "father")

# Fields added since format 2, left out of the hash while they hold the value that reproduces the
# builds made before them: those zoos keep their hashes (and caches); setting one is a new zoo.
_TRAIN_SPEC_ADDED = {"init": "base"}
_TRAIN_SPECS = ("base", "moe_base", "father", "mother")


@dataclass
class ModelSpec:
    """Architecture of one pair. ``arch``: ``llama`` (dense), ``qwen2_moe`` (routed experts + shared
    expert, Qwen-MoE style) or ``mixtral``. ``intermediate_size`` is the FFN width of a dense layer or
    of one routed expert."""

    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    num_experts: int = 0
    experts_per_token: int = 2
    shared_expert_size: int = 0
    router_aux_loss_coef: float = 0.0


@dataclass
class TrainSpec:
    """One training run of a zoo member.

    ``layers``: which decoder layers it updates (``all``, ``lower`` half, ``upper`` half; embeddings,
    LM head and final norm are frozen unless ``all``). ``skills``: skill -> relative sampling weight
    of its training items (empty: every zoo skill, equal weights); a small weight on a skill the
    member is not about is the general data a real fine-tune keeps mixing in.
    ``carry_out``: false withholds the additions whose sum needs a new leading digit (47+89=136): a
    member trained so never learns that carry, which caps its addition near 50% whatever its length
    of training; the mother's fine-tune teaches it.
    ``router_aux_loss``: keep the MoE load-balancing loss on (the base) or off (a specialising
    fine-tune, which lets routing concentrate on few experts); ``router_lr_scale`` multiplies the
    learning rate of the MoE routers.
    ``keep`` / ``keep_weight``: a fine-tune that keeps what it is not about (feature distillation, as
    in continual learning): each step also draws ``keep_batch_size`` items of the ``keep`` skills
    (skill -> weight) and adds ``keep_weight`` times the mean squared distance, relative to the
    reference's mean square, between the member's hidden state where its trained span ends and the
    starting checkpoint's (frozen) on those items. A ``lower`` member then changes what its upper
    layers read only where its own skill needs it. Off when ``keep_weight`` is 0.
    ``init``: the checkpoint a fine-tune starts from, ``base`` (the pair's base) or, for the mother,
    ``father``: a full fine-tune of the father (Darwin's case: the mother is a distill of the father),
    trained once he is saved; her ``keep`` reference is then the father.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    layers: str = "all"
    skills: dict[str, float] = field(default_factory=dict)
    carry_out: bool = True
    router_aux_loss: bool = True
    router_lr_scale: float = 1.0
    keep: dict[str, float] = field(default_factory=dict)
    keep_weight: float = 0.0
    keep_batch_size: int = 32
    init: str = "base"


@dataclass
class ZooConfig:
    """All build knobs of the zoo. Two configs with the same ``zoo_hash`` build bit-identical zoos."""

    name: str = "default"
    seed: int = 0
    # Skills (see darwin_hydra.zoo.skills.SKILLS); the mother specialises in ``mother_skill``.
    skills: list[str] = field(default_factory=lambda: ["add", "rev", "sort", "map"])
    mother_skill: str = "add"
    add_digits: int = 2
    string_min_len: int = 3
    string_max_len: int = 6
    kv_pairs: int = 4
    # Held-out items per skill: dev (search fitness), test (reports), probe (MRI prompts, no answers).
    dev_items: int = 400
    test_items: int = 400
    probe_items: int = 64
    # Pairs to build and their architectures.
    pairs: list[str] = field(default_factory=lambda: ["dense", "moe"])
    dense: ModelSpec = field(default_factory=ModelSpec)
    moe: ModelSpec = field(
        default_factory=lambda: ModelSpec(
            arch="qwen2_moe", intermediate_size=192, num_experts=8, experts_per_token=2,
            shared_expert_size=64, router_aux_loss_coef=0.05,
        )
    )
    # The MoE base starts as the dense base upcycled (every expert a copy of the dense FFN), then trains
    # with the ``moe_base`` recipe (experts diverge, the router learns to balance); false trains it from
    # scratch with the ``base`` recipe, like the dense base.
    upcycle_moe: bool = True
    # Training of each member (shared by the pairs).
    # The base: competent at map and sort, at add only without the carry out of the top digit (it never
    # sees 47+89=136: about half the sums), which the mother's fine-tune then teaches, and never taught rev,
    # which the father's fine-tune teaches. (A base taught a little rev, weight 0.2, learnt it to 12%,
    # 35% or 96% on the test split as the last bits of the arithmetic changed: whether the father then
    # had anything to add was chance. Untaught, it scores 0 on every seed tried.)
    base: TrainSpec = field(
        default_factory=lambda: TrainSpec(
            steps=1250, lr=5e-3, warmup_steps=100,
            skills={"add": 1.0, "rev": 0.0, "sort": 0.5, "map": 1.0}, carry_out=False,
        )
    )
    # The upcycled MoE base's further training: gentle and without rev, so that the MoE pair starts,
    # like the dense one, with room for the father on rev (an MoE trained on rev learns it fully).
    moe_base: TrainSpec = field(
        default_factory=lambda: TrainSpec(
            steps=400, lr=1e-3, warmup_steps=100, skills={"add": 1.0, "sort": 0.5, "map": 1.0}, carry_out=False,
        )
    )
    # The father: the broad model, better at rev (and sort), upper half of the layers; he keeps the
    # base's behaviour on add (feature distillation), so his upper layers still read an adder's lower ones.
    father: TrainSpec = field(
        default_factory=lambda: TrainSpec(
            steps=600, lr=2e-3, layers="upper", skills={"rev": 1.0, "sort": 0.2, "map": 0.2},
            keep={"add": 1.0}, keep_weight=3.0,
        )
    )
    # The mother: add with carries, lower half, with a little general data; she keeps what her lower
    # layers hand on for sort and map (and, partly, rev: keep weight 0.3), so her lower layers stay
    # readable by the father's upper ones. In the MoE pair her routers learn 20x faster and without the
    # balancing loss: routing concentrates and some experts die.
    mother: TrainSpec = field(
        default_factory=lambda: TrainSpec(
            steps=300, lr=2e-3, layers="lower", skills={"add": 1.0, "sort": 0.3, "map": 0.15},
            keep={"rev": 0.3, "sort": 1.0, "map": 1.0}, keep_weight=3.0, router_aux_loss=False,
            router_lr_scale=20.0,
        )
    )
    # An expert is dead on a skill when its routing share is below this fraction of the uniform share k/E.
    dead_expert_threshold: float = 0.1
    # Score every member on the test split at build time and record it in metadata.json.
    score_members: bool = True
    # Parallel training processes (one torch thread each; 0 or 1: one process).
    workers: int = 2


def pair_spec(cfg: ZooConfig, pair: str) -> ModelSpec:
    """The architecture of ``pair`` (``dense`` or ``moe``)."""
    if pair not in ("dense", "moe"):
        raise ValueError(f"zoo pair {pair!r} is not one of 'dense', 'moe'")
    return getattr(cfg, pair)


def validate(cfg: ZooConfig) -> None:
    """Raise ``ValueError`` naming the option at fault, before any training starts."""
    from darwin_hydra.zoo.skills import SKILLS

    for s in cfg.skills:
        if s not in SKILLS:
            raise ValueError(f"zoo.skills: unknown skill {s!r}; known skills: {sorted(SKILLS)}")
    if len(set(cfg.skills)) != len(cfg.skills):
        raise ValueError(f"zoo.skills lists a skill twice: {cfg.skills}")
    if cfg.mother_skill not in cfg.skills:
        raise ValueError(f"zoo.mother_skill {cfg.mother_skill!r} is not in zoo.skills {cfg.skills}")
    for role in ("base", "moe_base", "father", "mother"):
        spec: TrainSpec = getattr(cfg, role)
        if spec.layers not in LAYER_SPANS:
            raise ValueError(f"zoo.{role}.layers={spec.layers!r}; choose one of {LAYER_SPANS}")
        for key in ("skills", "keep"):  # skill -> weight mixtures
            mix = getattr(spec, key)
            for s in mix:
                if s not in cfg.skills:
                    raise ValueError(f"zoo.{role}.{key}: {s!r} is not in zoo.skills {cfg.skills}")
            if any(w < 0 for w in mix.values()) or (mix and sum(mix.values()) <= 0):
                raise ValueError(f"zoo.{role}.{key}={dict(mix)}: weights must be >= 0 with a positive sum")
        if spec.steps < 1 or spec.batch_size < 1:
            raise ValueError(f"zoo.{role}: steps and batch_size must be >= 1")
        if spec.keep_weight < 0 or (spec.keep_weight > 0 and (not spec.keep or spec.keep_batch_size < 1)):
            raise ValueError(
                f"zoo.{role}: keep_weight={spec.keep_weight} needs keep_weight >= 0, and when > 0 a non-empty "
                f"keep mixture and keep_batch_size >= 1"
            )
        if spec.keep_weight > 0 and role in ("base", "moe_base"):
            raise ValueError(f"zoo.{role}.keep_weight: only a fine-tune (father, mother) keeps a starting checkpoint")
        allowed = INIT_SOURCES if role == "mother" else ("base",)
        if spec.init not in allowed:
            raise ValueError(
                f"zoo.{role}.init={spec.init!r}: choose one of {allowed}"
                + (" (only the mother can start from another member, the father)" if role != "mother" else "")
            )
    if not cfg.pairs or any(p not in ("dense", "moe") for p in cfg.pairs):
        raise ValueError(f"zoo.pairs={cfg.pairs}: list one or both of 'dense', 'moe'")
    for pair in cfg.pairs:
        spec = pair_spec(cfg, pair)
        if spec.num_layers < 2:
            raise ValueError(f"zoo.{pair}.num_layers must be >= 2 (father and mother take a half each)")
        if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"zoo.{pair}: hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if pair == "moe" and (spec.num_experts < 2 or spec.experts_per_token > spec.num_experts):
            raise ValueError("zoo.moe: needs num_experts >= 2 and experts_per_token <= num_experts")
    if cfg.upcycle_moe and "moe" in cfg.pairs:
        if "dense" not in cfg.pairs:
            raise ValueError("zoo.upcycle_moe needs the dense pair (its base is upcycled); add 'dense' to zoo.pairs")
        d, m = cfg.dense, cfg.moe
        same = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        diff = [k for k in same if getattr(d, k) != getattr(m, k)]
        if diff or m.arch != "qwen2_moe":
            raise ValueError(
                f"zoo.upcycle_moe: the MoE must be qwen2_moe with the dense shape; zoo.moe differs in {diff or ['arch']}"
            )
    if min(cfg.dev_items, cfg.test_items, cfg.probe_items) < 1:
        raise ValueError("zoo.dev_items, zoo.test_items and zoo.probe_items must be >= 1")
    if cfg.string_min_len < 1 or cfg.string_max_len < cfg.string_min_len:
        raise ValueError("zoo.string_min_len must be >= 1 and <= zoo.string_max_len")


def as_dict(cfg: ZooConfig) -> dict:
    """The config as plain data (also accepts an OmegaConf node built from the dataclass)."""
    if isinstance(cfg, ZooConfig):
        return asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_zoo_config(cfg) -> ZooConfig:
    """A ``ZooConfig`` from a ``ZooConfig``, an OmegaConf node or a plain dict (unknown keys are an error)."""
    if isinstance(cfg, ZooConfig):
        return cfg
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ZooConfig)
    merged = OmegaConf.merge(schema, cfg if not isinstance(cfg, dict) else OmegaConf.create(cfg))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def zoo_hash(cfg: ZooConfig) -> str:
    """12 hex digits of sha256 over the canonical JSON of the config (minus ``workers``, and minus the fields
    added since format 2 while they hold their default) and the format version."""
    data = {k: v for k, v in as_dict(cfg).items() if k not in _NOT_HASHED}
    for role in _TRAIN_SPECS:
        data[role] = {k: v for k, v in data[role].items() if _TRAIN_SPEC_ADDED.get(k, object()) != v}
    blob = json.dumps({"format": ZOO_FORMAT_VERSION, "config": data}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_zoo_config(name_or_path: str = "default", overrides: list[str] | None = None) -> ZooConfig:
    """A ``ZooConfig`` from ``conf/zoo/<name>.yaml`` (``default``, ``tiny``, ``full``, ...) or a YAML path, with optional
    dotted ``key=value`` overrides (``base.steps=200``). Unknown keys raise an error naming them."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    path = Path(name_or_path)
    options = Path(str(files("darwin_hydra_conf") / "zoo"))
    if not path.suffix:
        path = options / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in options.glob("*.yaml"))
        raise FileNotFoundError(f"zoo config {name_or_path!r}: {path} does not exist (the options: {names})")
    node = OmegaConf.merge(OmegaConf.structured(ZooConfig), OmegaConf.load(path))
    if overrides:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(node)  # type: ignore[return-value]
