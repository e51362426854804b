"""The prescription: the MRI's per-tensor ratio r_mri (the mother's share; 0 keeps the father).

Darwin's rule (design notes) for tensor T in decoder layer l, parent X in {A = father, B = mother}::

    static_X(T)   = w_entropy*H_X(T) + w_std*std_X(T) + w_norm*min(||T_X||, norm_cap)
    probe_X(l)    = sum_p w_p * I^X_p(l)
    combined_X(T) = alpha*static_X(T) + (1-alpha)*probe_X(l)
    r_mri(T)      = combined_B(T) / (combined_A(T) + combined_B(T))

Parents that share a base have nearly equal statistics, and the static term (entropy ~7 bits) dwarfs
the probe term (cosine distances ~0.01-0.3), so the literal rule gives r ~ 0.5 everywhere. Three
documented, configurable steps make it track where each parent's abilities live:

* ``blend=share``: each term becomes the mother's share before blending,
  r = alpha * sB/(sA+sB) + (1-alpha) * pB/(pA+pB), so alpha weighs two signals on one scale
  (``raw`` = Darwin's combined ratio).
* ``probe_terms=own``: probe_X(l) = weighted mean over the sets X owns of its importance profile
  normalised over layers, I^X_p(l) / sum_l' I^X_p(l') -- "where parent X's skills live", each set a
  distribution over layers, so a parent whose layers all matter more (typical after any fine-tune)
  does not win every layer. The mother owns ``mother_sets`` when given, else the sets whose relative
  advantage rho_p = sum_l (I^B_p - I^A_p) / sum_l (I^A_p + I^B_p) is above the mean rho over sets;
  the father owns the rest. (``all`` = Darwin: every set, raw importances, summed.)
* ``probe_terms=delta``: as ``own`` but with the delta probe D^X_p(l) (the distance when X's layer l is
  replaced by the reference's: the base when given, else the other parent) in place of the skip
  importance: where each parent's own changes matter for its sets. With a base, D is 0 at layers a
  parent did not change, so its changed layers lean to it. Falls back to ``own`` without a delta probe.
* ``sharpen``: ``temperature`` r' = sigmoid(logit(r)/T); ``stretch`` r' = 0.5 + (r-0.5) * s/q with
  q = the largest |mean r(l) - 0.5| over layers, s = ``stretch_to``, clipped to [0, 1] (skipped when
  q < ``stretch_floor``: parents the scan cannot tell apart are left at their raw ratio).

Tensors outside decoder layers (``outside_layers``): ``nearest`` -- embeddings take layer 0's mean
ratio, the LM head and the final norm the last layer's, anything else (vision/audio towers, MTP
heads) the static-only ratio; ``mean`` -- the mean of the layer ratios; ``static`` -- the static-only
ratio sB/(sA+sB) (``raw``: the same with combined = static); ``half`` -- 0.5. They are computed
before sharpening and sharpened with everything else.

Transplant: r < t_lo -> the father's tensor as is, r > t_hi -> the mother's tensor as is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from darwin_hydra.arch import EMBED, HEAD, NORM, tensor_info
from darwin_hydra.mri.config import MriConfig
from darwin_hydra.mri.probes import ProbeScan
from darwin_hydra.mri.static import StaticScan, TensorStats, static_score

log = logging.getLogger(__name__)

FATHER, MOTHER, MERGE = "father", "mother", "merge"


@dataclass
class Prescription:
    """r_mri per tensor, the transplant decision per tensor, and how they were reached."""

    r_mri: dict[str, float]
    transplant: dict[str, str]
    per_layer: list[float]
    mother_sets: list[str]
    father_sets: list[str]
    probe_father: list[float]
    probe_mother: list[float]
    raw_per_layer: list[float]
    stretch_factor: float = 1.0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Prescription":
        return cls(**dict(d))


def share(b: float, a: float) -> float:
    """b / (a + b), 0.5 when both are 0."""
    s = a + b
    return 0.5 if s == 0 else b / s


def transplant_decision(r: float, t_lo: float, t_hi: float) -> str:
    """``father`` when r < t_lo, ``mother`` when r > t_hi, else ``merge``."""
    return FATHER if r < t_lo else MOTHER if r > t_hi else MERGE


def has_delta(*scans: ProbeScan) -> bool:
    """True when every scan carries the delta probe."""
    return all(s.delta is not None for s in scans)


def _signal(scan: ProbeScan, kind: str) -> dict[str, list[float]]:
    return scan.delta if kind == "delta" else scan.importance  # type: ignore[return-value]


def relative_advantage(father: ProbeScan, mother: ProbeScan, kind: str = "skip") -> dict[str, float]:
    """rho_p = sum_l (X^B_p(l) - X^A_p(l)) / sum_l (X^A_p(l) + X^B_p(l)) per probe set, X = the skip
    importance I (``kind="skip"``) or the delta probe D (``"delta"``): in [-1, 1], positive where the
    mother's layers (or her changes) matter more for p."""
    fa, mo = _signal(father, kind), _signal(mother, kind)
    out = {}
    for p in father.sets:
        a, b = sum(fa[p]), sum(mo[p])
        out[p] = (b - a) / (a + b) if a + b > 0 else 0.0
    return out


