"""A check's matrix as a heatmap PNG (``--plot FILE``), drawn from the same grid as the text table.

matplotlib is optional (``pip install 'launcher[plot]'``); ``available`` lets
the command line refuse ``--plot`` before anything starts.
"""

from __future__ import annotations

import importlib.util
import os

from ..check import CheckMatrix, grid, title

INSTALL_HINT = "pip install 'launcher[plot]' (or: pip install matplotlib)"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_heatmap(matrix: CheckMatrix, path: str) -> None:
    """Colour: the cell's value (darker: slower); failed cells red and marked, unprobed ones grey."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window: the head may have no display
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    g = grid(matrix)
    values = [[c.value if c.value is not None and not c.failed else float("nan") for c in row] for row in g.cells]
    # Bandwidth: more is better; latency: less is better. Keep "good" light in both.
    cmap = plt.get_cmap("viridis" if g.unit == "MB/s" else "viridis_r").copy()
    cmap.set_bad("#dddddd")
    side = max(4.0, 0.45 * len(g.column_labels) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    try:
        image = ax.imshow(values, cmap=cmap, aspect="equal")
        fig.colorbar(image, ax=ax, label=g.unit, shrink=0.8)
        red = ListedColormap(["#d62728"])
        failed = [[1.0 if c.failed else float("nan") for c in row] for row in g.cells]
        ax.imshow(failed, cmap=red, aspect="equal", vmin=0, vmax=1)
        if len(g.column_labels) <= 16:
            for i, row in enumerate(g.cells):
                for j, cell in enumerate(row):
                    if cell.probed:
                        ax.text(j, i, cell.text(), ha="center", va="center", fontsize=8, color=_ink(cell, image))
        ax.set_xticks(range(len(g.column_labels)), g.column_labels, rotation=90 if len(g.column_labels) > 8 else 0)
        ax.set_yticks(range(len(g.row_labels)), g.row_labels)
        reader = "reader" if matrix.transfer_bytes else "from"
        ax.set_xlabel("read from" if matrix.transfer_bytes else "to")
        ax.set_ylabel(f"{reader} ({g.by})")
        ax.set_title(title(matrix), fontsize=9)
        fig.tight_layout()
        tmp = f"{path}.tmp{os.getpid()}"
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)  # a reader never sees half a file
    finally:
        plt.close(fig)


def _ink(cell, image) -> str:
    """White on a dark cell, black on a light one."""
    if cell.failed or cell.value is None:
        return "white" if cell.failed else "black"
    r, g, b, _ = image.cmap(image.norm(cell.value))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
