"""Similarity functions on feature matrices vs independent float64 numpy references (n x n Gram formulas)."""

import numpy as np
import pytest
import torch
from references import ref_u_center

from hf_align.analysis.similarity import (
    SimilarityUndefinedError,
    cosine,
    debiased_linear_cka,
    hsic1,
    linear_cka,
    minibatch_cka,
    rank_correlation,
    rbf_cka,
)

# ---------------------------------------------------------------- independent references (numpy, float64, n x n)


def ref_cosine(X, Y, center=False):
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.mean(np.sum(X * Y, 1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1)))


def _hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H)


def ref_linear_cka(X, Y):
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    K, L = X @ X.T, Y @ Y.T
    return _hsic_biased(K, L) / np.sqrt(_hsic_biased(K, K) * _hsic_biased(L, L))


def ref_debiased_cka(X, Y):
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    K, L = ref_u_center(X @ X.T), ref_u_center(Y @ Y.T)
    return np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))


def ref_rbf_gram(X, sigma):
    X = np.asarray(X, np.float64)
    d2 = np.sum((X[:, None, :] - X[None, :, :]) ** 2, -1)
    return np.exp(-d2 / (2 * sigma**2 * np.median(d2)))


def ref_rbf_cka(X, Y, sigma=1.0):
    K, L = ref_rbf_gram(X, sigma), ref_rbf_gram(Y, sigma)
    return _hsic_biased(K, L) / np.sqrt(_hsic_biased(K, K) * _hsic_biased(L, L))


def ref_hsic1(X, Y):
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    K, L = X @ X.T, Y @ Y.T  # uncentred, straight from the paper's formula
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    n = K.shape[0]
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ K @ L @ one) / (
        n * (n - 3)
    )


def ref_minibatch_cka(X, Y, bs):
    xy = xx = yy = 0.0
    for s in range(0, len(X), bs):
        xb, yb = X[s : s + bs], Y[s : s + bs]
        xy += ref_hsic1(xb, yb)
        xx += ref_hsic1(xb, xb)
        yy += ref_hsic1(yb, yb)
    return xy / np.sqrt(xx * yy)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n = 40
    X = rng.normal(size=(n, 12)) + 0.5
    # Y: a noisy nonlinear function of X, different width
    Y = np.tanh(X @ rng.normal(size=(12, 7))) + 0.3 * rng.normal(size=(n, 7))
    Z = rng.normal(size=(n, 12))  # same width as X, for cosine
    W = X + 0.8 * rng.normal(size=(n, 12))
    return X, Y, Z, W


# ---------------------------------------------------------------- acceptance 1: references to 1e-6


def test_matches_numpy_references(data):
    X, Y, Z, W = data
    assert cosine(X, W) == pytest.approx(ref_cosine(X, W), abs=1e-6)
    assert cosine(X, W, center=True) == pytest.approx(ref_cosine(X, W, center=True), abs=1e-6)
    assert cosine(X, Z) == pytest.approx(ref_cosine(X, Z), abs=1e-6)
    assert linear_cka(X, Y) == pytest.approx(ref_linear_cka(X, Y), abs=1e-6)
    assert debiased_linear_cka(X, Y) == pytest.approx(ref_debiased_cka(X, Y), abs=1e-6)
    assert rbf_cka(X, Y) == pytest.approx(ref_rbf_cka(X, Y), abs=1e-6)
    assert rbf_cka(X, Y, sigma=0.5) == pytest.approx(ref_rbf_cka(X, Y, 0.5), abs=1e-6)
    assert hsic1(X, Y) == pytest.approx(ref_hsic1(X, Y), rel=1e-6)
    assert minibatch_cka(X, Y, batch_size=10) == pytest.approx(ref_minibatch_cka(X, Y, 10), abs=1e-6)
    # the values are not trivially equal to each other (the metrics really differ)
    assert abs(linear_cka(X, Y) - debiased_linear_cka(X, Y)) > 1e-3


