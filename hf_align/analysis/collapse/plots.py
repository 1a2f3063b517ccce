"""Plots of collapse metrics through depth."""

from __future__ import annotations

from collections.abc import Sequence

from .report import CollapseReport


def plot_collapse_progression(
    report: CollapseReport,
    path: str | None = None,
    keys: Sequence[str] = ("nc1", "nc2_means_etf_distance", "nc2_means_equinorm", "nc3_zhu", "gnc3", "nc4"),
):
    """One panel per metric against depth (log scale for NC1); saved to ``path`` if given. Returns the
    matplotlib ``Figure`` (made without pyplot: no global backend change). Undefined layers are NaN: gaps."""
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(k in m for m in report.per_layer)]
    if not keys:
        raise ValueError("the report has none of the requested metrics")
    fig = Figure(figsize=(3.2 * len(keys), 3.0))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(report.layers, report.series(key), marker="o")
        ax.set_title(key)
        ax.set_xlabel("layer (0 = embeddings)")
        if key.startswith("nc1"):
            vals = [v for v in report.series(key) if v == v]
            if vals and min(vals) > 0:
                ax.set_yscale("log")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
