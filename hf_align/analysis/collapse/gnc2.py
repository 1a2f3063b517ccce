"""GNC2: the exact one-vs-rest margin of a row-normalised classifier, with a certificate per class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import lsq_linear, nnls

from ._checks import _check_classes, _matrix, _normalize_rows
from .passes import _block_rows, _cosine_summary


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
