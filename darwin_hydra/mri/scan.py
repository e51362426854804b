"""The whole Model MRI of a parent pair: static, probe and MoE scans, the prescription, the cache,
``scan.json`` and the charts. ``run_scan`` is what the scan stage calls; it returns an ``MriResult``
(``mri/result.py``).

The cache holds the expensive part (static, probe and MoE scans of both parents) under a key made of
both parents' fingerprints, the probe sets (config and the prompts' text) and the MRI settings that
change a scan (histogram bins, probe reduction, MoE options, dtype). The prescription is recomputed
from the cached scans on every call (it takes milliseconds), so changing alpha, sharpening or
transplant thresholds never rescans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from darwin_hydra.arch import is_moe
from darwin_hydra.io.atomic import write_text_atomic
from darwin_hydra.models import load_model, load_tokenizer  # noqa: F401 - the stages' loaders
from darwin_hydra.faults import fault_point
from darwin_hydra.mri.config import MriConfig, ProbesConfig
from darwin_hydra.mri.moe import MoeScan, moe_scan
from darwin_hydra.mri.prescribe import prescribe
from darwin_hydra.mri.probes import ProbeScan, layer_importance, load_probe_prompts
from darwin_hydra.mri.result import CACHE_FORMAT, SCAN_JSON, MriResult
from darwin_hydra.mri.static import StaticScan, static_scan

log = logging.getLogger(__name__)


# scans actually computed in this process (tests check a cache hit does not add to it)
SCANS_RUN = {"static": 0, "probe": 0, "moe": 0}


# --------------------------------------------------------------------------------------------------
# reading checkpoints


def open_reader(path: str | Path, layout: str | Path | None = None):
    """The I/O layer's streaming reader of a checkpoint (``.names``, ``.get``, ``.fingerprint``), its
    names in the layout of the checkpoint at ``layout`` when the two differ (a text-only causal LM
    beside a multimodal wrapper: ``io.layouts``)."""
    from darwin_hydra.io.layouts import layout_mapping
    from darwin_hydra.io.reader import CheckpointReader

    reader = CheckpointReader(path)
    if layout is not None and Path(layout) != Path(path):
        rename = layout_mapping(CheckpointReader(layout).names, reader.names)
        if rename is not None:
            reader = CheckpointReader(path, rename=rename)
    return reader




# --------------------------------------------------------------------------------------------------
# the scan


def _probes_record(cfg: ProbesConfig) -> dict:
    return {
        "name": cfg.name,
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "sets": {k: asdict(v) for k, v in cfg.sets.items()},
    }


def scan_settings(cfg: MriConfig) -> dict:
    """The MRI settings that change a scan (and so are part of the cache key)."""
    keys = ("hist_bins", "probe_reduce", "delta_probe", "moe", "moe_dead_rule", "moe_dead_threshold",
            "moe_dead_abs_threshold", "moe_calibration", "dtype")
    return {k: getattr(cfg, k) for k in keys}


def cache_key(
    fp_father: str,
    fp_mother: str,
    probes: ProbesConfig,
    prompts: Mapping[str, list[str]],
    cfg: MriConfig,
    fp_base: str | None = None,
) -> str:
    """sha256 (24 hex) of the parents' (and the delta probe's base's) fingerprints, the probe sets
    (sources and sizes, not weights), the prompts' text and the scan settings."""
    rec = _probes_record(probes)
    for s in rec["sets"].values():
        s.pop("weight")  # weights only enter the prescription
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "father": fp_father,
            "mother": fp_mother,
            "base": fp_base,
            "probes": rec,
            "prompts": hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest(),
            "mri": scan_settings(cfg),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def calibration_prompts(prompts: Mapping[str, list[str]], n: int) -> list[str]:
    """Up to ``n`` prompts taken round-robin from the probe sets (the MoE scan's calibration set)."""
    out: list[str] = []
    pools = [list(v) for v in prompts.values()]
    i = 0
    while len(out) < n and any(i < len(p) for p in pools):
        for p in pools:
            if i < len(p) and len(out) < n:
                out.append(p[i])
        i += 1
    return out


def _scan_parent(model, reference, tokenizer, prompts, probes: ProbesConfig, cfg: MriConfig, role: str):
    log.info("MRI: probe scan of the %s%s", role, " (with the delta probe)" if reference is not None else "")
    probe = layer_importance(
        model, tokenizer, prompts, probes.max_length, probes.batch_size, cfg.probe_reduce, cfg.progress,
        reference=reference,
    )
    SCANS_RUN["probe"] += 1
    moe = None
    if cfg.moe and is_moe(model.config):
        moe = moe_scan(
            model, tokenizer, calibration_prompts(prompts, cfg.moe_calibration), probes.max_length,
            probes.batch_size, cfg.moe_dead_rule, cfg.moe_dead_threshold, cfg.moe_dead_abs_threshold,
            progress=cfg.progress,
        )
        SCANS_RUN["moe"] += 1
    return probe, moe


