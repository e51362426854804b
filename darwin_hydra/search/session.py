"""A trial session: one loaded model whose weights are re-merged in place for every trial.

The parents' tensors are read once; each trial writes its child into the same model through the
merge engine's in-memory mode (no disk round trip), then scores it (proxy or benchmark).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from darwin_hydra.search.recipe import BreedingPlan

log = logging.getLogger(__name__)


class TrialSession:
    """Holds the trial model, its tokenizer, the in-memory merger and the run's breeding plan."""

    def __init__(
        self,
        readers: Mapping[str, Any],
        plan: BreedingPlan,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ):
        from darwin_hydra.merge.engine import InMemoryMerger

        self.readers = dict(readers)
        self.plan = plan
        father = self.readers["father"]
        self.tokenizer = AutoTokenizer.from_pretrained(father.path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            father.path, dtype=dtype, trust_remote_code=trust_remote_code
        ).to(device)
        self.model.eval()
        tensors = {role: {n: r.get(n) for n in plan.names} for role, r in self.readers.items()}
        self.merger = InMemoryMerger(
            self.model, tensors["father"], tensors["mother"], tensors.get("base"), device=device
        )

    def apply_genome(self, values: Mapping[str, float]) -> str:
        """Write the genome's child into the trial model; return its genome_hash."""
        h = self.plan.hash(values)
        self.merger.apply(self.plan.ratio_map(values), h)
        return h

    def apply_uniform(self, ratio: float) -> None:
        """Write child = (1 - r) * father + r * mother into the trial model."""
        self.merger.apply(self.plan.uniform(ratio), f"uniform-{ratio:.6f}")
