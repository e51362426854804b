"""Prescribe stage: the MRI's per-tensor ratio r_mri, its transplant decisions, and the genome that
imitates it (the MRI-seeded start of the search), written to ``prescription.json``."""

from __future__ import annotations

import logging

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


class PrescribeStage(Stage):
    name = "prescribe"

    def run(self, ctx: RunContext) -> None:
        from collections import Counter

        from darwin_hydra.arch import num_layers
        from darwin_hydra.search.genome import GenomeSpace, fit_genome_to_prescription
        from darwin_hydra.stages.scan import ensure_scan

        scan = ensure_scan(ctx)
        L = num_layers(ctx.readers()["father"].config)
        space = GenomeSpace.from_config(ctx.cfg.genome, L)
        x0 = fit_genome_to_prescription(space, scan.r_mri, L)
        sides = Counter(scan.transplant.values())
        out = {
            "r_mri": scan.r_mri,
            "transplant": scan.transplant,
            "per_layer": list(scan.prescription.per_layer),
            "mri_seeded_genome": x0,
            "counts": dict(sides),
        }
        ctx.write_json("prescription.json", out)
        ctx.artifacts["prescription"] = out
        ctx.tracker.log_summary({f"prescribe/{k}": v for k, v in sides.items()})
        log.info("prescription: %d tensors (%s); MRI-seeded genome %s", len(scan.r_mri), dict(sides),
                 {k: round(v, 3) for k, v in x0.items()})