def _probe_both(father: Path, mother: Path, base: Path | None, tokenizer, prompts, probes, cfg: MriConfig,
                trust_remote_code: bool = False, memory=None):
    """Probe (and MoE) scans of both parents, one model in memory at a time (whole on ``cfg.device``, or
    spread by ``memory.device_map``). The delta probe's reference, the base when given, else the other
    parent, is read from its checkpoint a layer at a time into the scanned model (``ReferenceLayers``):
    never a second whole model."""
    from darwin_hydra.memory import placement

    out = []
    for role, path, other in (("father", father, mother), ("mother", mother, father)):
        # the reference in the scanned model's layout (a text-only mother's names differ from a multimodal father's)
        reference = open_reader(base if base is not None else other, layout=path) if cfg.delta_probe else None
        model = load_model(path, cfg.dtype, trust_remote_code=trust_remote_code, **placement(memory, cfg.device))
        out.append(_scan_parent(model, reference, tokenizer, prompts, probes, cfg, role))
        del model
    return out


@dataclass
class _ScanInputs:
    """What decides a scan: the parents' directories and fingerprints, the prompts, and the cache key."""

    father: Path
    mother: Path
    base: Path | None
    prompts: dict[str, list[str]]
    fingerprints: dict[str, str]
    key: str

    @classmethod
    def of(cls, father_path, mother_path, probes: ProbesConfig, cfg: MriConfig, resolve=None, base_path=None):
        father = Path(resolve(str(father_path)) if resolve else father_path)
        mother = Path(resolve(str(mother_path)) if resolve else mother_path)
        base = None
        if base_path is not None:
            base = Path(resolve(str(base_path)) if resolve else base_path)
        for role, p in (("father", father), ("mother", mother), ("base", base)):
            if p is not None and not p.is_dir():
                raise FileNotFoundError(f"MRI: the {role} checkpoint {p} is not a directory")
        prompts = load_probe_prompts(probes, resolve)
        fps = {"father": open_reader(father).fingerprint(), "mother": open_reader(mother, father).fingerprint()}
        if base is not None and cfg.delta_probe:
            fps["base"] = open_reader(base, father).fingerprint()
        key = cache_key(fps["father"], fps["mother"], probes, prompts, cfg, fps.get("base"))
        return cls(father, mother, base, prompts, fps, key)


def scan_key(father_path, mother_path, probes: ProbesConfig, cfg: MriConfig, resolve=None, base_path=None) -> str:
    """The cache key a scan of these parents with these settings gets (fingerprints and prompts; no
    model is loaded): a saved scan with another key is stale."""
    return _ScanInputs.of(father_path, mother_path, probes, cfg, resolve, base_path).key


def represcribe(result: "MriResult", probes: ProbesConfig, cfg: MriConfig, mother_sets: list[str] | None) -> None:
    """Recompute ``result.prescription`` for these probe weights, prescription settings and mother
    sets (none of which the scan's cache key covers); the scans themselves are kept."""
    names = [n for n in result.static.father if n in result.static.mother]
    weights = {k: v.weight for k, v in probes.sets.items()}
    result.prescription = prescribe(result.probe_father, result.probe_mother, result.static, cfg, names, weights,
                                    mother_sets)
    result.settings = asdict(cfg)


