"""The Model MRI's result for a parent pair (``MriResult``): the scans, the prescription, its views,
``scan.json`` (``to_json`` / ``load``) and the summary table printed at the end of a scan."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darwin_hydra.arch import tensor_info
from darwin_hydra.mri.moe import MoeScan
from darwin_hydra.mri.prescribe import FATHER, MERGE, MOTHER, Prescription
from darwin_hydra.mri.probes import ProbeScan
from darwin_hydra.mri.static import StaticScan
from darwin_hydra.texttable import text_table

# Bump when a change makes old cached scans wrong.
CACHE_FORMAT = 1
SCAN_JSON = "scan.json"


@dataclass
class MriResult:
    """Everything the MRI found about a parent pair and the per-tensor ratio it prescribes."""

    father: str
    mother: str
    fingerprints: dict[str, str]
    probes: dict[str, Any]
    settings: dict[str, Any]
    static: StaticScan
    probe_father: ProbeScan
    probe_mother: ProbeScan
    moe_father: MoeScan | None
    moe_mother: MoeScan | None
    prescription: Prescription
    cache_key: str = ""
    from_cache: bool = False
    # what the delta probe replaced each parent's layers with: "base", "other parent", or "" (no delta probe)
    reference: str = ""
    scan_seconds: float = 0.0
    chart_paths: dict[str, Path] = field(default_factory=dict)

    # ---- views ---------------------------------------------------------------------------------
    @property
    def r_mri(self) -> dict[str, float]:
        """The mother's share per tensor (canonical names)."""
        return self.prescription.r_mri

    @property
    def transplant(self) -> dict[str, str]:
        """``father`` / ``mother`` / ``merge`` per tensor, from r_mri and the transplant thresholds."""
        return self.prescription.transplant

    @property
    def num_layers(self) -> int:
        return self.probe_father.num_layers

    def advantage(self) -> dict[str, list[float]]:
        """Per probe set and layer: I^father_p(l) - I^mother_p(l) (negative = the mother's layer matters more)."""
        return {
            p: [a - b for a, b in zip(self.probe_father.importance[p], self.probe_mother.importance[p])]
            for p in self.probe_father.sets
        }

    def mother_advantage(self, sets: list[str] | None = None) -> list[float]:
        """Per layer, the mother's advantage on ``sets`` (default: her sets): with the delta probe, how
        much her own version of the layer matters for them, sum_p D^B_p(l); without it, how much more her
        layer matters than the father's, sum_p I^B_p(l) - I^A_p(l)."""
        sets = sets or self.prescription.mother_sets
        if self.probe_mother.delta is not None:
            return [sum(self.probe_mother.delta[p][l] for p in sets) for l in range(self.num_layers)]
        adv = self.advantage()
        return [sum(-adv[p][l] for p in sets) for l in range(self.num_layers)]

    def mother_advantage_ranking(self, sets: list[str] | None = None) -> list[int]:
        """Layers ordered by ``mother_advantage(sets)``, strongest first."""
        score = self.mother_advantage(sets)
        return sorted(range(self.num_layers), key=lambda l: -score[l])

    def moe_per_layer(self) -> dict[str, dict[int, dict[str, float]]]:
        """Per parent, per MoE layer: dead share, routing entropy, ... (empty for dense parents)."""
        return {
            role: s.per_layer() for role, s in (("father", self.moe_father), ("mother", self.moe_mother)) if s
        }

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        names = list(self.prescription.r_mri)
        return {
            "format": CACHE_FORMAT,
            "father": self.father,
            "mother": self.mother,
            "fingerprints": self.fingerprints,
            "cache_key": self.cache_key,
            "from_cache": self.from_cache,
            "reference": self.reference,
            "scan_seconds": self.scan_seconds,
            "probes": self.probes,
            "settings": self.settings,
            "tensors": {
                n: {
                    "layer": (i := tensor_info(n)).layer,
                    "component": i.component,
                    "expert": i.expert,
                    "r_mri": self.prescription.r_mri[n],
                    "transplant": self.prescription.transplant[n],
                }
                for n in names
            },
            "advantage": self.advantage(),
            "static": self.static.to_dict(),
            "probe": {"father": self.probe_father.to_dict(), "mother": self.probe_mother.to_dict()},
            "moe": {
                "father": self.moe_father.to_dict() if self.moe_father else None,
                "mother": self.moe_mother.to_dict() if self.moe_mother else None,
            },
            "prescription": self.prescription.to_dict(),
            "charts": {k: str(v) for k, v in self.chart_paths.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping) -> "MriResult":
        moe = d.get("moe") or {}
        return cls(
            father=d["father"],
            mother=d["mother"],
            fingerprints=dict(d["fingerprints"]),
            probes=dict(d["probes"]),
            settings=dict(d["settings"]),
            static=StaticScan.from_dict(d["static"]),
            probe_father=ProbeScan.from_dict(d["probe"]["father"]),
            probe_mother=ProbeScan.from_dict(d["probe"]["mother"]),
            moe_father=MoeScan.from_dict(moe["father"]) if moe.get("father") else None,
            moe_mother=MoeScan.from_dict(moe["mother"]) if moe.get("mother") else None,
            prescription=Prescription.from_dict(d["prescription"]),
            cache_key=d.get("cache_key", ""),
            from_cache=bool(d.get("from_cache", False)),
            reference=d.get("reference", ""),
            scan_seconds=float(d.get("scan_seconds", 0.0)),
            chart_paths={k: Path(v) for k, v in (d.get("charts") or {}).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> "MriResult":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> "MriResult":
        """Read a ``scan.json`` (a file, or the directory holding it)."""
        p = Path(path)
        p = p / SCAN_JSON if p.is_dir() else p
        return cls.from_json(p.read_text())

    # ---- the stage's printout ------------------------------------------------------------------
    def summary_table(self) -> str:
        """Per layer: importance of each parent (sum over sets), the mother's advantage on her sets,
        block influence, r_mri and transplant counts; MoE dead experts and routing entropy when present."""
        pf, pm, pr = self.probe_father, self.probe_mother, self.prescription
        L = self.num_layers
        adv = self.advantage()
        m_sets = pr.mother_sets
        tf, tm = pf.total(), pm.total()
        bif = [sum(pf.block_influence[p][l] for p in pf.sets) / len(pf.sets) for l in range(L)]
        counts = {l: {FATHER: 0, MERGE: 0, MOTHER: 0} for l in range(L)}
        for n, t in pr.transplant.items():
            layer = tensor_info(n).layer
            if layer is not None and layer < L:
                counts[layer][t] += 1
        moe = self.moe_per_layer()
        delta = pf.delta is not None and pm.delta is not None
        f_sets = pr.father_sets
        columns = ["layer", "imp A", "imp B", "B adv", "BI A"] + (["D A", "D B"] if delta else []) + ["r_mri", "A/mix/B"]
        columns += ["dead A", "dead B", "H A", "H B"] if moe else []
        lines = [
            f"Model MRI  father={self.father}  mother={self.mother}",
            f"  {'cache hit (' + self.cache_key + ')' if self.from_cache else f'scanned in {self.scan_seconds:.1f} s'}"
            f"; probe sets {', '.join(pf.sets)}; mother's sets: {', '.join(m_sets) or '-'}",
            f"  layer evaluations per parent: {pf.layer_evals} (naive skip-one-layer: {pf.naive_layer_evals})"
            + (f" + {pf.delta_layer_evals} for the delta probe (reference: {self.reference})" if delta else "")
            + f"; probe scan {pf.seconds:.1f} s + {pm.seconds:.1f} s",
            "  imp = sum over sets of I_p(l); B adv = mean over the mother's sets of I_B - I_A; "
            "BI = ShortGPT block influence"
            + ("; D A / D B = delta probe of the father on his sets / the mother on hers" if delta else "")
            + f"; {self.settings.get('name', '')}: blend={self.settings.get('blend')}, "
            f"probe_terms={pr.settings.get('probe_terms_used', self.settings.get('probe_terms'))}, "
            f"sharpen={self.settings.get('sharpen')}",
        ]
        rows = []
        for l in range(L):
            b_adv = -sum(adv[p][l] for p in m_sets) / max(1, len(m_sets))
            c = counts[l]
            row = [l, f"{tf[l]:.4f}", f"{tm[l]:.4f}", f"{b_adv:+.4f}", f"{bif[l]:.3f}"]
            if delta:
                row += [f"{sum(pf.delta[p][l] for p in f_sets) / max(1, len(f_sets)):.4f}",
                        f"{sum(pm.delta[p][l] for p in m_sets) / max(1, len(m_sets)):.4f}"]
            row += [f"{pr.per_layer[l]:.3f}", f"{c[FATHER]}/{c[MERGE]}/{c[MOTHER]}"]
            if moe:
                fa, mo = moe.get("father", {}).get(l), moe.get("mother", {}).get(l)
                row += ["-" if x is None else f"{x:.2f}" for x in (fa and fa["dead_share"], mo and mo["dead_share"],
                                                                   fa and fa["routing_entropy"],
                                                                   mo and mo["routing_entropy"])]
            rows.append(row)
        lines.append(text_table(columns, rows, right=[True] * len(columns)))
        outside = [n for n in pr.r_mri if tensor_info(n).layer is None]
        if outside:
            lines.append(
                "  outside layers (" + self.settings.get("outside_layers", "") + "): "
                + ", ".join(f"{n}={pr.r_mri[n]:.3f}" for n in outside[:6])
                + (f" (+{len(outside) - 6} more)" if len(outside) > 6 else "")
            )
        return "\n".join(lines)
