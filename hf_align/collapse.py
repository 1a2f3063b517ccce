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

Features of any size are measured without holding them: :class:`ClassStatistics` accumulates counts,
means and the within-class scatter over batches in float64 with per-class shifts, merges, and reduces
across processes with ``torch.distributed``. Nothing here depends on a model except
:func:`collapse_report`, which goes through :class:`hf_align.layers.LayerView`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import lsq_linear, nnls

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
    "plot_collapse_progression",
]

# Direct K x K computations up to this K; above it the O(K d^2) closed forms (see etf_distance).
_DIRECT_MAX_K = 4096
# Blocked K x K passes in float64 up to this K; above it float32 with explicit error bounds ("auto").
_FLOAT64_MAX_K = 20000


# ----------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be an array or a torch tensor, got {type(x).__name__}") from e


def _matrix(x: Any, name: str, *, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """A finite float64 (n, d) matrix, or a clear error."""
    a = _to_numpy(x, name)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x features), got shape {tuple(a.shape)}")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got {a.shape[0]}")
    if cols is not None and a.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got {a.shape[1]}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} contains NaN or infinite values (first at index {tuple(int(i) for i in bad)})")
    return a


def _labels(y: Any, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    a = _to_numpy(y, name)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one entry per row ({n}), got shape {tuple(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        bad = a[(a < 0) | (a >= num_classes)][0]
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}), got {int(bad)}")
    return a


def _check_classes(k: int, what: str = "the metric") -> None:
    if k < 2:
        raise ValueError(f"{what} needs at least 2 classes, got {k}")


def _normalize_rows(V: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(V, axis=1)
    zero = np.flatnonzero(norms <= 0)
    if zero.size:
        raise ValueError(
            f"{name} has {zero.size} zero row(s) (first: row {int(zero[0])}); a zero classifier row / class mean "
            "has no direction, so cosines and the normalised margin are undefined"
        )
    return V / norms[:, None]


# ----------------------------------------------------------------------------------------------------------
# streaming class statistics
# ----------------------------------------------------------------------------------------------------------


class ClassStatistics:
    """Counts, class means and within-class scatter of features, accumulated over batches in float64.

    Shifted sums avoid cancellation: each class k keeps a fixed shift c_k (the first sample of k that was
    seen), and the accumulator holds

        n_k,   S_k = sum_{i: y_i = k} (h_i - c_k)   (K x d),   Q = sum_i (h_i - c_{y_i})(h_i - c_{y_i})^T  (d x d).

    Then mu_k = c_k + S_k / n_k and
    N Sigma_W = sum_k sum_{y_i=k} (h_i - mu_k)(h_i - mu_k)^T = Q - sum_k S_k S_k^T / n_k,
    where both terms are of the size of the within-class spread (not of ||mu_k||^2), so perfectly collapsed
    features give Sigma_W = 0 exactly. Memory is O(K d + d^2), independent of N.

    ``merge(other)`` adds another accumulator (re-expressing its sums about this one's shifts);
    ``reduce()`` sums over all processes with ``torch.distributed.all_reduce`` when a process group is
    initialised (every process ends with the global statistics), and does nothing otherwise.
    """

    def __init__(self, num_classes: int, dim: int | None = None):
        if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        _check_classes(int(num_classes), "ClassStatistics")
        self.num_classes = int(num_classes)
        self.dim: int | None = None
        if dim is not None:
            self._allocate(int(dim))

    def _allocate(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        K = self.num_classes
        self.dim = dim
        self.counts = np.zeros(K, dtype=np.int64)
        self.shift = np.zeros((K, dim), dtype=np.float64)
        self.sums = np.zeros((K, dim), dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)

    # -- accumulation --------------------------------------------------------------------------------------

    def update(self, features: Any, labels: Any) -> ClassStatistics:
        """Add a batch: ``features`` (n, d), ``labels`` (n,) integers in [0, K)."""
        X = _matrix(features, "features", cols=self.dim)
        y = _labels(labels, X.shape[0], self.num_classes)
        if self.dim is None:
            self._allocate(X.shape[1])
        if X.shape[0] == 0:
            return self
        # classes seen for the first time: shift = their first sample in this batch
        new = np.unique(y[self.counts[y] == 0])
        if new.size:
            order = np.argsort(y, kind="stable")
            first = order[np.searchsorted(y[order], new)]
            self.shift[new] = X[first]
        D = X - self.shift[y]  # (n, d), small: h_i - c_{y_i}
        sums = torch.from_numpy(self.sums)
        sums.index_add_(0, torch.from_numpy(y), torch.from_numpy(D))
        self.counts += np.bincount(y, minlength=self.num_classes)
        self.scatter += D.T @ D
        return self

    def _reshift(self, new_shift: np.ndarray) -> None:
        """Express the sums about ``new_shift`` (K x d): with e_k = c_k - c'_k,
        S'_k = S_k + n_k e_k and Q' = Q + sum_k (S_k e_k^T + e_k S_k^T + n_k e_k e_k^T)."""
        e = self.shift - new_shift
        n = self.counts.astype(np.float64)[:, None]
        cross = self.sums.T @ e
        self.scatter += cross + cross.T + (e * n).T @ e
        self.sums += n * e
        self.shift = new_shift.copy()

    def merge(self, other: ClassStatistics) -> ClassStatistics:
        """Add the statistics of ``other`` (same K and d) into this accumulator and return it."""
        if not isinstance(other, ClassStatistics):
            raise TypeError(f"can only merge a ClassStatistics, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge statistics of {other.num_classes} classes into {self.num_classes}")
        if other.dim is None:
            return self
        if self.dim is None:
            self._allocate(other.dim)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge features of dim {other.dim} into dim {self.dim}")
        o = other.copy()
        mine = self.counts > 0
        target = np.where(mine[:, None], self.shift, o.shift)
        o._reshift(target)
        self.shift = target
        self.counts += o.counts
        self.sums += o.sums
        self.scatter += o.scatter
        return self

    def copy(self) -> ClassStatistics:
        c = ClassStatistics(self.num_classes)
        if self.dim is not None:
            c._allocate(self.dim)
            c.counts[:] = self.counts
            c.shift[:] = self.shift
            c.sums[:] = self.sums
            c.scatter[:] = self.scatter
        return c

    def reduce(self, group: Any = None) -> ClassStatistics:
        """Sum the statistics of all processes (``torch.distributed``, any backend that supports float64
        all_reduce, e.g. gloo). Shifts are first agreed on (the pooled class means), then counts, shifted
        sums and scatter are all-reduced. A no-op when no process group is initialised."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.dim is None:
            raise ValueError("reduce() needs the feature dim on every process: pass dim= or update() first")
        n = torch.from_numpy(self.counts.astype(np.float64))
        raw = torch.from_numpy(self.counts[:, None] * self.shift + self.sums)  # approximate raw sums
        dist.all_reduce(n, group=group)
        dist.all_reduce(raw, group=group)
        total = n.numpy()
        common = np.where(total[:, None] > 0, raw.numpy() / np.maximum(total, 1)[:, None], 0.0)
        self._reshift(common)
        for arr in (self.sums, self.scatter):
            t = torch.from_numpy(arr)
            dist.all_reduce(t, group=group)
        self.counts = total.round().astype(np.int64)
        return self

    # -- results ---------------------------------------------------------------------------------------------

    def _require(self) -> None:
        if self.dim is None or self.counts.sum() == 0:
            raise ValueError("ClassStatistics is empty: call update(features, labels) first")
        empty = np.flatnonzero(self.counts == 0)
        if empty.size:
            shown = ", ".join(str(int(k)) for k in empty[:10]) + (" ..." if empty.size > 10 else "")
            raise ValueError(
                f"{empty.size} of {self.num_classes} classes have no samples (classes {shown}); "
                "class means and collapse metrics need every class"
            )

    @property
    def num_samples(self) -> int:
        return 0 if self.dim is None else int(self.counts.sum())

    def means(self) -> np.ndarray:
        """Class means mu_k (K x d), float64."""
        self._require()
        return self.shift + self.sums / self.counts[:, None]

    def global_mean(self, kind: str = "classes") -> np.ndarray:
        """mu_G: ``"classes"`` = mean of the class means (Zhu, Jiang), ``"samples"`` = mean of all samples
        (Papyan's code)."""
        M = self.means()
        if kind == "classes":
            return M.mean(axis=0)
        if kind == "samples":
            return (self.counts[:, None] * M).sum(axis=0) / self.counts.sum()
        raise ValueError(f"global_mean must be 'classes' or 'samples', got {kind!r}")

    def centered_means(self, kind: str = "classes") -> np.ndarray:
        """M~ = mu_k - mu_G (K x d)."""
        return self.means() - self.global_mean(kind)[None, :]

    def within_class_covariance(self) -> np.ndarray:
        """Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T = (Q - sum_k S_k S_k^T / n_k) / N."""
        self._require()
        S = self.sums / np.sqrt(self.counts)[:, None]
        sw = (self.scatter - S.T @ S) / self.counts.sum()
        return (sw + sw.T) / 2

    def between_class_covariance(self, kind: str = "classes") -> np.ndarray:
        """Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T."""
        Mc = self.centered_means(kind)
        return Mc.T @ Mc / self.num_classes

    def __repr__(self) -> str:
        return f"ClassStatistics(num_classes={self.num_classes}, dim={self.dim}, num_samples={self.num_samples})"


def _statistics_from(features: Any, labels: Any, num_classes: int | None) -> ClassStatistics:
    X = _matrix(features, "features")
    y_raw = _to_numpy(labels, "labels")
    if num_classes is None:
        if y_raw.size == 0:
            raise ValueError("labels is empty")
        num_classes = int(np.max(y_raw)) + 1
    return ClassStatistics(num_classes, X.shape[1]).update(X, y_raw)


# ----------------------------------------------------------------------------------------------------------
# NC1
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# blocked K x K passes
# ----------------------------------------------------------------------------------------------------------


def _pass_dtype(K: int, precision: str) -> type:
    if precision == "float64":
        return np.float64
    if precision == "float32":
        return np.float32
    if precision == "auto":
        return np.float64 if K <= _FLOAT64_MAX_K else np.float32
    raise ValueError(f"precision must be 'auto', 'float64' or 'float32', got {precision!r}")


def _block_rows(K: int, itemsize: int, budget_bytes: int = 64 << 20) -> int:
    return int(max(16, min(K, budget_bytes // max(1, K * itemsize))))


@dataclass
class _CosineSummary:
    abs_shift_sum: float  # sum_{k != k'} |cos + 1/(K-1)|
    sum: float  # sum_{k != k'} cos
    sum_sq: float  # sum_{k != k'} cos^2
    max: float  # max_{k != k'} cos (refined in float64)
    argmax: tuple[int, int]
    neighbors: np.ndarray | None  # (K, m) indices of the m largest cosines of each row (self excluded)


def _cosine_summary(Vn: np.ndarray, *, neighbors: int = 0, precision: str = "auto", sums: bool = True) -> _CosineSummary:
    """One blocked pass over the K x K cosine matrix of unit rows ``Vn``; memory O(block * K).

    One (block x K) buffer is reused for every block (no per-block allocations: at K = 100,000 those page
    faults cost more than the arithmetic). ``sums=False`` skips the cosine sums (only neighbours/maximum).
    """
    K, d = Vn.shape
    dt = _pass_dtype(K, precision)
    V = torch.from_numpy(np.ascontiguousarray(Vn, dtype=dt))
    m = min(max(neighbors, 1), K - 1)
    shift = 1.0 / (K - 1)
    b = _block_rows(K, np.dtype(dt).itemsize)
    abs_sum = s1 = s2 = 0.0
    nbr = np.empty((K, m), dtype=np.int64)
    buffer = torch.empty((b, K), dtype=V.dtype)
    VT = V.T
    for start in range(0, K, b):
        stop = min(K, start + b)
        G = buffer[: stop - start]
        torch.mm(V[start:stop], VT, out=G)  # (b, K)
        rows = torch.arange(stop - start)
        G[rows, rows + start] = -2.0  # mask the diagonal (cos >= -1)
        if m == 1:
            nbr[start:stop, 0] = G.argmax(dim=1).numpy()
        else:
            nbr[start:stop] = torch.topk(G, m, dim=1, sorted=True).indices.numpy()
        if not sums:
            continue
        G[rows, rows + start] = 0.0
        # row sums in the pass dtype (pairwise summation), accumulated in float64 across rows and blocks
        s1 += float(G.sum(dim=1).double().sum())
        s2 += float(torch.linalg.vector_norm(G, dim=1).double().pow(2).sum())
        G.add_(shift).abs_()
        G[rows, rows + start] = 0.0
        abs_sum += float(G.sum(dim=1).double().sum())
    # Tammes maximum refined in float64 on each row's m candidates (exact in float64 mode; in float32 mode
    # exact whenever the true maximiser is among the row's float32 top m, error bound (d+3) 2^-24 otherwise)
    Vd = Vn.astype(np.float64, copy=False)
    first = nbr[:, 0]
    c = np.einsum("kd,kd->k", Vd, Vd[first])
    if dt == np.float32 and m > 1:
        cc = np.einsum("kd,kmd->km", Vd, Vd[nbr[:, : min(m, 8)]])
        j = cc.argmax(axis=1)
        first = nbr[np.arange(K), j]
        c = cc[np.arange(K), j]
    k = int(np.argmax(c))
    return _CosineSummary(abs_sum, s1, s2, float(c[k]), (k, int(first[k])), nbr if neighbors else None)


# ----------------------------------------------------------------------------------------------------------
# NC2 / NC3
# ----------------------------------------------------------------------------------------------------------


def equinorm(V: Any) -> float:
    """Equinorm coefficient of variation std_k(||v_k||) / mean_k(||v_k||), std with ddof=1 (Papyan's code,
    ``torch.std``). 0 iff all rows have equal norm."""
    V = _matrix(V, "V")
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


def _etf_distance_pair(A: np.ndarray, B: np.ndarray) -> float:
    """|| A B^T / ||A B^T||_F - P/sqrt(K-1) ||_F, P = I_K - 11^T/K (so ||P/sqrt(K-1)||_F = 1).

    K <= 4096: formed directly in row blocks. Larger K: the O(K d^2) closed form
    dist^2 = 2 - 2 <A B^T, P>/(sqrt(K-1) ||A B^T||_F), <A B^T, P> = sum_k <a_k, b_k> - <A^T 1, B^T 1>/K,
    ||A B^T||_F^2 = <A^T A, B^T B>_F (absolute error ~1e-8 near 0, from the cancellation in 2 - 2x)."""
    K = A.shape[0]
    fro2 = float(np.sum((A.T @ A) * (B.T @ B)))
    if fro2 <= 0:
        raise ValueError("A B^T = 0: the ETF distance is undefined")
    fro = math.sqrt(fro2)
    c = 1.0 / math.sqrt(K - 1)
    if K <= _DIRECT_MAX_K:
        total = 0.0
        b = _block_rows(K, 8)
        for s in range(0, K, b):
            G = A[s : s + b] @ B.T / fro
            G += c / K  # - P/sqrt(K-1): off-diagonal +1/(K sqrt(K-1)), diagonal -(1 - 1/K)/sqrt(K-1)
            r = np.arange(G.shape[0])
            G[r, r + s] -= c
            total += float(np.sum(G * G))
        return math.sqrt(total)
    inner = (float(np.einsum("kd,kd->", A, B)) - float(A.sum(0) @ B.sum(0)) / K) * c
    return math.sqrt(max(0.0, 2.0 - 2.0 * inner / fro))


def etf_distance(V: Any) -> float:
    """NC2 ETF distance || V V^T/||V V^T||_F - (I_K - 11^T/K)/sqrt(K-1) ||_F (Zhu et al. 2021); 0 iff the
    rows of V form a simplex ETF (up to scale and rotation)."""
    V = _matrix(V, "V")
    _check_classes(V.shape[0], "etf_distance")
    return _etf_distance_pair(V, V)


def nc2(V: Any, *, precision: str = "auto") -> dict[str, float]:
    """All NC2 quantities of the rows of V (W, or the centered class means): ``equinorm``, ``equiangularity``,
    ``cosine_std`` (std with ddof=1 of the K(K-1)/2 off-diagonal cosines, Papyan), ``max_cosine`` and
    ``etf_distance``. One blocked pass over the cosines."""
    V = _matrix(V, "V")
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
    nw, nm = np.linalg.norm(W), np.linalg.norm(M)
    if nw == 0 or nm == 0:
        raise ValueError("W or the centered means are all zero: NC3 is undefined")
    return float(np.sum((W / nw - M / nm) ** 2))


def nc3_zhu(W: Any, centered_means: Any) -> float:
    """NC3 (Zhu et al. 2021): || W M~^T/||W M~^T||_F - (I_K - 11^T/K)/sqrt(K-1) ||_F."""
    W = _matrix(W, "W")
    M = _matrix(centered_means, "centered_means", rows=W.shape[0], cols=W.shape[1])
    _check_classes(W.shape[0], "nc3_zhu")
    return _etf_distance_pair(W, M)


# ----------------------------------------------------------------------------------------------------------
# NC4
# ----------------------------------------------------------------------------------------------------------


def ncc_predict(features: Any, means: Any) -> np.ndarray:
    """Nearest-class-center rule argmin_k ||h - mu_k||^2 = argmax_k (<h, mu_k> - ||mu_k||^2/2), in blocks."""
    M = _matrix(means, "means")
    X = _matrix(features, "features", cols=M.shape[1])
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
# GNC2: exact one-vs-rest margin with certificates
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GNC2Result:
    """Exact one-vs-rest margins of the row-normalised classifier W (unit rows w_k).

    For every class k the certificate is a pair of feasible points:

    * primal: convex weights a_k (``support[k]`` indices j != k, ``weights[k]``, a >= 0, sum a = 1);
      ``primal[k] = || w_k - sum_j a_j w_j ||`` >= dist(w_k, conv{w_j: j != k});
    * dual: ``directions[k] = h_k`` with ||h_k|| <= 1; ``dual[k] = min_{j != k} <w_k - w_j, h_k>`` (over ALL
      rows, evaluated in float64) <= dist.

    So ``dual[k] <= margins[k] <= primal[k]``; ``margins[k]`` is the primal value and ``gap[k] = primal - dual``
    is at most ``tol``. When w_k lies in the hull (distance 0, only for duplicated rows since unit vectors
    are extreme points of the ball) the direction is h = 0, whose dual value 0 is exact.
    """

    margin: float  # rho(W) = min_k margins
    argmin: int
    margins: np.ndarray  # (K,)
    primal: np.ndarray  # (K,)
    dual: np.ndarray  # (K,)
    directions: np.ndarray  # (K, d)
    support: list[np.ndarray]
    weights: list[np.ndarray]
    rounds: int = 0
    solves: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> np.ndarray:
        return self.primal - self.dual

    def certificate(self, k: int) -> dict[str, Any]:
        return {
            "support": self.support[k],
            "weights": self.weights[k],
            "direction": self.directions[k],
            "primal": float(self.primal[k]),
            "dual": float(self.dual[k]),
        }


def _solve_mnp(Wn: np.ndarray, k: int, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Minimum-norm point of conv{u_j = w_k - w_j : j in cand}: returns (support, weights, p, ||p||).

    Exact via the least-distance-programming reduction (Lawson & Hanson, ch. 23) to one NNLS:
    min_y>=0 || [U^T; 1^T] y - e_{d+1} ||, then a = y / sum(y) (scipy's active-set NNLS)."""
    U = Wn[k] - Wn[cand]  # (m, d)
    m, d = U.shape
    E = np.empty((d + 1, m))
    E[:d] = U.T
    E[d] = 1.0
    f = np.zeros(d + 1)
    f[d] = 1.0
    y, _ = nnls(E, f, maxiter=50 * (m + d))
    # scipy's NNLS can stop at a non-optimal point on degenerate (tied) problems: verify its KKT
    # conditions (y >= 0, gradient E^T (f - E y) <= 0) and fall back to bounded-variable least squares
    if y.min() < 0 or (E.T @ (f - E @ y)).max() > 1e-10:
        y = lsq_linear(E, f, bounds=(0, np.inf), method="bvls", tol=1e-15).x
        y[y < 0] = 0.0
    s = y.sum()
    if not s > 0:  # pragma: no cover - cannot happen (the gradient at y = 0 is -1)
        raise RuntimeError("NNLS returned y = 0 for the min-norm-point problem")
    keep = y > 0
    a = y[keep] / s
    sup = cand[keep]
    Us = U[keep]
    p = Us.T @ a
    return sup, a, p, float(np.linalg.norm(p))


def gnc2(
    W: Any,
    *,
    tol: float = 1e-6,
    candidates: int | None = None,
    add_violators: int | None = None,
    neighbors: np.ndarray | None = None,
    precision: str = "auto",
    max_rounds: int = 100,
    progress: bool = False,
) -> GNC2Result:
    """GNC2, the one-vs-rest margin of the row-normalised classifier (Jiang et al. 2024), solved exactly.

        rho(W) = min_k dist(w_k, conv{w_j : j != k}) = min_k max_{||h|| <= 1} min_{j != k} <w_k - w_j, h>,

    w_k = W_k / ||W_k||. Larger is better; for unit rows the optima are K/(K-1) (simplex ETF, K <= d+1),
    1 (cross-polytope, K = 2d), 1 - cos(2 pi/K) (regular K-gon, d = 2).

    Method (column generation with a global certificate), per class k:
      1. candidates C_k: the ``candidates`` rows with the largest <w_j, w_k> (one blocked K x K pass);
      2. exact minimum-norm point p_k of conv{w_k - w_j : j in C_k} (NNLS, see :func:`_solve_mnp`), a = weights,
         r = ||p_k||, h_k = p_k / r;
      3. check h_k against ALL rows in row blocks (one matmul per block):
         v_j = <w_k - w_j, h_k>; violators are j with v_j < r - 1e-9. The margin is certified iff there are
         none; otherwise the ``add_violators`` most violating rows join C_k, and those classes repeat.
    Since conv over C_k is a subset of the full hull, r >= dist; since h_k is feasible, min_j v_j <= dist.
    With no violators both agree, and ``dual``/``primal`` (both recomputed in float64) differ by < tol.
    The check matmul runs in float32 (unless ``precision="float64"``) and every row within the float32
    error bound 2 (d+3) 2^-24 of failing is re-evaluated in float64, so the certificate stays exact.
    ``precision`` also sets the dtype of the neighbour pass (float64 up to K = 20000 with "auto").

    Raises ValueError for a single class, NaN, or a zero row.
    """
    W = _matrix(W, "W")
    K, d = W.shape
    _check_classes(K, "gnc2")
    Wn = _normalize_rows(W, "W")
    m0 = min(K - 1, candidates if candidates is not None else max(8, d // 2))
    nv = add_violators if add_violators is not None else max(8, d // 4)
    if neighbors is None or neighbors.shape[1] < m0:
        neighbors = _cosine_summary(Wn, neighbors=m0, precision=precision, sums=False).neighbors
    # the check runs in float32 with an explicit error bound (exact in float64 afterwards) unless asked not to
    dt = np.float64 if precision == "float64" else np.float32
    Wt = torch.from_numpy(np.ascontiguousarray(Wn, dtype=dt))
    err32 = 0.0 if dt == np.float64 else 2.0 * (d + 3) * 2.0**-24

    margins = np.zeros(K)
    primal = np.zeros(K)
    dual = np.full(K, np.nan)
    H = np.zeros((K, d))
    support: list[np.ndarray] = [np.empty(0, np.int64)] * K
    weights: list[np.ndarray] = [np.empty(0)] * K
    cand: list[np.ndarray] = [neighbors[k, :m0] for k in range(K)]
    active = np.arange(K)
    solves = 0
    rounds = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=K, desc="gnc2 certified")
    while active.size:
        rounds += 1
        if rounds > max_rounds:
            raise RuntimeError(f"gnc2: {active.size} classes not certified after {max_rounds} rounds")
        for k in active:
            sup, a, p, r = _solve_mnp(Wn, int(k), cand[k])
            solves += 1
            support[k], weights[k], primal[k] = sup, a, r
            H[k] = p / r if r > 1e-12 else 0.0
        # check against all rows, in blocks (one matmul per block)
        still: list[np.ndarray] = []
        b = _block_rows(K, np.dtype(dt).itemsize)
        buffer = torch.empty((min(b, active.size), K), dtype=Wt.dtype)  # reused by every block
        for s in range(0, active.size, b):
            ks = active[s : s + b]
            Hk = H[ks]
            r = primal[ks]
            own = np.einsum("bd,bd->b", Wn[ks], Hk)  # <w_k, h_k> in float64
            scores = buffer[: ks.size]
            torch.mm(torch.from_numpy(Hk.astype(dt)), Wt.T, out=scores)  # (b, K): <w_j, h_k>
            scores[torch.arange(ks.size), torch.from_numpy(ks)] = -math.inf
            # v_j = own - <w_j, h_k> < r (+ the float32 error bound)  <=>  scores >= own - r - err
            thr = torch.from_numpy((own - r - err32 - 1e-9).astype(dt))
            rows, cols = (scores >= thr[:, None]).nonzero(as_tuple=True)
            rows, cols = rows.numpy(), cols.numpy()
            v = own[rows] - np.einsum("nd,nd->n", Wn[cols], Hk[rows])  # exact float64 re-evaluation
            zero = r <= 1e-12  # w_k in the hull of its candidates: distance 0, h = 0 is exact
            dual[ks] = np.where(zero, 0.0, np.inf)
            np.minimum.at(dual, ks[rows[~zero[rows]]], v[~zero[rows]])
            bad = (v < r[rows] - 1e-9) & ~zero[rows]
            if bad.any():
                rows_b, cols_b, v_b = rows[bad], cols[bad], v[bad]
                order = np.lexsort((v_b, rows_b))  # by row, most violating first
                rows_b, cols_b = rows_b[order], cols_b[order]
                starts = np.flatnonzero(np.r_[True, rows_b[1:] != rows_b[:-1]])
                ends = np.r_[starts[1:], rows_b.size]
                for a0, a1 in zip(starts, ends):
                    k = int(ks[rows_b[a0]])
                    # rows already among the candidates can only "violate" by the solver's rounding: the
                    # certificate gap (checked below against tol) decides; the candidate set only grows,
                    # so the loop terminates
                    fresh = cols_b[a0:a1][~np.isin(cols_b[a0:a1], cand[k])][:nv]
                    if fresh.size:
                        cand[k] = np.concatenate([cand[k], fresh])
                        still.append(np.array([k]))
        if bar is not None:
            bar.update(active.size - len(still))
        active = np.concatenate(still) if still else np.empty(0, np.int64)
    if bar is not None:
        bar.close()
    # recompute both certificate values in float64 from the certificate itself
    for k in range(K):
        p = Wn[k] - weights[k] @ Wn[support[k]]
        primal[k] = float(np.linalg.norm(p))
    margins = primal.copy()
    gap = primal - dual
    if np.any(gap > tol):
        worst = int(np.argmax(gap))
        raise RuntimeError(f"gnc2 certificate gap {gap[worst]:.3g} > tol={tol} at class {worst}")
    k = int(np.argmin(margins))
    return GNC2Result(
        margin=float(margins[k]),
        argmin=k,
        margins=margins,
        primal=primal,
        dual=dual,
        directions=H,
        support=support,
        weights=weights,
        rounds=rounds,
        solves=solves,
        stats={"precision": np.dtype(dt).name, "candidates": m0, "add_violators": nv},
    )


def gnc2_projected_gradient(
    W: Any, classes: Sequence[int] | None = None, *, iterations: int = 10000, lr: float | None = None, batch: int = 16
) -> dict[str, np.ndarray]:
    """Reference approach (as in Jiang et al.'s code): for each class k, projected gradient descent on
    f(a) = ||w_k - sum_{j != k} a_j w_j||^2 over the probability simplex, a fixed number of iterations,
    step 1/L with L = 2 ||W||_2^2, Euclidean simplex projection (sort-based). Returns per class the
    distance at the last iterate (an upper bound on the true distance). Batched over classes in torch
    float64. Used as the baseline in benchmarks/collapse_scale.py."""
    Wn = _normalize_rows(_matrix(W, "W"), "W")
    K, _ = Wn.shape
    cls = np.arange(K) if classes is None else np.asarray(classes, dtype=np.int64)
    Wt = torch.from_numpy(Wn)
    L = 2.0 * float(np.linalg.norm(Wn, 2)) ** 2
    step = 1.0 / L if lr is None else lr
    out = np.empty(cls.size)
    for s in range(0, cls.size, batch):
        ks = torch.from_numpy(cls[s : s + batch])
        B = ks.numel()
        mask = torch.ones(B, K, dtype=torch.bool)
        mask[torch.arange(B), ks] = False
        a = mask.double() / (K - 1)
        target = Wt[ks]
        for _ in range(iterations):
            r = a @ Wt - target  # (B, d) = -(w_k - V^T a)
            a = a - step * 2.0 * (r @ Wt.T)
            a = a.masked_fill(~mask, -1e30)
            # projection onto the simplex (Duchi et al. 2008)
            u, _ = torch.sort(a, dim=1, descending=True)
            css = u.cumsum(1) - 1.0
            idx = torch.arange(1, K + 1, dtype=a.dtype)
            cond = (u - css / idx) > 0
            rho = (cond * idx).argmax(1, keepdim=True)  # last index where the condition holds
            theta = css.gather(1, rho) / (rho + 1).to(a.dtype)
            a = (a - theta).clamp_min(0.0)
        out[s : s + B] = torch.linalg.vector_norm(target - a @ Wt, dim=1).numpy()
    return {"classes": cls, "margins": out}


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
        want = min(K - 1, max(8, d // 2))
        s = _cosine_summary(Wn, neighbors=want if gnc2_margin else 1, precision=precision)
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


# ----------------------------------------------------------------------------------------------------------
# per-layer report over a model (through the layer view)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CollapseReport:
    """Collapse metrics of the pooled features after every selected layer (0 = embeddings output).

    ``per_layer[i]`` holds the metrics of ``layers[i]`` (``nc1``, ``nc1_papyan``, ``nc2_means_*``, and with a
    classifier of matching width ``nc3_papyan``, ``nc3_zhu``, ``gnc3``; ``nc4`` with ``nc4=True``);
    ``classifier`` holds the metrics of the head's final linear weight W (``nc2_W_*``, ``tammes_max_cosine``,
    ``gnc2_margin``), which do not depend on the layer."""

    layers: list[int]
    per_layer: list[dict[str, float]]
    classifier: dict[str, float]
    num_samples: int
    num_classes: int
    pooling: str
    statistics: list[ClassStatistics] = field(repr=False, default_factory=list)

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
        }


def _iter_batches(data: Any, batch_size: int) -> Iterable[dict[str, Any]]:
    """Batches (dicts of tensors) from a DataLoader / iterable of dict batches, a ``datasets.Dataset`` or a
    list of example dicts."""
    from torch.utils.data import DataLoader, default_collate

    if isinstance(data, DataLoader):
        yield from data
        return
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            ds = data.with_format("torch")
            for s in range(0, len(ds), batch_size):
                yield ds[s : s + batch_size]
            return
    except ImportError:  # pragma: no cover
        pass
    if isinstance(data, Sequence) and len(data) and isinstance(data[0], dict):
        for s in range(0, len(data), batch_size):
            yield default_collate(list(data[s : s + batch_size]))
        return
    if isinstance(data, dict):
        raise TypeError("data must be a dataset, a list of examples or an iterable of batches, not one dict batch")
    yield from data


def _pool(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None) -> torch.Tensor:
    """One feature per labelled sample: the analysis poolings except ``"tokens"``."""
    from .analysis.pooling import pool

    if pooling not in ("cls", "mean", "last"):
        raise ValueError(f"pooling must be 'cls', 'mean' or 'last' (one feature per labelled sample), got {pooling!r}")
    return pool(hidden, mask, pooling)


@torch.no_grad()
def collapse_report(
    model: Any,
    data: Any,
    *,
    labels_key: str = "labels",
    pooling: str = "cls",
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    num_classes: int | None = None,
    nc4: bool = True,
    gnc2_margin: bool = True,
    global_mean: str = "classes",
    progress: bool = False,
) -> CollapseReport:
    """Neural collapse through depth: features after each layer (pooled at the first/CLS token, or the mean
    over the attention mask) are streamed into one :class:`ClassStatistics` per layer; then every metric of
    :func:`collapse_metrics` is computed per layer, with W = the weight of the model's final linear classifier
    (``LayerView.classifier``) when its width equals the feature width.

    ``nc4=True`` makes a second pass over ``data`` (the class means must be known first): NC4 at layer l is
    the rate at which the nearest-class-center rule on layer-l features disagrees with the model's own final
    prediction (Papyan et al.'s definition, evaluated at every depth).

    Note: for heads with a pooler (BERT) or a dense layer before the classifier (RoBERTa), W lives in that
    layer's output space, not in the space of the hidden states; NC3/GNC3 then compare two different spaces.
    """
    from .layers import LayerView

    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    view = model if isinstance(model, LayerView) else LayerView(model)
    L = view.num_layers
    chosen = list(range(L + 1)) if layers is None else [int(x) for x in layers]
    for x in chosen:
        if not 0 <= x <= L:
            raise ValueError(f"layers must lie in [0, {L}] (0 = embeddings), got {x}")
    if num_classes is None:
        num_classes = getattr(view.hf_model.config, "num_labels", None)
        if view.task == "causal-lm" or num_classes is None:
            raise ValueError("pass num_classes= (could not read config.num_labels)")
    K = int(num_classes)
    stats = [ClassStatistics(K) for _ in chosen]
    dev = view.device

    def run(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any], tuple[torch.Tensor, ...]]:
        if not isinstance(batch, dict) or labels_key not in batch:
            keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"each batch must be a dict with the labels under {labels_key!r}; got {keys}")
        batch = dict(batch)
        y = torch.as_tensor(batch.pop(labels_key))
        inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return y, inputs, view.hidden_states(**inputs)

    batches = _iter_batches(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="collapse: statistics")
    for batch in batches:
        y, inputs, hs = run(batch)
        mask = inputs.get("attention_mask")
        for s, l in zip(stats, chosen):
            s.update(_pool(hs[l], pooling, mask).double().cpu(), y)
    W = None
    try:
        W = view.classifier.weight.detach().double().cpu().numpy()
    except (ValueError, AttributeError):
        W = None
    D = stats[0].dim
    classifier: dict[str, float] = {}
    if W is not None and W.shape[0] == K and W.shape[1] == D:
        classifier = collapse_metrics(None, W, gnc2_margin=gnc2_margin)
    else:
        W = None
    per_layer = []
    for s in stats:
        m = collapse_metrics(s, None, global_mean=global_mean)
        if W is not None:
            Mc = s.centered_means(global_mean)
            m.update(nc3_papyan=nc3_papyan(W, Mc), nc3_zhu=nc3_zhu(W, Mc), gnc3=gnc3(W, Mc))
        per_layer.append(m)
    if nc4:
        means = [s.means() for s in stats]
        wrong = np.zeros(len(chosen))
        n = 0
        for batch in _iter_batches(data, batch_size):
            _, inputs, hs = run(batch)
            pred = view.head(hs[-1], **inputs).argmax(-1).cpu().numpy()
            if pred.ndim != 1:
                raise ValueError("nc4 needs one prediction per sample (a classification head)")
            mask = inputs.get("attention_mask")
            for i, l in enumerate(chosen):
                feats = _pool(hs[l], pooling, mask).double().cpu().numpy()
                wrong[i] += np.sum(ncc_predict(feats, means[i]) != pred)
            n += pred.shape[0]
        for i, m in enumerate(per_layer):
            m["nc4"] = float(wrong[i] / n)
    return CollapseReport(chosen, per_layer, classifier, stats[0].num_samples, K, pooling, stats)


def plot_collapse_progression(
    report: CollapseReport,
    path: str | None = None,
    keys: Sequence[str] = ("nc1", "nc2_means_etf_distance", "nc2_means_equinorm", "nc3_zhu", "gnc3", "nc4"),
):
    """One panel per metric against depth (log scale for NC1); saved to ``path`` if given (matplotlib, Agg).
    Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in m for m in report.per_layer)]
    if not keys:
        raise ValueError("the report has none of the requested metrics")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
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
