"""Command-line entry points: ``darwin-hydra`` (the Hydra app) and ``darwin-hydra-reproduce``."""

from __future__ import annotations

import atexit
import gc
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

_FROZE = False


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _app(cfg: DictConfig) -> None:
    from darwin_hydra.pipeline import run_pipeline  # imports torch

    # Everything imported so far lives until exit: move it out of the collector's sight, then collect
    # as usual during the run (its passes no longer walk torch's module graph). Once per process: a
    # multirun's later jobs must not freeze the garbage of the jobs before them.
    global _FROZE
    if not _FROZE:
        gc.freeze()
        atexit.register(gc.freeze)  # and what is alive at exit: shutdown skips a last pass over it
        _FROZE = True
    gc.enable()
    from darwin_hydra.run import prepare_run

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        typed = prepare_run(cfg, run_dir, list(hc.overrides.task), hydra_cfg=hc)
        run_pipeline(typed, run_dir)
    except user_errors() as e:  # the message names the option, file or task: no traceback
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (e,), None)
        for handler in logging.getLogger().handlers:  # into the run's log file; the console gets it once
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"darwin-hydra: {e}", file=sys.stderr)
        sys.exit(2)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user fixes in the config or the inputs (their message says what and where); any
    other exception is a bug or an environment failure and keeps its traceback."""
    from darwin_hydra.config import ConfigError
    from darwin_hydra.io.compat import IncompatibleParentsError
    from darwin_hydra.io.resolve import ModelNotFoundError
    from darwin_hydra.reproduce import CannotReproduceError
    from darwin_hydra.search.fitness import DishonestEvaluationError
    from darwin_hydra.stages.preflight import PreflightError
    from darwin_hydra.stages.scan import NonFiniteParentError

    return (ConfigError, PreflightError, ModelNotFoundError, IncompatibleParentsError, NonFiniteParentError,
            DishonestEvaluationError, CannotReproduceError)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (what schedulers send) unwinds like Ctrl-C: every ``finally`` runs, so an export in
    progress removes its temporary directory instead of leaving it behind."""
    raise SystemExit(128 + signum)


def _tune_malloc() -> None:
    """glibc only: serve allocations up to 32 MiB from the heap and keep up to 256 MiB of freed heap.

    glibc maps every allocation above its (adaptive, initially 128 KiB) threshold fresh from the
    kernel and unmaps it on free, so a merge that allocates a few MB per tensor, tensor after tensor,
    pays page faults and zeroing for every one of them. Reusing heap memory instead took the merge
    command from about 3.2 s to 3.0 s (scripts/bench_merge.py setup; peak RSS unchanged). Left alone
    when the user tunes malloc (``MALLOC_*`` or ``GLIBC_TUNABLES`` in the environment), and
    elsewhere (macOS, musl).
    """
    import ctypes
    import ctypes.util
    import os
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)):
        log.debug("mallopt refused the merge-friendly thresholds; keeping glibc's defaults")


def main() -> None:
    """``darwin-hydra [overrides]``: compose the config and run the pipeline.

    The cyclic garbage collector is off while the config is composed and torch is imported (they
    allocate millions of long-lived objects and no garbage worth a pass), and everything alive at
    exit is frozen so that interpreter shutdown skips a last pass over it: about 0.4 s of a plain
    merge command's 3.5 s (scripts/bench_merge.py). Reference counting frees objects as always; a
    caller in the same process gets the collector back as it was.
    """
    import signal
    import threading

    was_enabled = gc.isenabled()
    gc.disable()
    _tune_malloc()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _app()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if was_enabled:
            gc.enable()


def reproduce_main(argv: list[str] | None = None) -> None:
    """``darwin-hydra-reproduce RUN_DIR``: rebuild a run's child and verify it bit for bit."""
    from darwin_hydra.reproduce import main as _reproduce

    sys.exit(_reproduce(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
