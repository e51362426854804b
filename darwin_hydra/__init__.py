"""darwin-hydra: diagnostic-guided evolutionary model merging.

Stages (one module each): scan (Model MRI), prescribe, search, merge/export, health, report.
"""

__version__ = "0.1.0"
