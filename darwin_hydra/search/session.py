"""A trial session: one loaded model whose weights are re-merged in place for every trial.

The parents' tensors are read once; each trial writes its child into the same model through the
merge engine's in-memory mode (no disk round trip), then scores it (proxy or benchmark).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from darwin_hydra.arch import num_layers
from darwin_hydra.search.genome import GenomeSpace
from darwin_hydra.search.recipe import genome_ratio_map, hash_genome, uniform_ratio_map

log = logging.getLogger(__name__)


class TrialSession:
    """Holds the trial model, its tokenizer, the in-memory merger and what decides a genome's hash."""

    def __init__(
        self,
        readers: Mapping[str, Any],
        space: GenomeSpace,
        r_mri: Mapping[str, float] | None,
        t_lo: float | None,
        t_hi: float | None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool = False,
        router_source=None,
        revive=None,
    ):
        from darwin_hydra.merge.engine import InMemoryMerger

        self.readers = dict(readers)
        father = self.readers["father"]
        self.names = list(father.names)
        self.num_layers = num_layers(father.config)
        self.space, self.r_mri, self.t_lo, self.t_hi = space, dict(r_mri or {}), t_lo, t_hi
        self.router_source, self.revive = router_source, dict(revive or {})
        self.fingerprints = {role: r.fingerprint() for role, r in self.readers.items()}
        self.tokenizer = AutoTokenizer.from_pretrained(father.path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            father.path, dtype=dtype, trust_remote_code=trust_remote_code
        ).to(device)
        self.model.eval()
        tensors = {
            role: {n: r.get(n) for n in self.names} for role, r in self.readers.items()
        }
        self.merger = InMemoryMerger(
            self.model, tensors["father"], tensors["mother"], tensors.get("base"), device=device
        )

    def genome_hash(self, values: Mapping[str, float]) -> str:
        return hash_genome(self.space, values, self.fingerprints, self.r_mri, self.t_lo, self.t_hi,
                           self.router_source, self.revive)

    def ratio_map(self, values: Mapping[str, float]):
        return genome_ratio_map(self.space, values, self.names, self.r_mri, self.num_layers, self.t_lo, self.t_hi,
                                self.router_source, self.revive)

    def apply_genome(self, values: Mapping[str, float]) -> str:
        """Write the genome's child into the trial model; return its genome_hash."""
        h = self.genome_hash(values)
        self.merger.apply(self.ratio_map(values), h)
        return h

    def apply_uniform(self, ratio: float) -> None:
        """Write child = (1 - r) * father + r * mother into the trial model."""
        self.merger.apply(uniform_ratio_map(self.names, ratio), f"uniform-{ratio:.6f}")
