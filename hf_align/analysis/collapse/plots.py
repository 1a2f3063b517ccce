"""Plots of collapse metrics through depth."""

from __future__ import annotations

from collections.abc import Sequence

from .report import CollapseReport


def plot_collapse_progression(
    report: CollapseReport,
    path: str | None = None,
    keys: Sequence[str] | None = None,
):
    """One panel per metric against depth (log scale for NC1 and CDNV); saved to ``path`` if given. Returns the
    matplotlib ``Figure`` (made without pyplot: no global backend change). Undefined layers are NaN: gaps.
    Default ``keys``: NC1, the NC2 ETF distance and equinorm of the means, NC3 (Zhu), GNC3, NC4; for a token-level
    report of a causal LM NC1, CDNV, the mean GNC2 margin of the means, GNC3 and equinorm, each balanced and
    frequency-weighted (dashed) where the report has both."""
    from matplotlib.figure import Figure

    token = report.pooling == "token"
    if keys is None:
        keys = (("nc1", "cdnv", "gnc2_means_margin_mean", "gnc3", "equinorm") if token else
                ("nc1", "nc2_means_etf_distance", "nc2_means_equinorm", "nc3_zhu", "gnc3", "nc4"))

    keys = [k for k in keys if any(k in m or k + "_freq" in m for m in report.per_layer)]
    if not keys:
        raise ValueError("the report has none of the requested metrics")
    fig = Figure(figsize=(3.2 * len(keys), 3.0))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        if any(key in m for m in report.per_layer):
            ax.plot(report.layers, report.series(key), marker="o", label="balanced" if token else None)
        if token and any(key + "_freq" in m for m in report.per_layer):
            ax.plot(report.layers, report.series(key + "_freq"), marker=".", linestyle="--", label="frequency-weighted")
            ax.legend(fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("layer (0 = embeddings)")
        if key.startswith(("nc1", "cdnv")):
            vals = [v for v in report.series(key) if v == v]
            if vals and min(vals) > 0:
                ax.set_yscale("log")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
