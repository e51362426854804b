"""The stage pipeline: a list of stage names in config, each built by ``_target_`` and run in order.

A stage is a small class: its constructor takes the config groups it needs by name (``ScanStage(mri,
probes, parents)``: ``build_stage`` passes ``cfg.mri``, ``cfg.probes``, ``cfg.parents``), ``run(ctx)``
computes its result and ``load(ctx)`` gives back a result this run directory already holds, when it
still verifies (the parents' fingerprints, the child's checksums). Results go into the typed
``RunContext`` (``ctx.scan``, ``ctx.search`` ...); a stage that needs another's result asks
``ctx.require(name)``, which loads it or runs that stage, so a stage run on its own
(``pipeline.stages=[merge]``) finds what it needs.

Resuming (``darwin-hydra hydra.run.dir=RUN_DIR`` on an existing run) is the same loop: a stage whose
saved result verifies is skipped; the others run (the search continues its study).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from darwin_hydra.faults import fault_point

log = logging.getLogger(__name__)


class Stage:
    """Base class of pipeline stages. Subclasses set ``name`` and implement ``run``; ``load`` returns
    this run's saved result of the stage when it still verifies, else None (run it)."""

    name: str = "stage"

    def run(self, ctx: "RunContext") -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def load(self, ctx: "RunContext") -> Any:
        return None


