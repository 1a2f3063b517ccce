"""NC1-NC4, GNC3, the Tammes quantity, and every metric at once (:func:`collapse_metrics`); formulas in the package docstring."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._checks import _check_classes, _labels, _matrix, _normalize_rows, _unit
from .gnc2 import gnc2, initial_candidates
from .passes import _block_rows, _cosine_summary, _etf_distance_pair
from .statistics import ClassStatistics


def nc1(stats: ClassStatistics, *, convention: str = "zhu", global_mean: str = "classes") -> float:
    """NC1 = tr(Sigma_W Sigma_B^+) / K (``convention="zhu"``, Zhu et al. 2021 / Jiang et al. 2024), or
    tr(Sigma_W Sigma_B^+) (``"papyan"``: Papyan et al.'s code omits the 1/K). Sigma_B^+ is the
    Moore-Penrose pseudo-inverse (``numpy.linalg.pinv``, hermitian), so K <= d (rank K-1) works.
    0 iff the features are perfectly collapsed onto their class means."""
    if not isinstance(stats, ClassStatistics):
        raise TypeError(f"nc1 expects a ClassStatistics (see ClassStatistics.update), got {type(stats).__name__}")
    if convention not in ("zhu", "papyan"):
        raise ValueError(f"convention must be 'zhu' or 'papyan', got {convention!r}")
    sw = stats.within_class_covariance()
    sb = stats.between_class_covariance(global_mean)
    if not np.any(sb):
        raise ValueError("all class means are equal (Sigma_B = 0): NC1 is undefined")
    value = float(np.trace(sw @ np.linalg.pinv(sb, hermitian=True)))
    return value / stats.num_classes if convention == "zhu" else value


def equinorm(V: Any) -> float:
    """Equinorm coefficient of variation std_k(||v_k||) / mean_k(||v_k||), std with ddof=1 (Papyan's code,
    ``torch.std``). 0 iff all rows have equal norm."""
    (V,) = _unit(_matrix(V, "V"))
    _check_classes(V.shape[0], "equinorm")
    norms = np.linalg.norm(V, axis=1)
    if norms.mean() == 0:
        raise ValueError("all rows of V are zero: equinorm is undefined")
    return float(norms.std(ddof=1) / norms.mean())


def equiangularity(V: Any, *, precision: str = "auto") -> float:
    """sum_{k != k'} |cos(v_k, v_k') + 1/(K-1)| / (K (K-1)) (Papyan's "shifted" equiangularity, the form in
    Jiang et al.); 0 iff the rows are the vertices of a simplex ETF. Computed in row blocks (memory O(K))."""
    Vn = _normalize_rows(_matrix(V, "V"), "V")
    K = Vn.shape[0]
    _check_classes(K, "equiangularity")
    return _cosine_summary(Vn, precision=precision).abs_shift_sum / (K * (K - 1))


def etf_distance(V: Any) -> float:
    """NC2 ETF distance || V V^T/||V V^T||_F - (I_K - 11^T/K)/sqrt(K-1) ||_F (Zhu et al. 2021); 0 iff the
    rows of V form a simplex ETF (up to scale and rotation)."""
    (V,) = _unit(_matrix(V, "V"))
    _check_classes(V.shape[0], "etf_distance")
    return _etf_distance_pair(V, V)


def nc2(V: Any, *, precision: str = "auto") -> dict[str, float]:
    """All NC2 quantities of the rows of V (W, or the centered class means): ``equinorm``, ``equiangularity``,
    ``cosine_std`` (std with ddof=1 of the K(K-1)/2 off-diagonal cosines, Papyan), ``max_cosine`` and
    ``etf_distance``. One blocked pass over the cosines."""
    (V,) = _unit(_matrix(V, "V"))
    K = V.shape[0]
    _check_classes(K, "nc2")
    Vn = _normalize_rows(V, "V")
    s = _cosine_summary(Vn, precision=precision)
    n = K * (K - 1)
    mean = s.sum / n
    var = (s.sum_sq - n * mean * mean) / (n - 2) if n > 2 else 0.0  # ddof=1 over the n/2 unordered pairs
    return {
        "equinorm": equinorm(V),
        "equiangularity": s.abs_shift_sum / n,
        "cosine_std": math.sqrt(max(var, 0.0)),
        "max_cosine": s.max,
        "etf_distance": _etf_distance_pair(V, V),
    }


def nc3_papyan(W: Any, centered_means: Any) -> float:
    """NC3 (Papyan et al.): || W^T/||W||_F - M~^T/||M~||_F ||_F^2 (squared, as in their code)."""
    W = _matrix(W, "W")
    M = _matrix(centered_means, "centered_means", rows=W.shape[0], cols=W.shape[1])
    (W,), (M,) = _unit(W), _unit(M)
    nw, nm = np.linalg.norm(W), np.linalg.norm(M)
    if nw == 0 or nm == 0:
        raise ValueError("W or the centered means are all zero: NC3 is undefined")
    return float(np.sum((W / nw - M / nm) ** 2))


def nc3_zhu(W: Any, centered_means: Any) -> float:
    """NC3 (Zhu et al. 2021): || W M~^T/||W M~^T||_F - (I_K - 11^T/K)/sqrt(K-1) ||_F."""
    W = _matrix(W, "W")
    M = _matrix(centered_means, "centered_means", rows=W.shape[0], cols=W.shape[1])
    _check_classes(W.shape[0], "nc3_zhu")
    (W,), (M,) = _unit(W), _unit(M)
    return _etf_distance_pair(W, M)


# ----------------------------------------------------------------------------------------------------------
# NC4
# ----------------------------------------------------------------------------------------------------------


def ncc_predict(features: Any, means: Any) -> np.ndarray:
    """Nearest-class-center rule argmin_k ||h - mu_k||^2 = argmax_k (<h, mu_k> - ||mu_k||^2/2), in blocks."""
    M = _matrix(means, "means")
    X = _matrix(features, "features", cols=M.shape[1])
    X, M = _unit(X, M)  # one common power of two: the argmin is unchanged
    half = 0.5 * np.einsum("kd,kd->k", M, M)
    out = np.empty(X.shape[0], dtype=np.int64)
    b = _block_rows(M.shape[0], 8)
    for s in range(0, X.shape[0], b):
        out[s : s + b] = np.argmax(X[s : s + b] @ M.T - half, axis=1)
    return out


def nc4(features: Any, means: Any, predictions: Any) -> float:
    """NC4 (Papyan et al.): fraction of samples whose nearest-class-center class differs from the network's
    prediction, (1/N) sum_i [argmin_k ||h_i - mu_k|| != yhat_i]."""
    M = _matrix(means, "means")
    X = _matrix(features, "features", cols=M.shape[1])
    p = _labels(predictions, X.shape[0], M.shape[0], "predictions")
    if X.shape[0] == 0:
        raise ValueError("nc4 needs at least one sample")
    return float(np.mean(ncc_predict(X, M) != p))


# ----------------------------------------------------------------------------------------------------------
# GNC3, Tammes
# ----------------------------------------------------------------------------------------------------------


def gnc3(W: Any, centered_means: Any) -> float:
    """GNC3 (Jiang et al. 2024, duality): (1/K) sum_k [1 - cos(w_k, mu_k - mu_G)]; 0 iff each classifier
    row points along its centered class mean."""
    W = _matrix(W, "W")
    M = _matrix(centered_means, "centered_means", rows=W.shape[0], cols=W.shape[1])
    Wn = _normalize_rows(W, "W")
    Mn = _normalize_rows(M, "centered_means")
    return float(np.mean(1.0 - np.einsum("kd,kd->k", Wn, Mn)))


def tammes(W: Any, *, precision: str = "auto") -> dict[str, Any]:
    """The Tammes quantity max_{j != k} cos(w_j, w_k) (largest pairwise cosine of the rows; smaller is
    better) with the pair and the minimum angle arccos of it in degrees."""
    Wn = _normalize_rows(_matrix(W, "W"), "W")
    _check_classes(Wn.shape[0], "tammes")
    s = _cosine_summary(Wn, neighbors=1, precision=precision)
    return {"max_cosine": s.max, "pair": s.argmax, "min_angle_deg": math.degrees(math.acos(min(1.0, s.max)))}


# ----------------------------------------------------------------------------------------------------------
# everything at once
# ----------------------------------------------------------------------------------------------------------


def collapse_metrics(
    stats: ClassStatistics | None = None,
    W: Any = None,
    *,
    features: Any = None,
    predictions: Any = None,
    global_mean: str = "classes",
    gnc2_margin: bool = True,
    precision: str = "auto",
) -> dict[str, Any]:
    """All collapse metrics that the inputs allow, in one dict.

    From ``stats`` (:class:`ClassStatistics`): ``nc1`` (Zhu, /K), ``nc1_papyan``, ``nc2_means_*`` (for the
    centered means). From ``W`` (K x d): ``nc2_W_*``, ``tammes_max_cosine``, ``gnc2_margin`` (exact,
    :func:`gnc2`). From both: ``nc3_papyan``, ``nc3_zhu``, ``gnc3``. With ``features`` and the network's
    ``predictions`` as well: ``nc4`` (NCC mismatch rate)."""
    out: dict[str, Any] = {}
    if stats is None and W is None:
        raise ValueError("collapse_metrics needs ClassStatistics, a classifier W, or both")
    Mc = None
    if stats is not None:
        if not isinstance(stats, ClassStatistics):
            raise TypeError(f"stats must be a ClassStatistics, got {type(stats).__name__}")
        out["nc1"] = nc1(stats, convention="zhu", global_mean=global_mean)
        out["nc1_papyan"] = out["nc1"] * stats.num_classes
        Mc = stats.centered_means(global_mean)
        for key, v in nc2(Mc, precision=precision).items():
            out[f"nc2_means_{key}"] = v
    if W is not None:
        W = _matrix(W, "W")
        _check_classes(W.shape[0], "collapse_metrics")
        Wn = _normalize_rows(W, "W")
        K, d = W.shape
        s = _cosine_summary(Wn, neighbors=initial_candidates(K, d) if gnc2_margin else 1, precision=precision)
        n = K * (K - 1)
        mean = s.sum / n
        var = (s.sum_sq - n * mean * mean) / (n - 2) if n > 2 else 0.0
        out.update(
            {
                "nc2_W_equinorm": equinorm(W),
                "nc2_W_equiangularity": s.abs_shift_sum / n,
                "nc2_W_cosine_std": math.sqrt(max(var, 0.0)),
                "nc2_W_etf_distance": _etf_distance_pair(W, W),
                "tammes_max_cosine": s.max,
            }
        )
        if gnc2_margin:
            out["gnc2_margin"] = gnc2(Wn, neighbors=s.neighbors, precision=precision).margin
        if Mc is not None:
            if Mc.shape != W.shape:
                raise ValueError(f"W has shape {W.shape} but the class means have shape {Mc.shape}")
            out["nc3_papyan"] = nc3_papyan(W, Mc)
            out["nc3_zhu"] = nc3_zhu(W, Mc)
            out["gnc3"] = gnc3(W, Mc)
    if features is not None or predictions is not None:
        if stats is None or features is None or predictions is None:
            raise ValueError("nc4 needs stats (for the class means), features and predictions together")
        out["nc4"] = nc4(features, stats.means(), predictions)
    return out
