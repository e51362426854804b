"""Hydra config tree of darwin-hydra (shipped as the package darwin_hydra_conf)."""
