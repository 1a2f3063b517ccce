"""Representation similarity on feature matrices: sample-wise cosine and the CKA family.

Every function takes two feature matrices of the *same* ``n`` samples, ``X`` (n x d1) and ``Y`` (n x d2)
(numpy arrays or torch tensors, any float dtype), computes in float64 and returns a Python float. Each
matrix is first scaled by a power of two (exact) so that its largest entry lies in [0.5, 1): any finite input,
from 1e-300 to 1e300, gives the same result as at unit scale (no square over- or underflows).

Conventions shared by all functions
-----------------------------------
* ``X~ = X - 1 mean(X)^T`` denotes column-centred features; centring happens *before* any product is formed,
  so a large common offset (real transformer features carry one of 1e3-1e4 times their spread) does not
  cancel catastrophically.
* Bad input raises: :class:`ValueError` for different sample counts, non-finite values, too few samples or
  a non-2-D array (a 1-D array raises too: pass ``x[:, None]`` for one feature per sample); :class:`TypeError`
  for non-numeric input.
* A similarity that is mathematically undefined -- CKA of a feature matrix whose columns are all constant
  (zero variance, e.g. BERT's embedding output at the CLS position), the cosine of an all-zero sample --
  raises :class:`SimilarityUndefinedError` (a ``ValueError``). A matrix counts as constant when no feature
  (column) varies beyond its own rounding: for every column j,
  ``||x~_j||^2 <= constant_rtol^2 * (||x_j||^2 + median_k ||x_k||^2)`` with
  ``constant_rtol = default_constant_rtol(input dtype)`` (float32: 3.8e-6, float64: 7.1e-15, float16: 2.0e-3,
  bfloat16: 1.6e-2). The rounding of a value is relative to that value, so each column is compared with its own
  magnitude -- not with the norm of the whole matrix, which a few large constant features (the "massive
  activations" of pretrained transformers) dominate; the median column's magnitude is a floor for columns near 0,
  whose rounding comes from the typical values they are computed from. See :func:`feature_varies`.
  No function ever returns NaN, 0 or 1 in place of an undefined value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SimilarityUndefinedError",
    "cosine",
    "linear_cka",
    "debiased_linear_cka",
    "rbf_cka",
    "hsic1",
    "minibatch_cka",
    "rank_correlation",
    "default_constant_rtol",
    "feature_varies",
    "SIMILARITY_METRICS",
    "SimilarityMetric",
    "similarity_metric",
]


class SimilarityUndefinedError(ValueError):
    """The similarity is undefined for this input (zero-variance features, zero-norm samples)."""


def default_constant_rtol(dtype: torch.dtype) -> float:
    """The relative size ``||X~||_F / ||X||_F`` below which the centred part of a feature matrix computed in
    ``dtype`` is rounding noise of that format (float64 for non-floating dtypes):

    * ``32 * eps`` for float32 / float64 (float32: 3.8e-6): the model computes in its storage precision, so
      the same constant feature recomputed in batches of other shapes (other reduction orders) can differ by
      several units in the last place;
    * ``2 * eps`` for 16-bit formats (float16: 2.0e-3, bfloat16: 1.6e-2): half-precision kernels accumulate
      in float32 and round once to the 16-bit format, so a constant feature differs by at most about one unit
      in the last place, and anything larger is real variation the format resolves. (``32 * eps`` would call
      a bfloat16 layer whose spread is 25% of its magnitude constant.)
    """
    if not dtype.is_floating_point:
        dtype = torch.float64
    eps = torch.finfo(dtype).eps
    return (2.0 if torch.finfo(dtype).bits <= 16 else 32.0) * eps


def feature_varies(centred_sq: torch.Tensor, raw_sq: torch.Tensor, rtol) -> torch.Tensor:
    """Whether a feature matrix varies beyond its own rounding, from per-column sums (last dim = columns):

        varies  <=>  exists j:  sum_i x~_ij^2  >  rtol^2 (sum_i x_ij^2 + median_k sum_i x_ik^2)

    ``centred_sq``, ``raw_sq``: (..., d) sums of squares of the centred and the raw values of each column;
    ``rtol``: a float or a tensor broadcasting against ``(...)``. Returns a bool tensor of shape ``(...)``.
    An all-zero matrix never varies."""
    raw_sq = raw_sq.to(torch.float64)
    centred_sq = centred_sq.to(torch.float64)
    floor = raw_sq.median(dim=-1, keepdim=True).values
    rtol = torch.as_tensor(rtol, dtype=torch.float64, device=raw_sq.device)
    if rtol.ndim:
        rtol = rtol[..., None]
    budget = rtol.square() * (raw_sq + floor)
    return (centred_sq > budget).any(-1) & (raw_sq.sum(-1) > 0)


def _unit_scale(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t * 2^-e (exact) with its largest |entry| in [0.5, 1), and e; all-zero t is returned as is (e = 0)."""
    top = t.abs().max() if t.numel() else torch.zeros((), dtype=t.dtype)
    if top == 0:
        return t, 0
    e = int(torch.frexp(top).exponent)
    return torch.ldexp(t, torch.tensor(-e, dtype=torch.int64)), e