def test_gram_space_path_matches(data):
    # n < d takes the n x n Gram path inside linear_cka
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(6, 50)), rng.normal(size=(6, 40))
    assert linear_cka(X, Y) == pytest.approx(ref_linear_cka(X, Y), abs=1e-9)


def test_torch_and_numpy_inputs_agree(data):
    X, Y, _, _ = data
    assert linear_cka(torch.tensor(X), torch.tensor(Y)) == pytest.approx(ref_linear_cka(X, Y), abs=1e-9)
    assert linear_cka(X[:, :1], Y) == pytest.approx(ref_linear_cka(X[:, :1], Y), abs=1e-9)  # one feature
    with pytest.raises(ValueError, match=r"1-D.*X\[:, None\]"):  # the docs: non-2-D raises
        linear_cka(X[:, 0], Y)


def test_identities(data):
    X, Y, _, _ = data
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    R, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    for f in (linear_cka, debiased_linear_cka, rbf_cka, lambda a, b: minibatch_cka(a, b, 10)):
        assert f(X, X) == pytest.approx(1.0, abs=1e-12)
        assert f(X, Y) == pytest.approx(f(Y, X), abs=1e-12)
        base = f(X, Y)
        assert f(X @ Q, Y) == pytest.approx(base, abs=1e-10)
        assert f(X, Y @ R) == pytest.approx(base, abs=1e-10)
        assert f(3.7 * X, Y) == pytest.approx(base, abs=1e-10)
        assert f(X, 0.01 * Y) == pytest.approx(base, abs=1e-10)
    assert 0 < linear_cka(X, Y) < 1
    # cosine: the paper's metric is per-sample scale invariant and symmetric
    Z = X + rng.normal(size=X.shape)
    assert cosine(X, X) == pytest.approx(1.0)
    assert cosine(X, Z) == pytest.approx(cosine(Z, X))
    s = rng.uniform(0.1, 10, size=(len(X), 1))
    assert cosine(X * s, Z) == pytest.approx(cosine(X, Z), abs=1e-12)
    assert cosine(X, -X) == pytest.approx(-1.0)


def test_translation_invariance_of_centred_metrics(data):
    X, Y, _, _ = data
    for f in (linear_cka, debiased_linear_cka, hsic1, rbf_cka, lambda a, b: minibatch_cka(a, b, 8)):
        assert f(X + 100.0, Y - 5.0) == pytest.approx(f(X, Y), rel=1e-8)


# ---------------------------------------------------------------- acceptance 3: bad input


def test_bad_input_errors(data):
    X, Y, _, _ = data
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(X, Y[:-1])
    with pytest.raises(ValueError, match="same samples"):
        cosine(X, X[:-3])
    Xn = X.copy()
    Xn[3, 2] = np.nan
    Xi = X.copy()
    Xi[0, 0] = np.inf
    for f in (cosine, linear_cka, debiased_linear_cka, rbf_cka, hsic1):
        with pytest.raises(ValueError, match="non-finite"):
            f(Xn, X)
        with pytest.raises(ValueError, match="non-finite"):
            f(X, Xi)
    with pytest.raises(ValueError, match="at least 4"):
        hsic1(X[:3], Y[:3])
    with pytest.raises(ValueError, match="at least 4"):
        debiased_linear_cka(X[:3], Y[:3])
    with pytest.raises(ValueError, match="batch_size >= 4"):
        minibatch_cka(X, Y, batch_size=3)
    with pytest.raises(ValueError, match="last minibatch would have 2"):
        minibatch_cka(X[:22], Y[:22], batch_size=10)
    assert minibatch_cka(X[:22], Y[:22], batch_size=10, drop_last=True) == pytest.approx(
        ref_minibatch_cka(X[:20], Y[:20], 10), abs=1e-9
    )
    with pytest.raises(ValueError, match="same width"):
        cosine(X, Y)
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(X[None], Y)
    with pytest.raises(TypeError):
        linear_cka([["a", "b"], ["c", "d"]], Y[:2])
    with pytest.raises(ValueError, match="sigma"):
        rbf_cka(X, Y, sigma=0)


