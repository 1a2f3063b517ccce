"""Blocked K x K passes over cosine / Gram matrices (memory O(block * K)), float64 or float32 with error bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Direct K x K computations up to this K; above it the O(K d^2) closed forms (see etf_distance).
_DIRECT_MAX_K = 4096
# Blocked K x K passes in float64 up to this K; above it float32 with explicit error bounds ("auto").
_FLOAT64_MAX_K = 20000


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