def _as_matrix(x, name: str) -> tuple[torch.Tensor, torch.dtype]:
    """Validate one feature matrix and return (float64 tensor (n, d), original dtype)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(f"{name}: expected a numeric array or tensor of shape (n, d), got {type(x).__name__}") from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"{name}: expected a numeric array or tensor of shape (n, d), got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise TypeError(f"{name}: complex features are not supported (got {t.dtype})")
    orig_dtype = t.dtype
    if t.ndim == 1:
        raise ValueError(
            f"{name}: expected a 2-D feature matrix (n_samples, n_features), got a 1-D array of shape {tuple(t.shape)}; "
            f"for one feature per sample pass {name}[:, None]"
        )
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D feature matrix (n_samples, n_features), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: feature matrix has no features (shape {tuple(t.shape)})")
    t = t.to(dtype=torch.float64, device="cpu")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} non-finite value(s) (NaN or inf); similarity needs finite features")
    return t, orig_dtype


def _pair(X, Y, min_n: int = 2, exponents: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.dtype, torch.dtype]:
    """Both matrices validated, in float64, each scaled by a power of two to max |entry| in [0.5, 1)
    (the exponents are appended to ``exponents`` when given)."""
    x, dx = _as_matrix(X, "X")
    y, dy = _as_matrix(Y, "Y")
    x, ex = _unit_scale(x)
    y, ey = _unit_scale(y)
    if exponents is not None:
        exponents.extend([ex, ey])
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and Y must hold the same samples: got {x.shape[0]} rows in X and {y.shape[0]} rows in Y"
        )
    if x.shape[0] < min_n:
        raise ValueError(f"need at least {min_n} samples, got {x.shape[0]}")
    return x, y, dx, dy


def _center_checked(x: torch.Tensor, dtype: torch.dtype, name: str, constant_rtol: float | None) -> torch.Tensor:
    """Column-centre x (float64) and raise SimilarityUndefinedError if it is constant (no column varies beyond
    its own rounding, :func:`feature_varies`)."""
    xc = x - x.mean(dim=0, keepdim=True)
    rtol = default_constant_rtol(dtype) if constant_rtol is None else constant_rtol
    if not bool(feature_varies(xc.square().sum(0), x.square().sum(0), rtol)):
        raise SimilarityUndefinedError(
            f"{name} has constant (zero-variance) features across the {x.shape[0]} samples: CKA is undefined "
            "(0/0). This happens e.g. for a transformer's embedding output at a fixed-token position such as CLS."
        )
    return xc


def cosine(X, Y, center: bool = False) -> float:
    """Sample-wise cosine similarity (Jiang et al., ICLR 2025):

        COS(X, Y) = (1/n) sum_i <x_i, y_i> / (||x_i|| ||y_i||)

    with ``x_i``, ``y_i`` the i-th rows. ``center=True`` first subtracts each matrix's column mean (over the
    n samples). Needs ``d1 == d2``. Raises :class:`SimilarityUndefinedError` if a sample has zero norm
    (with ``center=True``: if no entry of the centred sample exceeds the rounding of the raw value,
    :func:`feature_varies` applied to the sample), e.g. every sample of a constant layer after centring.
    """
    x, y, dx, dy = _pair(X, Y, min_n=1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cosine needs features of the same width, got {x.shape[1]} and {y.shape[1]}")
    out = []
    for name, m, dt in (("X", x, dx), ("Y", y, dy)):
        raw_m = m
        if center:
            mean = m.mean(dim=0, keepdim=True)
            m = m - mean
            raw_m = (raw_m.square() + mean.square()).sqrt()  # the operands of the subtraction set its rounding
        # every row scaled by its own power of two: rows of very different magnitude neither over- nor underflow
        top = m.abs().amax(dim=1)
        e = torch.where(top > 0, torch.frexp(top).exponent, torch.zeros_like(top, dtype=torch.int32)).to(torch.int64)
        m = torch.ldexp(m, -e[:, None])
        norms = torch.linalg.vector_norm(m, dim=1)
        if center:
            raw_m = torch.ldexp(raw_m, -e[:, None])
            tiny = ~feature_varies(m.square(), raw_m.square(), default_constant_rtol(dt))
        else:
            tiny = norms == 0
        if bool(tiny.any()):
            raise SimilarityUndefinedError(
                f"cosine: {int(tiny.sum())} sample(s) of {name} have zero norm"
                + (" after centring (constant features)" if center else "")
                + "; the cosine of a zero vector is undefined"
            )
        out.append(m / norms[:, None])
    return float((out[0] * out[1]).sum(dim=1).mean())


def _hsic_biased_feature(xc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
    """||Y~^T X~||_F^2 = tr(K~ L~) for linear kernels, computed in the cheaper of feature or sample space."""
    n, d1 = xc.shape
    d2 = yc.shape[1]
    if n * n * (d1 + d2 + 1) < n * d1 * d2:  # Gram space is cheaper (n small)
        return ((xc @ xc.T) * (yc @ yc.T)).sum()
    return (yc.T @ xc).square().sum()


def linear_cka(X, Y, constant_rtol: float | None = None) -> float:
    """Linear CKA (Kornblith et al., 2019):

        CKA(X, Y) = ||Y~^T X~||_F^2 / (||X~^T X~||_F ||Y~^T Y~||_F)

    in [0, 1]; invariant to orthogonal transforms and isotropic scaling of either side.
    Raises :class:`SimilarityUndefinedError` for constant features.
    """
    x, y, dx, dy = _pair(X, Y, min_n=2)
    xc = _center_checked(x, dx, "X", constant_rtol)
    yc = _center_checked(y, dy, "Y", constant_rtol)
    hxy = _hsic_biased_feature(xc, yc)
    hxx = _hsic_biased_feature(xc, xc)
    hyy = _hsic_biased_feature(yc, yc)
    return float(hxy / torch.sqrt(hxx * hyy))


def _debiased_hsic_from_features(xc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
    """Unnormalised debiased HSIC of linear kernels on centred features (Kornblith et al. 2019: U-centring
    written in feature space; proportional to <K_U, L_U> with a factor that depends on n only):

        H(X, Y) = ||Y~^T X~||_F^2 - n/(n-2) sum_i ||x~_i||^2 ||y~_i||^2
                  + ||X~||_F^2 ||Y~||_F^2 / ((n-1)(n-2))
    """
    return _debiased_hsic_terms(xc, yc).sum()


def _debiased_hsic_terms(xc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
    """The three terms of :func:`_debiased_hsic_from_features` (their sum is H; their magnitudes bound its
    rounding error)."""
    n = xc.shape[0]
    rx = xc.square().sum(dim=1)
    ry = yc.square().sum(dim=1)
    return torch.stack([_hsic_biased_feature(xc, yc), -n / (n - 2) * (rx @ ry), rx.sum() * ry.sum() / ((n - 1) * (n - 2))])


def debiased_linear_cka(X, Y, constant_rtol: float | None = None) -> float:
    """Debiased linear CKA: CKA computed with the unbiased HSIC estimator (U-centred Gram matrices,
    Song et al. 2012; Kornblith et al. 2019 ``debiased=True``):

        dCKA = H(X, Y) / sqrt(H(X, X) H(Y, Y)),
        H(X, Y) = ||Y~^T X~||_F^2 - n/(n-2) sum_i ||x~_i||^2 ||y~_i||^2 + ||X~||_F^2 ||Y~||_F^2 / ((n-1)(n-2))

    which equals <K_U, L_U> / (||K_U||_F ||L_U||_F) with U-centred linear Grams K_U, L_U. Needs n >= 4.
    Can be (slightly) negative for unrelated features; lies in [-1, 1].
    """
    x, y, dx, dy = _pair(X, Y, min_n=4)
    xc = _center_checked(x, dx, "X", constant_rtol)
    yc = _center_checked(y, dy, "Y", constant_rtol)
    tx, ty = _debiased_hsic_terms(xc, xc), _debiased_hsic_terms(yc, yc)
    hxx, hyy = tx.sum(), ty.sum()
    eps = torch.finfo(torch.float64).eps
    # H(X, X) is a difference of terms: below 64 eps of their size it is rounding noise, i.e. 0
    if hxx <= 64 * eps * tx.abs().sum() or hyy <= 64 * eps * ty.abs().sum():
        raise SimilarityUndefinedError(
            "debiased CKA is undefined: the U-centred Gram matrix of "
            + ("X" if hxx <= 0 else "Y")
            + " is zero (too few distinct samples)"
        )
    return float(_debiased_hsic_from_features(xc, yc) / torch.sqrt(hxx * hyy))


def _u_center(k: torch.Tensor) -> torch.Tensor:
    """U-centring of a Gram matrix (Song et al. 2012; Kornblith et al. 2019, center_gram(unbiased=True))."""
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0)
    means = k.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[:, None] - means[None, :]
    k.fill_diagonal_(0)
    return k


def _rbf_gram(xc: torch.Tensor, sigma: float, name: str) -> torch.Tensor:
    sq = xc.square().sum(dim=1)
    size = sq[:, None] + sq[None, :]
    d2 = (size - 2.0 * (xc @ xc.T)).clamp_min(0.0)
    d2[d2 <= 64 * torch.finfo(d2.dtype).eps * size] = 0.0  # rounding noise of the expansion: duplicate samples
    d2.fill_diagonal_(0.0)
    # np.median over all n^2 entries incl. the zero diagonal (mean of the two middle values), as Kornblith et al.
    med = float(np.median(d2.cpu().numpy()))
    if med <= 0:
        raise SimilarityUndefinedError(
            f"rbf_cka: the median squared distance between samples of {name} is 0 (mostly duplicate samples); "
            "the median-heuristic bandwidth is undefined"
        )
    return torch.exp(-d2 / (2.0 * sigma**2 * med))


def rbf_cka(X, Y, sigma: float = 1.0, debiased: bool = False, constant_rtol: float | None = None) -> float:
    """RBF-kernel CKA (Kornblith et al. 2019):

        K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2 m_X)),  m_X = median of the n^2 squared distances
        (bandwidth = sigma * median distance; the median is over the full matrix incl. its zero diagonal,
        exactly as the reference implementation), CKA = <HKH, HLH> / (||HKH||_F ||HLH||_F),
        H = I - 11^T/n; ``debiased=True`` uses U-centring instead (needs n >= 4).

    Costs O(n^2) memory: for whole datasets use the streamed linear CKA.
    """
    if not (isinstance(sigma, (int, float)) and sigma > 0 and np.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    x, y, dx, dy = _pair(X, Y, min_n=4 if debiased else 2)
    xc = _center_checked(x, dx, "X", constant_rtol)
    yc = _center_checked(y, dy, "Y", constant_rtol)
    k = _rbf_gram(xc, sigma, "X")
    l = _rbf_gram(yc, sigma, "Y")  # noqa: E741
    if debiased:
        k, l = _u_center(k), _u_center(l)  # noqa: E741
    else:
        k = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
        l = l - l.mean(0, keepdim=True) - l.mean(1, keepdim=True) + l.mean()  # noqa: E741
    return float((k * l).sum() / (torch.linalg.norm(k) * torch.linalg.norm(l)))


def _hsic1_grams(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC_1 for batched Gram matrices k (A, n, n), l (B, n, n) -> (A, B), all pairs.

        HSIC_1(K, L) = [tr(K^ L^) + (1^T K^ 1)(1^T L^ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K^ L^ 1] / (n(n-3))

    with K^, L^ the Grams with zeroed diagonal (Song et al. 2012).
    """
    n = k.shape[-1]
    k = k.clone()
    l = l.clone()  # noqa: E741
    k.diagonal(dim1=-2, dim2=-1).zero_()
    l.diagonal(dim1=-2, dim2=-1).zero_()
    tr = torch.einsum("aij,bij->ab", k, l)  # symmetric: tr(K L) = sum_ij K_ij L_ij
    rk = k.sum(dim=-1)  # (A, n) row sums
    rl = l.sum(dim=-1)
    sk = rk.sum(dim=-1)
    sl = rl.sum(dim=-1)
    return (tr + torch.outer(sk, sl) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk @ rl.T)) / (n * (n - 3))


