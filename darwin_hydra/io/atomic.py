"""Files that appear whole or not at all: write a temporary sibling, then rename it over the target
(``rename(2)`` is atomic within a directory), so a killed process never leaves a half-written file
that looks finished."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; ``fsync`` also survives a power loss (flush, then sync
    the file before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