def mother_probe_sets(
    father: ProbeScan, mother: ProbeScan, given: Sequence[str] | None = None, kind: str = "skip"
) -> list[str]:
    """The probe sets the mother is taken to own: ``given`` when set (``mri.mother_sets``), else the sets
    whose relative advantage rho_p is above the mean over sets (a fine-tune usually makes all of its
    layers matter more; what stands out is where it matters most)."""
    if given:
        unknown = [p for p in given if p not in father.sets]
        if unknown:
            raise ValueError(f"mri.mother_sets: {unknown} not among the probe sets {father.sets}")
        return list(given)
    rho = relative_advantage(father, mother, kind)
    if len(rho) == 1:
        return [p for p, v in rho.items() if v > 0]
    mean = sum(rho.values()) / len(rho)
    return [p for p in father.sets if rho[p] > mean]


def probe_terms(
    father: ProbeScan, mother: ProbeScan, weights: Mapping[str, float], mode: str, mother_sets: Sequence[str]
) -> tuple[list[float], list[float], list[str], list[str]]:
    """(probe_A(l), probe_B(l), father's sets, mother's sets) under ``mode`` (module doc)."""
    sets = list(father.sets)
    if sets != list(mother.sets) or father.num_layers != mother.num_layers:
        raise ValueError(
            f"probe scans differ: father sets {father.sets} / {father.num_layers} layers, "
            f"mother sets {mother.sets} / {mother.num_layers} layers"
        )
    w = {p: float(weights.get(p, 1.0)) for p in sets}
    L = father.num_layers
    if mode == "all":
        return father.total(w), mother.total(w), sets, sets
    if mode not in ("own", "delta"):
        raise ValueError(f"mri.probe_terms={mode!r}: choose 'all', 'own' or 'delta'")
    kind = "delta" if mode == "delta" else "skip"
    b_sets = [p for p in sets if p in set(mother_sets)]
    a_sets = [p for p in sets if p not in set(b_sets)]
    if not a_sets or not b_sets:
        log.warning(
            "MRI: the %s owns no probe set; both parents' probe terms use all sets",
            "mother" if not b_sets else "father",
        )
        a_sets = b_sets = sets

    def mean_over(scan: ProbeScan, chosen: list[str]) -> list[float]:
        values = _signal(scan, kind)
        tw = sum(w[p] for p in chosen) or 1.0
        total = {p: sum(values[p]) or 1.0 for p in chosen}
        return [sum(w[p] * values[p][l] / total[p] for p in chosen) / tw for l in range(L)]

    return mean_over(father, a_sets), mean_over(mother, b_sets), a_sets, b_sets


def _sharpen(r: float, cfg: MriConfig, factor: float) -> float:
    if cfg.sharpen == "temperature":
        r = min(max(r, 1e-6), 1 - 1e-6)
        return 1.0 / (1.0 + math.exp(-math.log(r / (1 - r)) / cfg.temperature))
    if cfg.sharpen == "stretch":
        return min(1.0, max(0.0, 0.5 + (r - 0.5) * factor))
    return r


