"""A trial session: one loaded model whose weights are re-merged in place for every trial.

The parents stay in their files: each trial streams only the tensors whose recipe changed from the
page cache, merges them a chunk at a time on the device of the parameter they go into and writes
them there in place (the merge engine's in-memory mode; no disk round trip), then scores the model
(proxy or benchmark). The trial model lives whole on ``device``, or spread over GPUs by
``memory.device_map``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch

from darwin_hydra.models import ignored_on_load, load_model, load_tokenizer, model_devices
from darwin_hydra.search.recipe import BreedingPlan

log = logging.getLogger(__name__)


class TrialSession:
    """Holds the trial model, its tokenizer, the in-memory merger and the run's breeding plan.

    ``readers``: the parents' ``CheckpointReader``s by role (father, mother, base). ``memory``: the
    run's ``MemoryConfig`` (its ``device_map`` and ``max_memory`` place the trial model; None: whole on
    ``device``)."""

    def __init__(
        self,
        readers: Mapping[str, Any],
        plan: BreedingPlan,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool = False,
        memory=None,
    ):
        from darwin_hydra.memory import placement
        from darwin_hydra.merge.engine import InMemoryMerger

        self.readers = dict(readers)
        self.plan = plan
        father = self.readers["father"]
        self.tokenizer = load_tokenizer(father.path, trust_remote_code=trust_remote_code)
        self.model = load_model(father.path, dtype=str(dtype).removeprefix("torch."),
                                trust_remote_code=trust_remote_code, **placement(memory, device))
        # tensors the model's class does not hold (Qwen3.5's MTP head) take no part in a trial's forward pass:
        # they are merged at export only
        skip = [re.compile(p) for p in ignored_on_load(self.model)]
        self.names = [n for n in plan.names if not any(p.search(n) for p in skip)]
        if len(self.names) < len(plan.names):
            log.info("trial model: %d tensor(s) its class does not load (%s) are merged at export only",
                     len(plan.names) - len(self.names), [p.pattern for p in skip])
        self.merger = InMemoryMerger(self.model, father, self.readers["mother"], self.readers.get("base"))
        missing = sorted(set(self.merger.views) - set(self.names))
        if missing:
            raise KeyError(f"the trial model holds tensor(s) the breeding plan does not name: {missing[:5]}")
        log.info("trial model on %s; parents read from their files for each trial", ", ".join(model_devices(self.model)))

    def apply_genome(self, values: Mapping[str, float]) -> str:
        """Write the genome's child into the trial model; return its genome_hash."""
        h = self.plan.hash(values)
        self.merger.apply(self.plan.ratio_map(values), h)
        return h

    def apply_uniform(self, ratio: float) -> None:
        """Write child = (1 - r) * father + r * mother into the trial model."""
        self.merger.apply(self.plan.uniform(ratio), f"uniform-{ratio:.6f}")

    def apply_mri_only(self) -> str:
        """Write the MRI's own child (``BreedingPlan.mri_only``) into the trial model; return its hash."""
        h = self.plan.candidate_hash("mri")
        self.merger.apply(self.plan.mri_only(), h)
        return h
