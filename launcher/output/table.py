"""A plain-text table, columns two spaces apart: the one formatter of every table launcher prints."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[str]], right: bool = False) -> str:
    """Columns two spaces apart, each as wide as its widest cell; ``right`` aligns numbers."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if right else c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