def test_constant_features_raise_not_nan(data):
    X, Y, _, _ = data
    const = np.tile(np.arange(12.0) + 3.0, (len(X), 1))  # every sample the same vector
    for f in (linear_cka, debiased_linear_cka, rbf_cka, lambda a, b: minibatch_cka(a, b, 10)):
        with pytest.raises(SimilarityUndefinedError, match="constant"):
            f(const, Y)
        with pytest.raises(SimilarityUndefinedError):
            f(Y, const)
    # float32 constant layer with rounding noise (as a model's CLS embedding can have) is still constant
    noisy = (const * (1 + 1e-7 * np.random.default_rng(0).normal(size=const.shape))).astype(np.float32)
    with pytest.raises(SimilarityUndefinedError):
        linear_cka(noisy, Y)
    # uncentred cosine of a constant layer is well defined; centred it is not
    assert np.isfinite(cosine(const, X))
    with pytest.raises(SimilarityUndefinedError, match="zero norm"):
        cosine(const, X, center=True)
    Xz = X.copy()
    Xz[5] = 0
    with pytest.raises(SimilarityUndefinedError, match="zero norm"):
        cosine(Xz, X)
    assert issubclass(SimilarityUndefinedError, ValueError)


def test_huge_common_offset_float32():
    """Features with a common offset 1e4 x their spread, in float32 (what real transformer layers look like)."""
    rng = np.random.default_rng(3)
    n = 500
    base = rng.normal(size=(n, 16))
    offset_x = 1e4 * rng.uniform(0.5, 1.5, size=16)
    offset_y = 1e4 * rng.uniform(0.5, 1.5, size=16)
    X32 = (base + offset_x).astype(np.float32)
    Y32 = (np.tanh(base @ rng.normal(size=(16, 16))) + 0.5 * rng.normal(size=(n, 16)) + offset_y).astype(np.float32)
    # exact value for these float32 numbers: float64, centred first
    X64, Y64 = X32.astype(np.float64), Y32.astype(np.float64)
    exact = ref_linear_cka(X64 - X64.mean(0), Y64 - Y64.mean(0))
    exact_d = ref_debiased_cka(X64 - X64.mean(0), Y64 - Y64.mean(0))
    assert linear_cka(X32, Y32) == pytest.approx(exact, abs=1e-6)
    assert debiased_linear_cka(X32, Y32) == pytest.approx(exact_d, abs=1e-6)
    assert minibatch_cka(X32, Y32, 100) == pytest.approx(ref_minibatch_cka(X64 - X64.mean(0), Y64 - Y64.mean(0), 100), abs=1e-6)
    # the naive formula (uncentred float32 Grams, centred afterwards) cancels catastrophically
    Xt, Yt = torch.tensor(X32), torch.tensor(Y32)
    K, L = Xt @ Xt.T, Yt @ Yt.T
    H = torch.eye(n) - 1.0 / n
    naive = float(torch.trace(K @ H @ L @ H) / torch.sqrt(torch.trace(K @ H @ K @ H) * torch.trace(L @ H @ L @ H)))
    assert not abs(naive - exact) < 1e-2


def test_rank_correlation():
    rng = np.random.default_rng(4)
    a = rng.uniform(size=(6, 6))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1)
    # monotone transform of the upper triangle -> 1; reversed order -> -1
    assert rank_correlation(a, a**3) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    b = rng.uniform(size=(6, 6))
    iu = np.triu_indices(6, 1)
    ra = np.argsort(np.argsort(a[iu])).astype(float)
    rb = np.argsort(np.argsort(b[iu])).astype(float)
    expected = np.corrcoef(ra, rb)[0, 1]
    assert rank_correlation(a, b) == pytest.approx(expected)
    # undefined entries are left out
    c = a.copy()
    c[0, :] = np.nan
    c[:, 0] = np.nan
    assert rank_correlation(c, a**2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        rank_correlation(a, a[:5, :5])