def run_scan(
    father_path: str | Path,
    mother_path: str | Path,
    probes_cfg: ProbesConfig,
    mri_cfg: MriConfig,
    resolve: Callable[[str], str] | None = None,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    mother_sets: list[str] | None = None,
    base_path: str | Path | None = None,
    trust_remote_code: bool = False,
    memory=None,
) -> MriResult:
    """Model MRI of a parent pair: static scan (streamed), probe scan and MoE scan of each parent,
    the prescription r_mri, ``scan.json`` and charts in ``out_dir``.

    ``father_path``/``mother_path``: local checkpoint directories (``zoo://`` URIs go through
    ``resolve``). ``probes_cfg``/``mri_cfg``: the typed configs. ``cache_dir``: where
    scans are cached (None: no cache); with ``mri.cache`` on, a second call with the same parents,
    prompts and scan settings reads the cache and scans nothing. ``mother_sets``: the probe sets the
    mother is known to be better at (e.g. ``[parents.mother_skill]``); overrides ``mri.mother_sets``;
    None = that setting, else inferred from the scan. ``base_path``: the checkpoint both parents
    descend from (``parents.base``); the delta probe's reference (without it, each parent's reference
    is the other parent). ``trust_remote_code``: ``parents.trust_remote_code``. ``memory``: the run's
    ``MemoryConfig`` (its device_map places each scanned model; None: whole on ``mri.device``).
    """
    probes, cfg = probes_cfg, mri_cfg
    inputs = _ScanInputs.of(father_path, mother_path, probes, cfg, resolve, base_path)
    father, mother, base, prompts, fps, key = (inputs.father, inputs.mother, inputs.base, inputs.prompts,
                                               inputs.fingerprints, inputs.key)
    r_father, r_mother = open_reader(father), open_reader(mother, father)
    weights = {k: v.weight for k, v in probes.sets.items()}
    cache_file = Path(cache_dir).expanduser() / f"mri-{key}.json" if cache_dir is not None else None

    scans = None
    if cfg.cache and cache_file is not None and cache_file.exists():
        try:
            scans = json.loads(cache_file.read_text())
            log.info("MRI: cache hit %s (no rescan)", cache_file)
        except (OSError, json.JSONDecodeError) as e:
            log.warning("MRI: unreadable cache file %s (%s); rescanning", cache_file, e)
    from_cache = scans is not None
    if scans is None:
        start = time.perf_counter()
        static = static_scan(r_father, r_mother, cfg.hist_bins, progress=cfg.progress, device=cfg.device)
        SCANS_RUN["static"] += 1
        fault_point("scan")
        tokenizer = load_tokenizer(father, mother, trust_remote_code=trust_remote_code)
        (probe_f, moe_f), (probe_m, moe_m) = _probe_both(father, mother, base, tokenizer, prompts, probes, cfg,
                                                         trust_remote_code, memory)
        scans = {
            "format": CACHE_FORMAT,
            "seconds": time.perf_counter() - start,
            "static": static.to_dict(),
            "probe": {"father": probe_f.to_dict(), "mother": probe_m.to_dict()},
            "moe": {"father": moe_f.to_dict() if moe_f else None, "mother": moe_m.to_dict() if moe_m else None},
        }
        if cfg.cache and cache_file is not None:
            write_text_atomic(cache_file, json.dumps(scans))
    static = StaticScan.from_dict(scans["static"])
    probe_f = ProbeScan.from_dict(scans["probe"]["father"])
    probe_m = ProbeScan.from_dict(scans["probe"]["mother"])
    moe = scans.get("moe") or {}
    moe_f = MoeScan.from_dict(moe["father"]) if moe.get("father") else None
    moe_m = MoeScan.from_dict(moe["mother"]) if moe.get("mother") else None
    names = [n for n in static.father if n in static.mother]
    prescription = prescribe(probe_f, probe_m, static, cfg, names, weights, mother_sets)
    result = MriResult(
        father=str(father),
        mother=str(mother),
        fingerprints=fps,
        probes={**_probes_record(probes), "prompts": {k: len(v) for k, v in prompts.items()}},
        settings=asdict(cfg),
        static=static,
        probe_father=probe_f,
        probe_mother=probe_m,
        moe_father=moe_f,
        moe_mother=moe_m,
        prescription=prescription,
        cache_key=key,
        from_cache=from_cache,
        reference=("base" if base is not None else "other parent") if cfg.delta_probe else "",
        scan_seconds=float(scans.get("seconds", 0.0)),
    )
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def write_outputs(result: MriResult, out_dir: Path) -> None:
    """Charts (PNG) and ``scan.json`` into ``out_dir``; fills ``result.chart_paths``."""
    from darwin_hydra.mri import charts

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_t = (result.settings.get("t_lo", 0.15), result.settings.get("t_hi", 0.85))
    paths = {
        "importance_father": charts.importance_heatmap(result.probe_father, "father", out_dir / "mri_importance_father.png"),
        "importance_mother": charts.importance_heatmap(result.probe_mother, "mother", out_dir / "mri_importance_mother.png"),
        "advantage": charts.advantage_map(result.probe_father, result.probe_mother, out_dir / "mri_advantage.png"),
        "ratio": charts.prescribed_ratio(result.prescription, *cfg_t, out_dir / "mri_ratio.png"),
    }
    if result.probe_father.delta is not None and result.probe_mother.delta is not None:
        paths["delta"] = charts.delta_heatmaps(
            result.probe_father, result.probe_mother, result.reference or "reference", out_dir / "mri_delta.png"
        )
    if result.moe_father is not None:
        paths["experts"] = charts.expert_utilisation(result.moe_father, result.moe_mother, out_dir / "mri_experts.png")
    result.chart_paths = paths
    write_text_atomic(out_dir / SCAN_JSON, result.to_json())
