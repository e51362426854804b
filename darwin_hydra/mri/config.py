"""Structured configs of the Model MRI: the probe sets (``probes`` group) and the scan/prescription
settings (``mri`` group). The YAMLs in ``conf/probes/`` and ``conf/mri/`` are validated against these
dataclasses; a misspelt key is an error when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Optional

from darwin_hydra.dtypes import Dtype


class ProbeReduce(StrEnum):
    """Cosine distance per prompt: the mean over its valid tokens, or the last valid token only."""

    mean = "mean"
    last = "last"


class Blend(StrEnum):
    """How combined(T) mixes the static and probe terms (docs/mri.md)."""

    raw = "raw"
    share = "share"


class ProbeTerms(StrEnum):
    """Which skip-importance profiles make a parent's probe term (docs/mri.md)."""

    all = "all"
    own = "own"
    delta = "delta"


class Sharpen(StrEnum):
    none = "none"
    temperature = "temperature"
    stretch = "stretch"


class OutsideLayers(StrEnum):
    """The ratio of tensors outside decoder layers."""

    nearest = "nearest"
    mean = "mean"
    static = "static"
    half = "half"


class DeadRule(StrEnum):
    """When an expert is dead: relative to the uniform share k/E, or below an absolute share."""

    relative = "relative"
    absolute = "absolute"


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

    def __post_init__(self):
        if not self.source:
            raise ValueError("a probe set needs a source (a local file, a zoo:// URI or a Hub dataset id)")
        if self.n < 1 or self.weight < 0:
            raise ValueError(f"a probe set needs n >= 1 and weight >= 0 (got n={self.n}, weight={self.weight})")


@dataclass
class ProbesConfig:
    """A named family of probe sets (REASONING, CODE, MATH, KNOWLEDGE, LANGUAGE for Darwin V6)."""

    name: str = "zoo"
    # set name -> ProbeSetConfig fields. Open for new names from the command line
    # (probes.sets.COPY.source=... adds a set, ~probes.sets.CODE removes one); each entry is checked
    # against ProbeSetConfig when the run starts (an unknown key is an error naming the set).
    sets: dict[str, Any] = field(default_factory=dict)
    # prompts are truncated to this many tokens
    max_length: int = 64
    # prompts per forward pass
    batch_size: int = 16

    def __post_init__(self):
        self.sets = {str(name): _probe_set(name, s) for name, s in self.sets.items()}
        if self.max_length < 2 or self.batch_size < 1:
            raise ValueError(f"probes.max_length={self.max_length} (>= 2) / probes.batch_size={self.batch_size} (>= 1)")


def _probe_set(name: str, s: Any) -> ProbeSetConfig:
    if isinstance(s, ProbeSetConfig):
        return s
    if not isinstance(s, dict):
        raise ValueError(f"probes.sets.{name}: expected the fields of a probe set (source, field, n, ...), got {s!r}")
    known = {f.name for f in fields(ProbeSetConfig)}
    unknown = sorted(set(s) - known)
    if unknown:
        raise ValueError(f"probes.sets.{name}: unknown key(s) {unknown}; a probe set has {sorted(known)}")
    try:
        return ProbeSetConfig(**s)
    except ValueError as e:
        raise ValueError(f"probes.sets.{name}: {e}") from None


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
    probe_reduce: ProbeReduce = ProbeReduce.mean
    # also measure D_p(l): the distance when a parent's layer l is replaced by the reference's (the base
    # when given, else the other parent) -- where each parent's own changes matter. Needs two models in
    # memory at once and L(L+1)/2 more layer evaluations per batch.
    delta_probe: bool = True
    # --- prescription ---
    # combined = alpha*static + (1-alpha)*probe
    alpha: float = 0.4
    # "raw": blend the terms' raw magnitudes (Darwin); "share": turn each term into the mother's share
    # term_B/(term_A+term_B) first, so alpha weighs two signals on one scale
    blend: Blend = Blend.share
    # "all": each parent's probe term sums every set's skip importance (Darwin); "own": the mean of the
    # normalised skip-importance profiles of the sets it owns; "delta": the same with the delta probe
    # (docs/mri.md, "The prescription")
    probe_terms: ProbeTerms = ProbeTerms.delta
    # the probe sets the mother is better at (e.g. [MATH]); null = inferred from the scan (the sets
    # where her importance summed over layers exceeds the father's)
    mother_sets: Optional[list[str]] = None
    # what is done to r around 0.5 afterwards: "none"; "temperature": r' = sigmoid(logit(r)/temperature);
    # "stretch": scale r-0.5 so the largest layer deviation reaches stretch_to
    sharpen: Sharpen = Sharpen.none
    temperature: float = 1.0
    stretch_to: float = 0.45
    # below this largest deviation the parents are called indistinguishable and nothing is stretched
    stretch_floor: float = 1e-4
    # tensors outside decoder layers: "nearest" (embeddings take layer 0's ratio, head and final norm the
    # last layer's, other towers the static-only rule), "mean" of the layer ratios, "static" term only,
    # "half" = 0.5
    outside_layers: OutsideLayers = OutsideLayers.nearest
    # transplant: r < t_lo -> father's tensor as is, r > t_hi -> mother's tensor as is
    t_lo: float = 0.15
    t_hi: float = 0.85
    # --- MoE scan ---
    moe: bool = True
    # "relative": dead when frequency < moe_dead_threshold * k/E (the uniform share);
    # "absolute": dead when frequency < moe_dead_abs_threshold (Darwin's card: 0.05)
    moe_dead_rule: DeadRule = DeadRule.relative
    moe_dead_threshold: float = 0.1
    moe_dead_abs_threshold: float = 0.05
    # prompts of the calibration set (drawn round-robin from the probe sets)
    moe_calibration: int = 64
    # --- execution (conf/config.yaml points these at the run's ``device`` and ``parents.dtype``) ---
    device: str = "cpu"
    # dtype the parents are loaded in for the probe and MoE scans
    dtype: Dtype = Dtype.float32
    # reuse a scan of the same parents, probes and settings from the cache directory
    cache: bool = True
    # show progress bars
    progress: bool = True

    def __post_init__(self):
        """Check option values; errors name the option and the allowed values."""
        for key, enum in (("probe_reduce", ProbeReduce), ("blend", Blend), ("probe_terms", ProbeTerms),
                          ("sharpen", Sharpen), ("outside_layers", OutsideLayers), ("moe_dead_rule", DeadRule),
                          ("dtype", Dtype)):
            try:
                setattr(self, key, enum(getattr(self, key)))
            except ValueError:
                raise ValueError(f"mri.{key}={getattr(self, key)!r} is not one of {[e.value for e in enum]}") from None
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
        if self.moe_calibration < 1:
            raise ValueError(f"mri.moe_calibration={self.moe_calibration} must be >= 1")
