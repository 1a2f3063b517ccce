"""Streaming class statistics: counts, class means and within-class scatter in float64 (mergeable, reducible)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...data.labels import IGNORE_INDEX
from ._checks import _check_classes, _labels, _matrix

__all__ = ["ClassStatistics"]


class ClassStatistics:
    """Counts, class means and within-class scatter of features, accumulated over batches in float64.

    Shifted sums avoid cancellation: each class k keeps a fixed shift c_k (the first sample of k that was
    seen), and the accumulator holds

        n_k,   S_k = sum_{i: y_i = k} (h_i - c_k)   (K x d),   Q = sum_i (h_i - c_{y_i})(h_i - c_{y_i})^T  (d x d),
        q_k = sum_{i: y_i = k} ||h_i - c_k||^2   (K).

    Then mu_k = c_k + S_k / n_k and
    N Sigma_W = sum_k sum_{y_i=k} (h_i - mu_k)(h_i - mu_k)^T = Q - sum_k S_k S_k^T / n_k,
    where both terms are of the size of the within-class spread (not of ||mu_k||^2), so perfectly collapsed
    features give Sigma_W = 0 exactly; likewise each class's own variance
sigma_k^2 = (1/n_k) sum_{y_i=k} ||h_i - mu_k||^2 = (q_k - ||S_k||^2 / n_k) / n_k (:meth:`class_variances`).
Memory is O(K d + d^2), independent of N.

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
        self.sq = np.zeros(K, dtype=np.float64)

    # -- accumulation --------------------------------------------------------------------------------------

    def update(self, features: Any, labels: Any) -> ClassStatistics:
        """Add a batch: ``features`` (n, d), ``labels`` (n,) integers in [0, K); rows labelled -100 (the ignore
        index) are left out."""
        X = _matrix(features, "features", cols=self.dim)
        y = _labels(labels, X.shape[0], self.num_classes, allow_ignored=True)
        keep = y != IGNORE_INDEX
        if not keep.all():
            X, y = X[keep], y[keep]
        top = float(np.max(np.abs(X))) if X.size else 0.0
        if top > 2.0**500 or 0 < top < 2.0**-500:
            raise ValueError(
                f"features of magnitude {top:.3g}: their second moments (the within-class scatter) would over- or "
                "underflow float64 (|h| must lie within about 1e-150 .. 1e150). Rescale them -- the collapse "
                "metrics are scale invariant."
            )
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
        self.sq += np.bincount(y, weights=np.einsum("nd,nd->n", D, D), minlength=self.num_classes)
        return self

    def _reshift(self, new_shift: np.ndarray) -> None:
        """Express the sums about ``new_shift`` (K x d): with e_k = c_k - c'_k,
        S'_k = S_k + n_k e_k, Q' = Q + sum_k (S_k e_k^T + e_k S_k^T + n_k e_k e_k^T) and
        q'_k = q_k + 2 <S_k, e_k> + n_k ||e_k||^2."""
        e = self.shift - new_shift
        n = self.counts.astype(np.float64)[:, None]
        cross = self.sums.T @ e
        self.scatter += cross + cross.T + (e * n).T @ e
        self.sq += 2.0 * np.einsum("kd,kd->k", self.sums, e) + n[:, 0] * np.einsum("kd,kd->k", e, e)
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
        self.sq += o.sq
        return self

    def copy(self) -> ClassStatistics:
        c = ClassStatistics(self.num_classes)
        if self.dim is not None:
            c._allocate(self.dim)
            c.counts[:] = self.counts
            c.shift[:] = self.shift
            c.sums[:] = self.sums
            c.scatter[:] = self.scatter
            c.sq[:] = self.sq
        return c

    def restrict(self, classes: Any) -> ClassStatistics:
        """The statistics of ``classes`` only (a new accumulator of ``len(classes)`` classes, renumbered in the given
        order). The pooled scatter Q cannot be split by class, so every class left out must have no samples
        (ValueError otherwise): this drops the classes never seen, e.g. the tokens of a vocabulary that a text
        does not contain."""
        idx = np.asarray(classes, dtype=np.int64).reshape(-1)
        if self.dim is None:
            raise ValueError("ClassStatistics is empty: call update(features, labels) first")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_classes or np.unique(idx).size != idx.size):
            raise ValueError(f"classes must be distinct ids in [0, {self.num_classes})")
        left = np.ones(self.num_classes, dtype=bool)
        left[idx] = False
        if self.counts[left].any():
            raise ValueError(
                f"cannot leave out classes with samples ({int(self.counts[left].sum())} samples in "
                f"{int(np.count_nonzero(self.counts[left]))} classes): the pooled within-class scatter cannot be split by class"
            )
        c = ClassStatistics(int(idx.size), self.dim)
        c.counts[:] = self.counts[idx]
        c.shift[:] = self.shift[idx]
        c.sums[:] = self.sums[idx]
        c.scatter[:] = self.scatter
        c.sq[:] = self.sq[idx]
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
        for arr in (self.sums, self.scatter, self.sq):
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

    def class_variances(self) -> np.ndarray:
        """sigma_k^2 = (1/n_k) sum_{y_i = k} ||h_i - mu_k||^2 = tr(Sigma_k) (K,), float64: each class's own
        spread about its mean (0 for a class of one sample)."""
        self._require()
        n = self.counts.astype(np.float64)
        v = (self.sq - np.einsum("kd,kd->k", self.sums, self.sums) / n) / n
        return np.maximum(v, 0.0)

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
