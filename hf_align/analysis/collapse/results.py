"""The report types of the collapse analysis (:class:`CollapseReport`, its warning) and the undefined-layer rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..similarity import feature_varies
from .statistics import ClassStatistics

__all__ = ["CollapseReport", "UndefinedCollapseWarning"]


class UndefinedCollapseWarning(UserWarning):
    """Some layers' collapse metrics are undefined (constant features, equal class means); they are NaN and
    listed in ``CollapseReport.undefined_layers``."""


@dataclass
class CollapseReport:
    """Collapse metrics of the features after every selected layer (0 = embeddings output).

    ``per_layer[i]`` holds the metrics of ``layers[i]`` (``nc1``, ``nc1_papyan``, ``nc2_means_*``, and with a
    classifier of the feature width ``nc3_papyan``, ``nc3_zhu``, ``gnc3``; ``nc4`` when the model has a head
    and ``nc4=True``); NaN for the layers in ``undefined_layers`` (reasons in ``undefined_reasons``).
    ``classifier`` holds the metrics of the head's final linear weight W (``nc2_W_*``, ``tammes_max_cosine``,
    ``gnc2_margin``), which do not depend on the layer. ``features`` is ``"head"`` or ``"hidden"``;
    ``pooling`` is ``"head"`` for head features (the head pools as the model does)."""

    layers: list[int]
    per_layer: list[dict[str, float]]
    classifier: dict[str, float]
    num_samples: int
    num_classes: int
    pooling: str
    statistics: list[ClassStatistics] = field(repr=False, default_factory=list)
    features: str = "hidden"
    undefined_layers: list[int] = field(default_factory=list)
    undefined_reasons: dict[int, str] = field(default_factory=dict)

    def series(self, key: str) -> list[float]:
        return [m.get(key, float("nan")) for m in self.per_layer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "per_layer": self.per_layer,
            "classifier": self.classifier,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "pooling": self.pooling,
            "features": self.features,
            "undefined_layers": self.undefined_layers,
            "undefined_reasons": {str(k): v for k, v in self.undefined_reasons.items()},
        }


def _undefined_reason(stats: ClassStatistics, sumsq: np.ndarray, rtol: float, dtype: torch.dtype) -> str | None:
    """Why the collapse metrics of one layer are undefined, or None.

    Constant: no column j varies beyond its own rounding (``feature_varies``), with the per-column centred sums
    N Sigma_T[j, j] = N Sigma_W[j, j] + sum_k n_k (mu_k - mu)_j^2 and the raw sums ``sumsq[j] = sum_i h_ij^2``."""
    n = stats.counts.astype(np.float64)
    means = stats.means()
    mu = (n[:, None] * means).sum(0) / n.sum()
    total = np.diag(stats.within_class_covariance()) * n.sum() + (n[:, None] * (means - mu) ** 2).sum(0)
    if not bool(feature_varies(torch.from_numpy(np.maximum(total, 0.0)), torch.from_numpy(np.asarray(sumsq, dtype=np.float64)), rtol)):
        return (
            f"constant features: their centred part is within the resolution of {str(dtype).replace('torch.', '')} "
            f"(no feature varies by more than {rtol:.3g} of its own magnitude)"
        )
    if not np.any(stats.between_class_covariance()):
        return "all class means are equal (Sigma_B = 0)"
    return None