def prescribe(
    scan_father: ProbeScan,
    scan_mother: ProbeScan,
    static: StaticScan,
    cfg: MriConfig,
    names: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    mother_sets: Sequence[str] | None = None,
) -> Prescription:
    """r_mri and the transplant decision for every tensor in ``names`` (default: every tensor both
    parents have). ``weights`` are the probe sets' w_p (default 1); ``mother_sets`` fixes the sets the
    mother is better at (default: inferred, see ``mother_probe_sets``). Formulas in the module doc."""
    names = list(names) if names is not None else [n for n in static.father if n in static.mother]
    L = scan_father.num_layers
    mode = cfg.probe_terms
    if mode == "delta" and not has_delta(scan_father, scan_mother):
        log.warning("MRI: probe_terms=delta but the scan has no delta probe (mri.delta_probe=false); using 'own'")
        mode = "own"
    kind = "delta" if mode == "delta" else "skip"
    m_sets = mother_probe_sets(scan_father, scan_mother, mother_sets or cfg.mother_sets, kind)
    pa, pb, a_sets, b_sets = probe_terms(scan_father, scan_mother, weights or {}, mode, m_sets)

    def stat(stats: Mapping[str, TensorStats], name: str) -> float:
        s = stats.get(name)
        if s is None:
            raise KeyError(f"tensor {name!r} has no static statistics for one of the parents")
        return static_score(s, cfg.w_entropy, cfg.w_std, cfg.w_norm, cfg.norm_cap)

    def ratio(name: str, layer: int | None) -> float:
        sa, sb = stat(static.father, name), stat(static.mother, name)
        if layer is None:  # static-only ratio
            return share(sb, sa)
        if cfg.blend == "share":
            return cfg.alpha * share(sb, sa) + (1 - cfg.alpha) * share(pb[layer], pa[layer])
        ca = cfg.alpha * sa + (1 - cfg.alpha) * pa[layer]
        cb = cfg.alpha * sb + (1 - cfg.alpha) * pb[layer]
        return share(cb, ca)

    raw: dict[str, float] = {}
    outside: list[str] = []
    by_layer: list[list[float]] = [[] for _ in range(L)]
    for name in names:
        info = tensor_info(name)
        if info.layer is None:
            outside.append(name)
            continue
        if info.layer >= L:
            raise ValueError(f"tensor {name!r} sits in layer {info.layer} but the probe scan saw {L} layers")
        raw[name] = ratio(name, info.layer)
        by_layer[info.layer].append(raw[name])
    layer_mean = [sum(v) / len(v) if v else 0.5 for v in by_layer]
    overall = sum(raw.values()) / len(raw) if raw else 0.5
    for name in outside:
        info = tensor_info(name)
        rule = cfg.outside_layers
        if rule == "half":
            raw[name] = 0.5
        elif rule == "mean":
            raw[name] = overall
        elif rule == "nearest" and info.component == EMBED:
            raw[name] = layer_mean[0]
        elif rule == "nearest" and info.component in (HEAD, NORM):
            raw[name] = layer_mean[L - 1]
        else:  # "static", or "nearest" for other tensors (vision/audio towers, MTP heads)
            raw[name] = ratio(name, None)

    factor = 1.0
    if cfg.sharpen == "stretch":
        q = max((abs(m - 0.5) for m in layer_mean), default=0.0)
        factor = cfg.stretch_to / q if q >= cfg.stretch_floor else 1.0
        if q < cfg.stretch_floor:
            log.warning("MRI: the parents' layer ratios all lie within %.2g of 0.5; not stretched", cfg.stretch_floor)
    r = {n: _sharpen(raw[n], cfg, factor) for n in names}
    per_layer = [_sharpen(m, cfg, factor) for m in layer_mean]
    return Prescription(
        r_mri=r,
        transplant={n: transplant_decision(v, cfg.t_lo, cfg.t_hi) for n, v in r.items()},
        per_layer=per_layer,
        mother_sets=b_sets,
        father_sets=a_sets,
        probe_father=pa,
        probe_mother=pb,
        raw_per_layer=layer_mean,
        stretch_factor=factor,
        settings={"probe_terms_used": mode} | {k: getattr(cfg, k) for k in (
            "name", "w_entropy", "w_std", "w_norm", "norm_cap", "alpha", "blend", "probe_terms",
            "sharpen", "temperature", "stretch_to", "outside_layers", "t_lo", "t_hi",
        )},
    )
