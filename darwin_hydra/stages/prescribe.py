"""Prescribe stage: the MRI's per-tensor ratio r_mri, its transplant decisions, and the genome that
imitates it (the MRI-seeded start of the search), written to ``prescription.json``; the search starts
from this stage's genome."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


@dataclass
class Prescribed:
    """The prescription of a run and the genome space it was fitted in."""

    space: object  # darwin_hydra.search.genome.GenomeSpace
    r_mri: dict[str, float]
    transplant: dict[str, str]
    start_genome: dict[str, float]  # the search's x0: MRI-seeded, or the centre of the bounds
    mri_seeded: bool

    def to_dict(self, per_layer) -> dict:
        return {
            "r_mri": self.r_mri,
            "transplant": self.transplant,
            "per_layer": list(per_layer),
            "mri_seeded_genome": self.start_genome if self.mri_seeded else None,
            "start_genome": self.start_genome,
            "counts": dict(Counter(self.transplant.values())),
        }


class PrescribeStage(Stage):
    name = "prescribe"

    def __init__(self, genome, optimizer):
        self.genome, self.optimizer = genome, optimizer

    def run(self, ctx: RunContext) -> Prescribed:
        from darwin_hydra.search.genome import GenomeSpace, fit_genome_to_prescription

        scan = ctx.require("scan")
        L = ctx.num_layers
        space = GenomeSpace.from_config(self.genome, L)
        r_mri = dict(scan.r_mri)
        x0 = fit_genome_to_prescription(space, r_mri, L) if self.optimizer.mri_seeded else space.centre()
        out = Prescribed(space, r_mri, dict(scan.transplant), x0, self.optimizer.mri_seeded)
        ctx.write_json("prescription.json", out.to_dict(scan.prescription.per_layer))
        sides = Counter(out.transplant.values())
        ctx.tracker.log_summary({f"prescribe/{k}": v for k, v in sides.items()})
        log.info("prescription: %d tensors (%s); start genome (%s) %s", len(r_mri), dict(sides),
                 "MRI-seeded" if out.mri_seeded else "centre of the bounds", {k: round(v, 3) for k, v in x0.items()})
        return out
