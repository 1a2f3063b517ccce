"""Input checks shared by the collapse metrics: finite float64 matrices, integer labels, unit rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...data.labels import IGNORE_INDEX


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


def _labels(y: Any, n: int, num_classes: int, name: str = "labels", *, allow_ignored: bool = False) -> np.ndarray:
    """Integer class ids in ``[0, num_classes)``, one per row; with ``allow_ignored`` also ``IGNORE_INDEX`` (-100,
    the one label rule of :mod:`hf_align.data.labels`: a row without a target, which the caller drops)."""
    a = _to_numpy(y, name)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one entry per row ({n}), got shape {tuple(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    bad = ((a < 0) | (a >= num_classes)) & ~((a == IGNORE_INDEX) if allow_ignored else False)
    if a.size and bad.any():
        ignored = f"; {IGNORE_INDEX} is ignored" if allow_ignored else ""
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}{ignored}), "
                         f"got {int(a[bad][0])}")
    return a


def _check_classes(k: int, what: str = "the metric") -> None:
    if k < 2:
        raise ValueError(f"{what} needs at least 2 classes, got {k}")


def _unit(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays scaled by one common power of two (exact) so that the largest |entry| lies in [0.5, 1): for the
    scale-invariant metrics, so features from 1e-300 to 1e300 neither over- nor underflow in products."""
    top = max((float(np.max(np.abs(a))) if a.size else 0.0) for a in arrays)
    if top == 0 or not np.isfinite(top):
        return arrays
    e = math.frexp(top)[1]
    return tuple(np.ldexp(a, -e) for a in arrays)


def _normalize_rows(V: np.ndarray, name: str) -> np.ndarray:
    top = np.max(np.abs(V), axis=1) if V.size else np.zeros(V.shape[0])
    V = np.ldexp(V, -np.frexp(top)[1][:, None])  # each row to max |entry| in [0.5, 1): no over- or underflow
    norms = np.linalg.norm(V, axis=1)
    zero = np.flatnonzero(norms <= 0)
    if zero.size:
        raise ValueError(
            f"{name} has {zero.size} zero row(s) (first: row {int(zero[0])}); a zero classifier row / class mean "
            "has no direction, so cosines and the normalised margin are undefined"
        )
    return V / norms[:, None]
