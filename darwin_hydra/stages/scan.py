"""Scan stage: the Model MRI of both parents (static, probe and MoE scans), cached by fingerprint.

The static pass reads every parent tensor once; a NaN or Inf found there stops the run before the
search, naming the tensors (a merge through them would only spread them)."""

from __future__ import annotations

import logging

from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


class NonFiniteParentError(ValueError):
    """A parent holds NaN or Inf values."""


class ScanStage(Stage):
    name = "scan"

    def __init__(self, mri, probes, parents, memory):
        self.mri, self.probes, self.parents, self.memory = mri, probes, parents, memory

    def _mother_sets(self) -> list[str] | None:
        # what the user knows beats what the scan infers
        return [self.parents.mother_skill] if self.parents.mother_skill else None

    def run(self, ctx: RunContext):
        from darwin_hydra.mri.scan import run_scan

        ctx.checked_readers  # noqa: B018 - the headers agree before any model is loaded
        result = run_scan(
            ctx.parent_path("father"),
            ctx.parent_path("mother"),
            self.probes,
            self.mri,
            resolve=ctx.resolve,
            cache_dir=ctx.cache_dir / "scans",
            out_dir=ctx.run_dir / "scan",
            mother_sets=self._mother_sets(),
            base_path=ctx.parent_path("base"),
            trust_remote_code=self.parents.trust_remote_code,
            memory=self.memory,
        )
        check_finite(result)
        self._log(ctx, result)
        return result

    def load(self, ctx: RunContext):
        """This run's ``scan/scan.json`` when it was made from these parents and scan settings (its
        cache key), with the prescription recomputed for the current probe weights and mother sets."""
        from darwin_hydra.mri.scan import SCAN_JSON, MriResult, represcribe, scan_key

        saved = ctx.run_dir / "scan" / SCAN_JSON
        if not saved.exists():
            return None
        try:
            result = MriResult.load(saved)
        except (OSError, ValueError, KeyError) as e:
            log.warning("scan: %s is unreadable (%s); scanning again", saved, e)
            return None
        key = scan_key(ctx.parent_path("father"), ctx.parent_path("mother"), self.probes, self.mri, ctx.resolve,
                       ctx.parent_path("base"))
        if result.cache_key != key:
            log.warning("scan: %s was made from other parents or scan settings; scanning again", saved)
            return None
        represcribe(result, self.probes, self.mri, self._mother_sets())
        check_finite(result)
        return result

    def _log(self, ctx: RunContext, result) -> None:
        log.info("Model MRI of %s:\n%s", self.parents.name, result.summary_table())
        ctx.tracker.log_images({f"mri/{k}": v for k, v in result.chart_paths.items()})
        ctx.tracker.log_artifact("scan", "mri", [ctx.run_dir / "scan" / "scan.json"])
        ctx.tracker.log_summary({"mri/scan_seconds": result.scan_seconds, "mri/from_cache": result.from_cache})


def check_finite(result) -> None:
    """Refuse parents with NaN/Inf values, naming every such tensor (up to 20) and the count."""
    bad = []
    for role in ("father", "mother"):
        for name, st in getattr(result.static, role).items():
            if st.nan or st.inf:
                bad.append(f"{role} {name} ({st.nan} NaN, {st.inf} Inf)")
    if bad:
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise NonFiniteParentError(
            f"{len(bad)} parent tensor(s) hold NaN/Inf values: {'; '.join(bad[:20])}{more}. A merge would spread "
            "them into the child; repair or replace the checkpoint."
        )