def _hsic1_size(k: torch.Tensor) -> torch.Tensor:
    """(A,) the sizes of the terms of HSIC_1(K, K) for batched Grams k (A, n, n): HSIC_1(K, K) below 64 eps of
    this is rounding noise of their difference, i.e. 0."""
    n = k.shape[-1]
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    rk = k.sum(dim=-1)
    tr = k.square().sum(dim=(-2, -1))
    return (tr + rk.sum(-1).square() / ((n - 1) * (n - 2)) + 2.0 / (n - 2) * rk.square().sum(-1)) / (n * (n - 3))


def hsic1(X, Y) -> float:
    """Unbiased HSIC_1 (Song et al. 2012) of the linear kernels of X and Y (needs n >= 4; can be negative).

        HSIC_1 = [tr(K^ L^) + (1^T K^ 1)(1^T L^ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K^ L^ 1] / (n(n-3)),
        K = X X^T, L = Y Y^T with zeroed diagonals.

    The estimator is invariant to translating X or Y, so the features are centred first (numerically safer).
    """
    exps: list[int] = []
    x, y, _, _ = _pair(X, Y, min_n=4, exponents=exps)
    xc = x - x.mean(0, keepdim=True)
    yc = y - y.mean(0, keepdim=True)
    h = _hsic1_grams((xc @ xc.T)[None], (yc @ yc.T)[None])[0, 0]
    out = float(torch.ldexp(h, torch.tensor(2 * (exps[0] + exps[1]), dtype=torch.int64)))  # undo the scaling
    if not np.isfinite(out):
        raise ValueError(f"hsic1: the value ({float(h)!r} x 2^{2 * (exps[0] + exps[1])}) is outside the float64 range")
    return out


