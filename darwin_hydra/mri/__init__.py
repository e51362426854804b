"""Model MRI: where each parent's abilities live, and the per-tensor ratio that follows.

- ``static``: per-tensor statistics and pair statistics, streamed (``tensor_stats``, ``pair_stats``)
- ``probes``: layer importance per probe set with prefix sharing (``layer_importance``)
- ``moe``: router statistics and dead experts (``moe_scan``)
- ``prescribe``: r_mri per tensor and transplant decisions (``prescribe``)
- ``scan``: the whole MRI of a parent pair, cached (``run_scan`` -> ``MriResult``)
- ``charts``: PNG charts

Formulas and design choices: docs/mri.md.
"""

from darwin_hydra.mri.config import MriConfig, ProbeSetConfig, ProbesConfig

__all__ = ["MriConfig", "ProbeSetConfig", "ProbesConfig"]
