"""Neural-collapse metrics: NC1-NC4 and generalized collapse (GNC2, GNC3, Tammes) for K >> d classes.

Notation (PAPERS.md section 4): N samples h_i in R^d with labels y_i in {0..K-1}; class means mu_k; global
mean mu_G (by default the mean of the class means, as in Zhu et al. 2021 and Jiang et al. 2024; Papyan et
al. 2020 use the mean of all samples — identical for balanced classes; pass ``global_mean="samples"``);
centered means M~ = [mu_k - mu_G]_k (K x d); classifier rows w_k (W is K x d).

* NC1 = tr(Sigma_W Sigma_B^+) / K with Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T and
  Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T (Zhu et al. 2021; Jiang et al. 2024). Papyan et al.'s
  published code reports tr(Sigma_W Sigma_B^+) without the 1/K (``convention="papyan"``).
* NC2 (simplex ETF, meaningful for K <= d+1) for V = W or V = M~: equinorm CoV std(||v_k||)/mean(||v_k||)
  (std with ddof=1, as Papyan's code), equiangularity sum_{k!=k'} |cos(v_k, v_k') + 1/(K-1)| / (K(K-1)),
  the std of the off-diagonal cosines (Papyan's figure), and the ETF distance
  || V V^T/||V V^T||_F - (I_K - 11^T/K)/sqrt(K-1) ||_F (Zhu et al.).
* NC3 (self-duality): Papyan || W^T/||W||_F - M~^T/||M~||_F ||_F^2, Zhu
  || W M~^T/||W M~^T||_F - (I_K - 11^T/K)/sqrt(K-1) ||_F.
* NC4: fraction of samples where the nearest-class-center rule argmin_k ||h - mu_k|| disagrees with the
  network's prediction (Papyan et al.).
* GNC2 (one-vs-rest margin, "softmax code", Jiang et al. 2024) of the row-normalised classifier:
  rho(W) = min_k dist(w_k, conv{w_j : j != k}) = min_k max_{||h||<=1} min_{j!=k} <w_k - w_j, h>, solved
  *exactly* with a certificate per class (:func:`gnc2`).
* GNC3 (duality): (1/K) sum_k [1 - cos(w_k, mu_k - mu_G)].
* Tammes quantity: max_{j!=k} cos(w_j, w_k) (the smallest pairwise angle is its arccos).

Package layout: ``statistics`` (:class:`ClassStatistics`), ``passes`` (blocked K x K passes), ``nc`` (NC1-NC4,
GNC3, Tammes, :func:`collapse_metrics`), ``gnc2`` (certified GNC2), ``report`` (:func:`collapse_report`),
``plots``, ``tokens`` (:func:`token_collapse_report`: causal LMs, the vocabulary as the classes).

Features of any size are measured without holding them: :class:`ClassStatistics` accumulates counts,
means and the within-class scatter over batches in float64 with per-class shifts, merges, and reduces
across processes with ``torch.distributed``. Nothing here depends on a model except
:func:`collapse_report`, which goes through :class:`hf_align.layers.LayerView`.
"""

from __future__ import annotations

from .gnc2 import GNC2Result, gnc2, gnc2_projected_gradient
from .nc import (
    collapse_metrics,
    equiangularity,
    equinorm,
    etf_distance,
    gnc3,
    nc1,
    nc2,
    nc3_papyan,
    nc3_zhu,
    nc4,
    ncc_predict,
    tammes,
)
from .plots import plot_collapse_progression
from .report import FEATURES, CollapseReport, UndefinedCollapseWarning, collapse_report
from .statistics import ClassStatistics
from .tokens import WEIGHTINGS, TokenCollapseReport, cdnv, token_collapse_metrics, token_collapse_report, token_targets

__all__ = [
    "ClassStatistics",
    "GNC2Result",
    "nc1",
    "equinorm",
    "equiangularity",
    "etf_distance",
    "nc2",
    "nc3_papyan",
    "nc3_zhu",
    "ncc_predict",
    "nc4",
    "gnc2",
    "gnc2_projected_gradient",
    "gnc3",
    "tammes",
    "collapse_metrics",
    "CollapseReport",
    "collapse_report",
    "UndefinedCollapseWarning",
    "FEATURES",
    "plot_collapse_progression",
    "TokenCollapseReport",
    "token_collapse_report",
    "token_collapse_metrics",
    "token_targets",
    "cdnv",
    "WEIGHTINGS",
]
