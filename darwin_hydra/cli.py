"""Command-line entry points: ``darwin-hydra`` (the Hydra app) and ``darwin-hydra-reproduce``."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from darwin_hydra.config import register_configs

log = logging.getLogger("darwin_hydra")

# conf/ ships as the package darwin_hydra_conf, so the installed command finds it from any directory.
CONFIG_PATH = "pkg://darwin_hydra_conf"

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _app(cfg: DictConfig) -> None:
    from darwin_hydra.pipeline import run_pipeline

    run_dir = HydraConfig.get().runtime.output_dir
    run_pipeline(cfg, run_dir)


def main() -> None:
    """``darwin-hydra [overrides]``: compose the config and run the pipeline."""
    _app()


def reproduce_main(argv: list[str] | None = None) -> None:
    """``darwin-hydra-reproduce RUN_DIR``: rebuild a run's child and verify it bit for bit."""
    from darwin_hydra.reproduce import main as _reproduce

    sys.exit(_reproduce(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
