"""The `evaluate` neural-collapse module, loaded from its folder, against float64 numpy references."""

from pathlib import Path

import numpy as np
import pytest

import hf_align

FOLDER = Path(hf_align.__file__).parent / "metrics" / "neural_collapse"


def test_evaluate_load_and_compute():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(FOLDER))
    rng = np.random.default_rng(3)
    K, d, n = 4, 6, 15
    y = np.repeat(np.arange(K), n)
    X = rng.standard_normal((K, d))[y] * 4 + rng.standard_normal((K * n, d))
    W = rng.standard_normal((K, d))
    pred = rng.integers(0, K, K * n)
    out = metric.compute(features=X.tolist(), references=y.tolist(), predictions=pred.tolist(), classifier_weight=W)
    M = np.stack([X[y == k].mean(0) for k in range(K)])
    Sw = sum((X[y == k] - M[k]).T @ (X[y == k] - M[k]) for k in range(K)) / len(X)
    Mc = M - M.mean(0)
    Sb = Mc.T @ Mc / K
    assert out["nc1"] == pytest.approx(np.trace(Sw @ np.linalg.pinv(Sb)) / K, rel=1e-9)
    assert out["nc1_papyan"] == pytest.approx(np.trace(Sw @ np.linalg.pinv(Sb)), rel=1e-9)
    ncc = np.argmin(((X[:, None] - M[None]) ** 2).sum(-1), 1)
    assert out["nc4"] == pytest.approx(np.mean(ncc != pred))
    cos = np.sum(W * Mc, 1) / np.linalg.norm(W, axis=1) / np.linalg.norm(Mc, axis=1)
    assert out["gnc3"] == pytest.approx(np.mean(1 - cos), rel=1e-9)
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    C = Wn @ Wn.T
    assert out["tammes_max_cosine"] == pytest.approx(C[~np.eye(K, dtype=bool)].max(), rel=1e-12)
    assert 0 < out["gnc2_margin"] <= K / (K - 1) + 1e-12  # never above the simplex-ETF optimum


def test_evaluate_bad_input_is_clear():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(FOLDER))
    X = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(ValueError, match="no samples"):
        metric.compute(features=X.tolist(), references=[0, 0, 2, 2, 0, 2], predictions=[0] * 6)


def test_evaluate_token_level():
    """The "token" configuration: per-sequence features and next-token references with -100, the vocabulary as the
    classes; NC1 / CDNV / GNC3 against numpy over the seen classes, unseen ones counted."""
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(FOLDER), "token")
    rng = np.random.default_rng(4)
    K, d = 30, 5
    W = rng.standard_normal((K, d))
    seqs = []
    for T in (9, 4, 12):
        y = rng.integers(0, 12, T)  # classes 12..29 never occur
        y[-1] = -100
        seqs.append((W[np.maximum(y, 0)] * 2 + rng.standard_normal((T, d)), y))
    out = metric.compute(features=[f.tolist() for f, _ in seqs], references=[y.tolist() for _, y in seqs],
                         classifier_weight=W)
    X = np.concatenate([f for f, _ in seqs])
    y = np.concatenate([y for _, y in seqs])
    X, y = X[y != -100], y[y != -100]
    classes = np.unique(y)
    M = np.stack([X[y == k].mean(0) for k in classes])
    Sw = sum((X[y == k] - M[i]).T @ (X[y == k] - M[i]) for i, k in enumerate(classes)) / len(X)
    Mc = M - M.mean(0)
    assert out["nc1"] == pytest.approx(np.trace(Sw @ np.linalg.pinv(Mc.T @ Mc / len(classes))) / len(classes), rel=1e-9)
    var = np.array([np.mean(np.sum((X[y == k] - M[i]) ** 2, 1)) for i, k in enumerate(classes)])
    pairs = [(var[i] + var[j]) / (2 * np.sum((M[i] - M[j]) ** 2)) for i in range(len(classes)) for j in range(len(classes)) if i != j]
    assert out["cdnv"] == pytest.approx(np.mean(pairs), rel=1e-9)
    cos = np.sum(W[classes] * Mc, 1) / np.linalg.norm(W[classes], axis=1) / np.linalg.norm(Mc, axis=1)
    assert out["gnc3"] == pytest.approx(np.mean(1 - cos), rel=1e-9)
    assert out["num_unseen"] == K - len(classes) and out["num_tokens"] == len(y)
    with pytest.raises(ValueError, match="one reference per position"):
        metric.compute(features=[np.zeros((3, d)).tolist()], references=[[1, 2]])
