"""The reports of ``hf-align analyze`` / ``evaluate``: report.md (markdown sections and tables) and report.json."""

from __future__ import annotations

import json
import math
import os

__all__ = ["collapse_markdown", "finite", "layer_accuracy_markdown", "matrix_markdown", "write_report"]


def finite(x):
    """JSON-safe: NaN/inf -> None, numpy -> lists."""
    import numpy as np

    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return finite(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(folder: str, title: str, sections: list[str], data: dict) -> None:
    with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n" + "\n\n".join(sections) + "\n")
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
        json.dump(finite(data), f, indent=2)


def matrix_markdown(matrix, labels) -> str:
    head = "| | " + " | ".join(labels) + " |"
    rule = "| --- |" + " ---: |" * len(labels)
    rows = [f"| {labels[i]} | " + " | ".join("n/a" if v != v else f"{v:.3f}" for v in row) + " |" for i, row in enumerate(matrix)]
    return "\n".join([head, rule, *rows])


def layer_accuracy_markdown(accuracy) -> str:
    """The accuracy of every block (1-based) as a markdown table."""
    return "| block | accuracy |\n| ---: | ---: |\n" + "\n".join(f"| {l} | {100 * a:.2f}% |" for l, a in enumerate(accuracy, 1))


def collapse_markdown(result) -> str:
    """The main collapse metrics of a :class:`~hf_align.analysis.collapse.CollapseReport`, one row per layer."""
    keys = [k for k in ("nc1", "nc2_means_etf_distance", "nc2_means_equinorm", "nc3_zhu", "nc4") if k in result.per_layer[0]]
    rows = ["| layer | " + " | ".join(keys) + " |", "| ---: |" + " ---: |" * len(keys)]
    rows += [f"| {layer} | " + " | ".join(f"{m[k]:.4g}" for k in keys) + " |"
             for layer, m in zip(result.layers, result.per_layer)]
    return "\n".join(rows)


def token_collapse_markdown(result) -> str:
    """The main token-level collapse metrics (balanced, and frequency-weighted ``_freq``) one row per layer, and the
    LM head's margins."""
    keys = [k for k in ("nc1", "nc1_freq", "cdnv", "cdnv_freq", "gnc2_means_margin", "gnc2_means_margin_mean",
                        "gnc3", "gnc3_freq", "equinorm") if any(k in m for m in result.per_layer)]
    rows = ["| layer | " + " | ".join(keys) + " |", "| ---: |" + " ---: |" * len(keys)]
    rows += [f"| {layer} | " + " | ".join(f"{m.get(k, float('nan')):.4g}" for k in keys) + " |"
             for layer, m in zip(result.layers, result.per_layer)]
    head = ", ".join(f"{k} {v:.4g}" for k, v in result.classifier.items())
    return "\n".join(rows) + (f"\n\nLM head: {head}." if head else "")
