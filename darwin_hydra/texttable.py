"""Plain-text tables for logs (the MRI summary, the memory plan), drawn by ``rich``."""

from __future__ import annotations

import io
from typing import Iterable, Sequence


def text_table(columns: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """``rows`` under ``columns`` as plain text (no colour, no box lines besides the header rule), every
    line indented by two spaces; ``right[i]``: align column i to the right (default: all but the last)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    right = list(right) if right is not None else [True] * (len(columns) - 1) + [False]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    for name, r in zip(columns, right):
        table.add_column(name, justify="right" if r else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    out = io.StringIO()
    Console(file=out, width=400, color_system=None, force_terminal=False, legacy_windows=False).print(table)
    return "\n".join("  " + ln.rstrip() for ln in out.getvalue().splitlines() if ln.strip())
