"""Test support: faithful tiny Hub fixtures (``hub``), the tiny zoo (``tiny``), a throwaway PostgreSQL
(``postgres``), and the command line of an installed console script (``console_script``)."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path


def console_script(name: str) -> list[str]:
    """The command that runs console script ``name`` (``darwin-hydra``, ``darwin-hydra-worker``, ...):
    the script beside this interpreter, or, where it is not installed there, its entry point run by
    this interpreter."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    (ep,) = entry_points(group="console_scripts", name=name)
    return [sys.executable, "-c", f"from {ep.module} import {ep.attr}; {ep.attr}()"]
