"""Heatmaps of layer-by-layer similarity matrices (matplotlib, Agg canvas: no display, no global backend change)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_similarity(
    matrix,
    *,
    layers=None,
    layers_b=None,
    title: str | None = None,
    xlabel: str = "layer",
    ylabel: str = "layer",
    undefined=None,
    annotate: bool | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "magma",
    path: str | Path | None = None,
    ax=None,
):
    """Draw a (rows x cols) similarity matrix as a heatmap, layer 0 at the bottom-left.

    Undefined entries (``undefined`` mask, or NaN) are drawn hatched grey and labelled "n/a" -- never as a
    colour that could be read as a value. ``annotate`` writes the values in the cells (default: if <= 16 x 16).
    Returns the matplotlib ``Figure``; with ``path`` it is also saved there (format from the suffix).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    m = np.asarray(getattr(matrix, "matrix", matrix), dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {m.shape}")
    und = np.isnan(m) if undefined is None else (np.asarray(undefined, bool) | np.isnan(m))
    rows = list(range(m.shape[0])) if layers is None else list(layers)
    cols = (rows if m.shape[0] == m.shape[1] and layers_b is None else list(range(m.shape[1]))) if layers_b is None else list(layers_b)
    if ax is None:
        size = max(3.5, 0.45 * max(m.shape) + 2)
        fig = Figure(figsize=(size + 1, size))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    masked = np.ma.masked_array(m, mask=und)
    finite = m[~und]
    lo = vmin if vmin is not None else (min(0.0, float(finite.min())) if finite.size else 0.0)
    hi = vmax if vmax is not None else 1.0
    ax.set_facecolor("#d0d0d0")
    im = ax.imshow(masked, origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="equal", interpolation="nearest")
    for i, j in zip(*np.nonzero(und)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#808080", linewidth=0))
    if annotate is None:
        annotate = max(m.shape) <= 16
    if annotate:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                txt = "n/a" if und[i, j] else f"{m[i, j]:.2f}"
                colour = "black" if und[i, j] or (m[i, j] - lo) > 0.6 * (hi - lo) else "white"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(m.shape[1]), [str(c) for c in cols])
    ax.set_yticks(range(m.shape[0]), [str(r) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if path is not None:
        fig.savefig(str(path), dpi=120, bbox_inches="tight")
    return fig