@dataclass
class StageResults:
    """What the stages produced, by stage name (each stage's own result type)."""

    preflight: Any = None
    scan: Any = None  # darwin_hydra.mri.scan.MriResult
    prescribe: Any = None  # darwin_hydra.stages.prescribe.Prescribed
    search: Any = None  # darwin_hydra.stages.search.SearchOutcome
    merge: Any = None  # darwin_hydra.stages.merge.Exported
    health: Any = None  # dict (health.json)
    report: Any = None  # Path of report.md
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class RunContext:
    """Everything a stage needs: the typed config, the run directory, the parents' readers, the
    results of earlier stages and the tracker."""

    def __init__(self, cfg, run_dir: str | Path, tracker=None):
        from darwin_hydra.tracking import NullTracker

        self.cfg = cfg  # darwin_hydra.config.DarwinConfig
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(str(cfg.paths.cache_dir)).expanduser()
        self.results = StageResults()
        self.tracker = tracker or NullTracker()
        self._paths: dict[str, Path | None] = {}
        self._session = None
        self._plan = None

    # ---- locations -------------------------------------------------------------------------
    def resolve(self, uri: str) -> str:
        """Map ``zoo://`` URIs to real paths (building the zoo on first use) and ``builtin://`` to the
        data the package ships (``darwin_hydra/data/``); leave others alone."""
        if isinstance(uri, str) and uri.startswith("zoo://"):
            from darwin_hydra.zoo import resolve_zoo_uri

            return str(resolve_zoo_uri(uri, self.cfg.zoo, self.cache_dir))
        if isinstance(uri, str) and uri.startswith("builtin://"):
            from importlib.resources import files

            return str(files("darwin_hydra") / "data" / uri.removeprefix("builtin://"))
        return uri

    def parent_path(self, role: str) -> Path | None:
        """Local directory of ``father``, ``mother`` or ``base`` (None when base is not given)."""
        if role not in self._paths:
            spec = getattr(self.cfg.parents, role)
            if spec is None:
                self._paths[role] = None
            else:
                from darwin_hydra.io.resolve import resolve_model

                self._paths[role] = resolve_model(
                    str(spec),
                    allow_download=self.cfg.parents.allow_download,
                    revision=self.cfg.parents.revision,
                    zoo_resolver=lambda u: Path(self.resolve(u)),
                )
        return self._paths[role]

    @cached_property
    def readers(self) -> dict:
        """Streaming readers of the parents present (father, mother, and base when given), every one in
        the father's layout: a text-only mother beside a multimodal father (or the reverse) is read with
        her decoder's names mapped onto his (``io.layouts``)."""
        from darwin_hydra.io.layouts import layout_mapping
        from darwin_hydra.io.reader import CheckpointReader

        pickle = self.cfg.parents.allow_pickle
        out = {"father": CheckpointReader(self.parent_path("father"), allow_pickle=pickle)}
        for role in ("mother", "base"):
            path = self.parent_path(role)
            if path is None:
                continue
            reader = CheckpointReader(path, allow_pickle=pickle)
            rename = layout_mapping(out["father"].names, reader.names)
            if rename is not None:
                reader = CheckpointReader(path, allow_pickle=pickle, rename=rename)
                if reader.renamed_from:
                    log.info("the %s's layout differs from the father's (%s vs %s): %d tensor names mapped onto his",
                             role, reader.config.get("architectures"), out["father"].config.get("architectures"),
                             len(reader.renamed_from))
            out[role] = reader
        return out

    @cached_property
    def checked_readers(self) -> dict:
        """``readers`` after the pre-merge compatibility check (headers only), run once. Tensors outside
        the text decoder may be missing from the mother and the base when the child takes them from the
        father (``parents.outside_decoder``)."""
        from darwin_hydra.arch import outside_decoder
        from darwin_hydra.io.compat import check_compatible

        optional = outside_decoder if self.cfg.parents.outside_decoder == "father" else None
        check_compatible(self.readers, optional=optional)
        return self.readers

    @property
    def num_layers(self) -> int:
        from darwin_hydra.arch import num_layers

        return num_layers(self.readers["father"].config)

    @property
    def child_dir(self) -> Path:
        return self.run_dir / self.cfg.export.dir_name

    def torch_dtype(self):
        from darwin_hydra.dtypes import torch_dtype

        return torch_dtype(self.cfg.parents.dtype)

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as JSON into the run directory atomically (temp file, then rename)."""
        from darwin_hydra.io.atomic import write_text_atomic

        return write_text_atomic(self.run_dir / name, json.dumps(obj, indent=2, sort_keys=False))

    # ---- stages and their results ----------------------------------------------------------
    def stage(self, name: str) -> Stage:
        return build_stage(self.cfg, name)

    def require(self, name: str) -> Any:
        """The result of stage ``name`` in this run: already computed, else this run's saved result
        when it verifies, else computed now."""
        result = getattr(self.results, name)
        if result is None:
            stage = self.stage(name)
            result = stage.load(self)
            if result is None:
                result = stage.run(self)
            setattr(self.results, name, result)
        return result

    def breeding_plan(self):
        """The run's ``BreedingPlan`` (genome space, prescription, thresholds, MoE rules, parents):
        what turns a genome into its hash and its recipe."""
        if self._plan is None:
            from darwin_hydra.search.recipe import BreedingPlan, moe_rules

            scan, prescribed = self.require("scan"), self.require("prescribe")
            router_source, revive = moe_rules(self.cfg.genome, scan)
            self._plan = BreedingPlan(
                space=prescribed.space,
                names=tuple(self.readers["father"].names),
                num_layers=self.num_layers,
                r_mri=prescribed.r_mri,
                t_lo=self.cfg.mri.t_lo,
                t_hi=self.cfg.mri.t_hi,
                fingerprints={role: r.fingerprint() for role, r in self.readers.items()},
                router_source=tuple(router_source) if router_source else None,
                revive=revive,
                outside_decoder=str(self.cfg.parents.outside_decoder),
            )
        return self._plan

    def trial_session(self):
        """The in-memory trial model (search trials, the uniform baseline the report scores): one
        per run, built on first use."""
        if self._session is None:
            from darwin_hydra.stages.search import make_session

            self._session = make_session(self)
        return self._session


def build_stage(cfg, name: str) -> Stage:
    """Instantiate stage ``name`` from ``pipeline.registry``, passing each constructor parameter the
    config group of that name (``ScanStage(mri, probes, parents)``)."""
    import inspect

    from hydra.utils import get_class, instantiate

    registry = cfg.pipeline.registry
    if name not in registry:
        raise ValueError(f"stage {name!r} is not in pipeline.registry; known stages: {sorted(registry)}")
    spec = dict(registry[name])
    cls = get_class(spec["_target_"])
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        raise TypeError(f"{spec['_target_']}: a stage's constructor names the config groups it takes (no **kwargs)")
    unknown = [p.name for p in params if not hasattr(cfg, p.name) and p.name not in spec]
    if unknown:
        raise TypeError(f"{spec['_target_']} takes {unknown}, which are not config groups")
    kwargs = {p.name: getattr(cfg, p.name) for p in params if p.name not in spec}
    # the groups arrive as their dataclasses; not recursive: pipeline.registry holds _target_s of its own
    stage = instantiate(spec, **kwargs, _convert_="object", _recursive_=False)
    if not isinstance(stage, Stage):
        raise TypeError(f"pipeline.registry.{name} built {type(stage).__name__}, which is not a darwin_hydra Stage")
    return stage


def run_pipeline(cfg, run_dir: str | Path) -> RunContext:
    """Run the configured stages in order (skipping those whose saved result verifies); return the
    context with every result. ``cfg`` is the typed ``DarwinConfig`` (``config.load_config``)."""
    import torch

    from darwin_hydra.tracking import Tracker

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    stages = [build_stage(cfg, name) for name in cfg.pipeline.stages]  # a bad stage list fails first
    ctx = RunContext(cfg, run_dir)
    try:
        for stage in stages:
            if stage.name != "preflight" and not ctx.tracker.started:  # nothing of W&B before preflight passes
                ctx.tracker = Tracker(cfg, ctx.run_dir)
            t0 = time.perf_counter()
            result = stage.load(ctx)
            if result is not None:
                log.info("stage %s: done earlier in %s, its outputs verify: skipped", stage.name, ctx.run_dir)
                ctx.results.skipped.append(stage.name)
            else:
                log.info("stage %s: start", stage.name)
                fault_point(f"stage:{stage.name}")
                result = stage.run(ctx)
                seconds = time.perf_counter() - t0
                ctx.results.seconds[stage.name] = seconds
                ctx.tracker.log_summary({f"time/{stage.name}_s": seconds})
                log.info("stage %s: done in %.1f s", stage.name, seconds)
            setattr(ctx.results, stage.name, result)
    finally:
        ctx.tracker.finish()
    return ctx