def minibatch_cka(X, Y, batch_size: int, drop_last: bool = False, constant_rtol: float | None = None) -> float:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021): with consecutive minibatches b = 1..B of the rows,

        CKA_mb = mean_b HSIC_1(K_b, L_b) / sqrt(mean_b HSIC_1(K_b, K_b) * mean_b HSIC_1(L_b, L_b)).

    Every minibatch needs >= 4 samples: a trailing batch of 1-3 rows raises ``ValueError`` unless
    ``drop_last=True`` (then it is left out). Undefined (raises) when X or Y is constant.
    """
    if not isinstance(batch_size, int) or batch_size < 4:
        raise ValueError(f"minibatch_cka needs batch_size >= 4 (HSIC_1 needs 4 samples), got {batch_size!r}")
    x, y, dx, dy = _pair(X, Y, min_n=4)
    _center_checked(x, dx, "X", constant_rtol)
    _center_checked(y, dy, "Y", constant_rtol)
    n = x.shape[0]
    tail = n % batch_size
    if 0 < tail < 4 and not drop_last:
        raise ValueError(
            f"minibatch_cka: the last minibatch would have {tail} sample(s) (n={n}, batch_size={batch_size}); "
            "HSIC_1 needs at least 4. Pass drop_last=True or choose another batch_size."
        )
    sxy = sxx = syy = 0.0
    size = torch.zeros(2, dtype=torch.float64)
    nb = 0
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if xb.shape[0] < 4:
            continue
        xb = xb - xb.mean(0, keepdim=True)
        yb = yb - yb.mean(0, keepdim=True)
        grams = torch.stack([xb @ xb.T, yb @ yb.T])
        h = _hsic1_grams(grams, grams)
        sxx, sxy, syy = sxx + h[0, 0], sxy + h[0, 1], syy + h[1, 1]
        size += _hsic1_size(grams)
        nb += 1
    tiny = 64 * torch.finfo(torch.float64).eps * size  # below that, HSIC_1(K, K) is rounding noise, i.e. 0
    if nb == 0 or sxx <= tiny[0] or syy <= tiny[1]:
        raise SimilarityUndefinedError(
            "minibatch CKA is undefined: mean HSIC_1(K, K) of " + ("X" if nb == 0 or sxx <= tiny[0] else "Y") + " is not positive"
        )
    return float(sxy / torch.sqrt(sxx * syy))


def rank_correlation(a, b) -> float:
    """Spearman rank correlation between two square layer-by-layer similarity matrices over their
    off-diagonal upper triangle (entries (k, l), k < l), e.g. cosine vs CKA. Entries that are NaN
    (undefined) in either matrix are left out. Raises ValueError if fewer than 3 entries remain or
    one matrix is constant there (the correlation would be undefined).
    """
    from scipy.stats import spearmanr

    a = np.asarray(getattr(a, "matrix", a), dtype=np.float64)
    b = np.asarray(getattr(b, "matrix", b), dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape != b.shape:
        raise ValueError(f"rank_correlation needs two square matrices of the same shape, got {a.shape} and {b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)
    va, vb = a[iu], b[iu]
    keep = np.isfinite(va) & np.isfinite(vb)
    va, vb = va[keep], vb[keep]
    if va.size < 3:
        raise ValueError(f"rank_correlation needs >= 3 defined off-diagonal entries, got {va.size}")
    if np.ptp(va) == 0 or np.ptp(vb) == 0:
        raise ValueError("rank_correlation is undefined: one matrix is constant over the off-diagonal entries")
    return float(spearmanr(va, vb).statistic)


def _check_sequence(blocks, name: str) -> Sequence:
    if isinstance(blocks, (torch.Tensor, np.ndarray)) or not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise TypeError(f"{name}: expected a non-empty list of feature matrices, got {type(blocks).__name__}")
    return blocks


# ---------------------------------------------------------------------------------------------- the metric table


@dataclass(frozen=True)
class SimilarityMetric:
    """One similarity metric under one name everywhere: the function on two feature matrices, the
    ``layer_similarity(metric=...)`` value and the ``evaluate`` configuration of ``hf_align/metrics/cka``.

    ``streamed``: whether :func:`hf_align.layer_similarity` computes it exactly in one streamed pass
    (RBF CKA needs all n^2 sample pairs, so it is for feature matrices only). ``aliases``: older / short
    names that keep working."""

    name: str
    function: Callable
    streamed: bool
    aliases: tuple[str, ...]
    summary: str


SIMILARITY_METRICS: dict[str, SimilarityMetric] = {
    m.name: m
    for m in (
        SimilarityMetric("cosine", cosine, True, (), "sample-wise cosine (1/n) sum_i <x_i, y_i>/(||x_i|| ||y_i||)"),
        SimilarityMetric("linear_cka", linear_cka, True, ("cka", "linear"), "linear CKA ||Y~^T X~||_F^2/(||X~^T X~||_F ||Y~^T Y~||_F)"),
        SimilarityMetric("debiased_linear_cka", debiased_linear_cka, True, ("debiased_cka", "debiased"),
                         "linear CKA with the unbiased HSIC_1 estimator (U-centred Grams)"),
        SimilarityMetric("minibatch_cka", minibatch_cka, True, ("minibatch",), "mean HSIC_1 over minibatches (Nguyen et al.)"),
        SimilarityMetric("rbf_cka", rbf_cka, False, ("rbf",), "RBF-kernel CKA, bandwidth sigma * median distance"),
    )
}


def similarity_metric(name: str) -> SimilarityMetric:
    """The :class:`SimilarityMetric` called ``name`` (its canonical name or an alias), or a ValueError listing
    the names."""
    if isinstance(name, str):
        if name in SIMILARITY_METRICS:
            return SIMILARITY_METRICS[name]
        for metric in SIMILARITY_METRICS.values():
            if name in metric.aliases:
                return metric
    names = ", ".join(f"{m.name!r}" + (f" (or {', '.join(map(repr, m.aliases))})" if m.aliases else "") for m in SIMILARITY_METRICS.values())
    raise ValueError(f"unknown similarity metric {name!r}; expected one of {names}")
