"""Structured configs of the Model MRI: the probe sets (``probes`` group) and the scan/prescription
settings (``mri`` group). The YAMLs in ``conf/probes/`` and ``conf/mri/`` are validated against these
dataclasses; a misspelt key is an error when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Allowed values of the string options, checked by ``MriConfig.validate`` (errors name the option).
PROBE_REDUCE = ("mean", "last")
BLENDS = ("raw", "share")
PROBE_TERMS = ("all", "own", "delta")
SHARPEN = ("none", "temperature", "stretch")
OUTSIDE_RULES = ("nearest", "mean", "static", "half")
DEAD_RULES = ("relative", "absolute")


@dataclass
class ProbeSetConfig:
    """One probe set: where its prompts come from and how much it counts.

    ``source`` is a local json/jsonl/csv/parquet file (loaded with ``datasets.load_dataset`` and
    ``data_files``), a ``zoo://`` URI (mapped to a file by the caller's ``resolve``), or a Hub dataset
    id (with optional ``subset`` and ``split``). ``field`` is the text column; ``n`` the number of
    prompts taken (the first n rows); ``weight`` the set's w_p in probe(T) = sum_p w_p * I_p(layer(T)).
    """

    source: str = ""
    field: str = "text"
    weight: float = 1.0
    n: int = 32
    split: str = "train"
    subset: Optional[str] = None


@dataclass
class ProbesConfig:
    """A named family of probe sets (REASONING, CODE, MATH, KNOWLEDGE, LANGUAGE for Darwin V6)."""

    name: str = "zoo"
    sets: dict[str, ProbeSetConfig] = field(default_factory=dict)
    # prompts are truncated to this many tokens
    max_length: int = 64
    # prompts per forward pass
    batch_size: int = 16


@dataclass
class MriConfig:
    """Model MRI settings: static statistics, probe scan, MoE scan and the prescription r_mri.

    Darwin's formulas (design notes, "Model MRI")::

        static(T)   = w_entropy*H(T) + w_std*std(T) + w_norm*min(||T||, norm_cap)
        probe(T)    = sum_p w_p * I_p(layer(T))
        combined(T) = alpha*static(T) + (1-alpha)*probe(T)
        r_mri(T)    = combined_B(T) / (combined_A(T) + combined_B(T))

    ``blend``, ``probe_terms`` and ``sharpen`` make that ratio track where each parent's abilities
    live (docs/mri.md explains why the literal formula sits at 0.5 for parents sharing a base);
    ``blend=raw probe_terms=all sharpen=none`` is Darwin's literal rule.
    """

    name: str = "darwin_v6"
    # --- static scan ---
    hist_bins: int = 256
    w_entropy: float = 0.3
    w_std: float = 0.2
    w_norm: float = 0.002
    norm_cap: float = 100.0
    # --- probe scan ---
    # cosine distance per prompt: "mean" over its valid tokens or the "last" valid token only
    probe_reduce: str = "mean"
    # also measure D_p(l): the distance when a parent's layer l is replaced by the reference's (the base
    # when given, else the other parent) -- where each parent's own changes matter. Needs two models in
    # memory at once and L(L+1)/2 more layer evaluations per batch.
    delta_probe: bool = True
    # --- prescription ---
    # combined = alpha*static + (1-alpha)*probe
    alpha: float = 0.4
    # "raw": blend the terms' raw magnitudes (Darwin); "share": turn each term into the mother's share
    # term_B/(term_A+term_B) first, so alpha weighs two signals on one scale
    blend: str = "share"
    # "all": each parent's probe term sums every set's skip importance (Darwin); "own": the mean of the
    # normalised skip-importance profiles of the sets it owns; "delta": the same with the delta probe
    # (docs/mri.md, "The prescription")
    probe_terms: str = "delta"
    # the probe sets the mother is better at (e.g. [MATH]); null = inferred from the scan (the sets
    # where her importance summed over layers exceeds the father's)
    mother_sets: Optional[list[str]] = None
    # what is done to r around 0.5 afterwards: "none"; "temperature": r' = sigmoid(logit(r)/temperature);
    # "stretch": scale r-0.5 so the largest layer deviation reaches stretch_to
    sharpen: str = "none"
    temperature: float = 1.0
    stretch_to: float = 0.45
    # below this largest deviation the parents are called indistinguishable and nothing is stretched
    stretch_floor: float = 1e-4
    # tensors outside decoder layers: "nearest" (embeddings take layer 0's ratio, head and final norm the
    # last layer's, other towers the static-only rule), "mean" of the layer ratios, "static" term only,
    # "half" = 0.5
    outside_layers: str = "nearest"
    # transplant: r < t_lo -> father's tensor as is, r > t_hi -> mother's tensor as is
    t_lo: float = 0.15
    t_hi: float = 0.85
    # --- MoE scan ---
    moe: bool = True
    # "relative": dead when frequency < moe_dead_threshold * k/E (the uniform share);
    # "absolute": dead when frequency < moe_dead_abs_threshold (Darwin's card: 0.05)
    moe_dead_rule: str = "relative"
    moe_dead_threshold: float = 0.1
    moe_dead_abs_threshold: float = 0.05
    # prompts of the calibration set (drawn round-robin from the probe sets)
    moe_calibration: int = 64
    # --- execution ---
    device: str = "cpu"
    # dtype the parents are loaded in for the probe and MoE scans
    dtype: str = "float32"
    # reuse a scan of the same parents, probes and settings from the cache directory
    cache: bool = True
    # show progress bars
    progress: bool = True

    def validate(self) -> "MriConfig":
        """Check option values; errors name the option and the allowed values."""
        for key, allowed in (
            ("probe_reduce", PROBE_REDUCE),
            ("blend", BLENDS),
            ("probe_terms", PROBE_TERMS),
            ("sharpen", SHARPEN),
            ("outside_layers", OUTSIDE_RULES),
            ("moe_dead_rule", DEAD_RULES),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"mri.{key}={getattr(self, key)!r} is not one of {allowed}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"mri.alpha={self.alpha} must lie in [0, 1]")
        if not 0.0 <= self.t_lo <= self.t_hi <= 1.0:
            raise ValueError(f"mri.t_lo={self.t_lo}, mri.t_hi={self.t_hi}: need 0 <= t_lo <= t_hi <= 1")
        if self.temperature <= 0:
            raise ValueError(f"mri.temperature={self.temperature} must be > 0")
        if not 0.0 < self.stretch_to <= 0.5:
            raise ValueError(f"mri.stretch_to={self.stretch_to} must lie in (0, 0.5]")
        if self.hist_bins < 2:
            raise ValueError(f"mri.hist_bins={self.hist_bins} must be >= 2")
        return self


def _as_dict(cfg: Any) -> dict:
    """A plain dict of a dataclass, OmegaConf node or mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(cfg, dict):
        return dict(cfg)
    from dataclasses import asdict, is_dataclass

    if is_dataclass(cfg):
        return asdict(cfg)
    raise TypeError(f"expected a config (dataclass, DictConfig or dict), got {type(cfg).__name__}")


def _build(cls, data: dict, where: str):
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    return cls(**data)


def mri_config(cfg: Any) -> MriConfig:
    """``MriConfig`` from a dataclass, OmegaConf node or dict (unknown keys are errors), validated."""
    if isinstance(cfg, MriConfig):
        return cfg.validate()
    return _build(MriConfig, _as_dict(cfg), "mri").validate()


def probes_config(cfg: Any) -> ProbesConfig:
    """``ProbesConfig`` from a dataclass, OmegaConf node or dict (unknown keys are errors)."""
    if isinstance(cfg, ProbesConfig):
        return cfg
    data = _as_dict(cfg)
    sets = {
        name: s if isinstance(s, ProbeSetConfig) else _build(ProbeSetConfig, dict(s), f"probes.sets.{name}")
        for name, s in (data.pop("sets", None) or {}).items()
    }
    out = _build(ProbesConfig, data, "probes")
    out.sets = sets
    if out.max_length < 2 or out.batch_size < 1:
        raise ValueError(f"probes.max_length={out.max_length} (>= 2) / probes.batch_size={out.batch_size} (>= 1)")
    return out
