"""Fault injection for the tests that kill runs at chosen points (tests/test_faults.py,
scripts/fault_inject.py). Off unless ``DARWIN_HYDRA_FAULT`` is set."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def fault_point(where: str) -> None:
    """Test hook of the fault-injection suite (tests/test_faults.py, scripts/fault_inject.py): with
    ``DARWIN_HYDRA_FAULT=<where>[:<n>[:TERM]]`` in the environment, the process sends itself SIGKILL
    (or SIGTERM) the n-th time (default the 1st) it passes ``where``. One dict lookup otherwise.
    Points: ``stage:<name>`` (a stage starts), ``scan`` (between the static and the probe scan),
    ``trial`` (inside a search trial, its child merged, not yet scored), ``export`` (the first tensor of
    the child written), ``report`` (benchmark.json written, report.md not yet)."""
    spec = os.environ.get("DARWIN_HYDRA_FAULT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point == "stage":  # stage:<name>[:n[:TERM]]
        name, _, rest = rest.partition(":")
        point = f"stage:{name}"
    if point != where:
        return
    nth, _, how = rest.partition(":")
    count = _FAULT_COUNTS[where] = _FAULT_COUNTS.get(where, 0) + 1
    if count == int(nth or 1):
        import signal

        sig = signal.SIGTERM if how.upper() == "TERM" else signal.SIGKILL
        log.warning("fault injection: %s at %s (pass %d)", sig.name, where, count)
        os.kill(os.getpid(), sig)


_FAULT_COUNTS: dict[str, int] = {}
