"""Property-based tests (hypothesis) of the numeric entry points: the CKA family, cosine, the collapse statistics
and metrics, and the label checks. Random shapes, scales from 1e-200 to 1e200, NaN/inf and degenerate inputs;
each case asserts a finite result equal to an independent float64 numpy reference, or a clear error.

Bounded: a fixed number of examples per property, no deadline flakiness (the whole file runs in ~20 s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import ref_linear_cka, ref_u_center

from hf_align.analysis.collapse import (
    ClassStatistics,
    equinorm,
    etf_distance,
    gnc3,
    nc1,
    nc3_papyan,
    ncc_predict,
    tammes,
)
from hf_align.analysis.data import check_labels
from hf_align.analysis.similarity import (
    SimilarityUndefinedError,
    cosine,
    debiased_linear_cka,
    linear_cka,
    minibatch_cka,
    rbf_cka,
)

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SCALES = st.sampled_from([1e-200, 1e-100, 1e-20, 1e-3, 1.0, 7.5, 1e20, 1e100, 1e200])


@st.composite
def matrices(draw, n=None, d=None, min_n=2):
    """Integer-valued (so exactly representable) feature matrices, sometimes with a large common offset,
    constant columns or duplicated rows."""
    n = draw(st.integers(min_n, 12)) if n is None else n
    d = draw(st.integers(1, 6)) if d is None else d
    a = np.array(draw(st.lists(st.integers(-8, 8), min_size=n * d, max_size=n * d)), dtype=np.float64).reshape(n, d)
    kind = draw(st.sampled_from(["plain", "offset", "constant-column", "duplicates"]))
    if kind == "offset":
        a = a + draw(st.sampled_from([1e3, -1e4, 1e6]))
    elif kind == "constant-column":
        a[:, draw(st.integers(0, d - 1))] = draw(st.integers(-3, 3))
    elif kind == "duplicates" and n > 2:
        a[n // 2 :] = a[0]
    return a


def centred_zero(a):
    return np.all(a == a[0])  # exactly constant columns <=> every row equal


def conditioning(*mats):
    """Smallest ||X~|| / ||X|| of the inputs: the references (n x n Grams) lose ~eps / ratio^2."""
    r = [np.linalg.norm(m - m.mean(0)) / max(np.linalg.norm(m), 1e-300) for m in mats]
    return max(min(r), 1e-100)


def ref_debiased(X, Y):
    K, L = ref_u_center(X @ X.T), ref_u_center(Y @ Y.T)
    den = np.linalg.norm(K) * np.linalg.norm(L)
    return None if den == 0 else np.sum(K * L) / den


def ref_cosine(X, Y, center):
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    nx, ny = np.linalg.norm(X, axis=1), np.linalg.norm(Y, axis=1)
    if np.any(nx == 0) or np.any(ny == 0):
        return None
    return float(np.mean(np.sum(X * Y, 1) / (nx * ny)))


# ------------------------------------------------------------------------------------------------ CKA family


@SETTINGS
@given(data=st.data(), sx=SCALES, sy=SCALES)
def test_linear_cka_matches_reference_at_any_scale(data, sx, sy):
    X = data.draw(matrices())
    Y = data.draw(matrices(n=X.shape[0]))
    if centred_zero(X) or centred_zero(Y):
        with pytest.raises(SimilarityUndefinedError):
            linear_cka(X * sx, Y * sy)
        return
    v = linear_cka(X * sx, Y * sy)
    tol = 1e-9 + 1e-14 / conditioning(X, Y) ** 2
    assert np.isfinite(v) and -1e-12 <= v <= 1 + 1e-12
    assert v == pytest.approx(ref_linear_cka(X, Y), abs=tol)
    assert v == pytest.approx(linear_cka(Y * sy, X * sx), abs=1e-12)  # symmetric


@SETTINGS
@given(data=st.data(), sx=SCALES, sy=SCALES)
def test_debiased_and_rbf_cka_match_reference_or_say_undefined(data, sx, sy):
    X = data.draw(matrices(min_n=4))
    Y = data.draw(matrices(n=X.shape[0]))
    tol = 1e-9 + 1e-14 / conditioning(X, Y) ** 2
    ref = ref_debiased(X, Y)
    try:
        v = debiased_linear_cka(X * sx, Y * sy)
    except SimilarityUndefinedError:
        # constant features, or a U-centred Gram that vanishes (too few distinct samples)
        assert centred_zero(X) or centred_zero(Y) or ref is None or min(np.linalg.norm(ref_u_center(X @ X.T)), 1) < 1e-9 or min(np.linalg.norm(ref_u_center(Y @ Y.T)), 1) < 1e-9
    else:
        assert np.isfinite(v) and ref is not None and v == pytest.approx(ref, abs=tol)
    try:
        r = rbf_cka(X * sx, Y * sy)
    except SimilarityUndefinedError as e:
        assert centred_zero(X) or centred_zero(Y) or "median" in str(e)
    else:
        assert np.isfinite(r) and r == pytest.approx(rbf_cka(X, Y), abs=1e-9)  # scale invariant (median bandwidth)


@SETTINGS
@given(data=st.data(), sx=SCALES, batch=st.integers(4, 6))
def test_minibatch_cka_is_finite_and_scale_invariant(data, sx, batch):
    X = data.draw(matrices(min_n=8))
    Y = data.draw(matrices(n=X.shape[0]))
    try:
        ref = minibatch_cka(X, Y, batch_size=batch, drop_last=True)
    except (SimilarityUndefinedError, ValueError) as e:
        with pytest.raises(type(e)):
            minibatch_cka(X * sx, Y, batch_size=batch, drop_last=True)
        return
    v = minibatch_cka(X * sx, Y, batch_size=batch, drop_last=True)
    assert np.isfinite(v) and v == pytest.approx(ref, abs=1e-9)


# ------------------------------------------------------------------------------------------------ cosine


@SETTINGS
@given(data=st.data(), sx=SCALES, sy=SCALES, center=st.booleans())
def test_cosine_matches_reference_at_any_scale(data, sx, sy, center):
    X = data.draw(matrices(min_n=1))
    Y = data.draw(matrices(n=X.shape[0], d=X.shape[1]))
    ref = ref_cosine(X, Y, center)
    if ref is None:
        with pytest.raises(SimilarityUndefinedError):
            cosine(X * sx, Y * sy, center=center)
        return
    tol = 1e-12 if not center else 1e-9 + 1e-14 / conditioning(X, Y) ** 2
    v = cosine(X * sx, Y * sy, center=center)
    assert np.isfinite(v) and -1 - 1e-12 <= v <= 1 + 1e-12 and v == pytest.approx(ref, abs=tol)


# ------------------------------------------------------------------------------------------------ bad input


FUNCS = {
    "linear_cka": linear_cka,
    "debiased_linear_cka": debiased_linear_cka,
    "rbf_cka": rbf_cka,
    "cosine": cosine,
    "minibatch_cka": lambda a, b: minibatch_cka(a, b, batch_size=4),
}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(FUNCS)), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       torch_input=st.booleans(), which=st.sampled_from(["X", "Y"]))
def test_non_finite_input_is_a_clear_error(data, name, bad, torch_input, which):
    X = data.draw(matrices(n=8, d=3))
    Y = data.draw(matrices(n=8, d=3))
    target = X if which == "X" else Y
    target[data.draw(st.integers(0, 7)), data.draw(st.integers(0, 2))] = bad
    if torch_input:
        X, Y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{which}: contains 1 non-finite"):
        FUNCS[name](X, Y)


@SETTINGS
@given(name=st.sampled_from(sorted(FUNCS)), shape=st.sampled_from([(8,), (8, 3, 1), (8, 0), ()]))
def test_wrong_shapes_are_a_clear_error(name, shape):
    X = np.ones(shape)
    with pytest.raises(ValueError, match="2-D|no features"):
        FUNCS[name](X, np.ones((8, 3)))


@SETTINGS
@given(name=st.sampled_from(sorted(FUNCS)), n=st.integers(5, 9))
def test_mismatched_sample_counts_are_a_clear_error(name, n):
    with pytest.raises(ValueError, match="same samples"):
        FUNCS[name](np.eye(n, 3), np.eye(n + 1, 3))


# ------------------------------------------------------------------------------------------------ collapse


@st.composite
def class_features(draw):
    K = draw(st.integers(2, 4))
    d = draw(st.integers(2, 5))
    n = draw(st.integers(2 * K, 16))
    y = np.array([i % K for i in range(n)])
    X = np.array(draw(st.lists(st.integers(-8, 8), min_size=n * d, max_size=n * d)), dtype=np.float64).reshape(n, d)
    return X, y, K


@SETTINGS
@given(data=class_features(), scale=SCALES, split=st.integers(1, 15))
def test_class_statistics_match_numpy_or_refuse_the_range(data, scale, split):
    X, y, K = data
    stats = ClassStatistics(K)
    if (scale > 1e150 or scale < 1e-150) and np.any(X):
        with pytest.raises(ValueError, match="over- or underflow"):
            stats.update(X * scale, y)
        return
    split = min(split, len(y) - 1)
    stats.update(X[:split] * scale, y[:split]).update(X[split:] * scale, y[split:])  # two batches
    means = np.stack([X[y == k].mean(0) for k in range(K)]) * scale
    sw = sum(np.cov((X[y == k] * scale).T, bias=True) * (y == k).sum() for k in range(K)) / len(y)
    np.testing.assert_allclose(stats.means(), means, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(stats.within_class_covariance(), sw, rtol=1e-9, atol=1e-9 * scale**2 * max(1.0, np.abs(X).max() ** 2))
    mu = means.mean(0)
    sb = (means - mu).T @ (means - mu) / K
    if not np.any(np.abs(means - mu) > 0):
        with pytest.raises(ValueError, match="Sigma_B = 0"):
            nc1(stats)
        return
    ref = np.trace(sw @ np.linalg.pinv(sb, hermitian=True)) / K
    v = nc1(stats)
    assert np.isfinite(v) and v >= -1e-9
    assert v == pytest.approx(ref, rel=1e-6, abs=1e-9) or not np.isfinite(ref)


@SETTINGS
@given(data=st.data(), scale=SCALES)
def test_scale_invariant_collapse_metrics_at_any_scale(data, scale):
    K = data.draw(st.integers(2, 5))
    d = data.draw(st.integers(2, 5))
    V = data.draw(matrices(n=K, d=d))
    M = data.draw(matrices(n=K, d=d))
    zero_rows = np.any(np.all(V == 0, axis=1))
    for fn in (equinorm, etf_distance, lambda a: tammes(a)["max_cosine"], lambda a: gnc3(a, M), lambda a: nc3_papyan(a, M)):
        try:
            ref = fn(V)
        except ValueError:
            with pytest.raises(ValueError):
                fn(V * scale)
            continue
        v = fn(V * scale)
        assert np.isfinite(v) and v == pytest.approx(ref, rel=1e-9, abs=1e-9)
    if not zero_rows:
        H = data.draw(matrices(n=6, d=d))
        dist = ((H[:, None] - V[None]) ** 2).sum(-1)  # exact (small integers)
        unique = (dist == dist.min(1, keepdims=True)).sum(1) == 1  # ties may break either way
        np.testing.assert_array_equal(ncc_predict(H * scale, V * scale)[unique], dist.argmin(1)[unique])


# ------------------------------------------------------------------------------------------------ labels


@SETTINGS
@given(labels=st.lists(st.one_of(st.integers(-200, 200), st.just(-100)), min_size=1, max_size=20), k=st.integers(1, 50),
       as_tensor=st.booleans(), as_float=st.booleans())
def test_check_labels_accepts_exactly_the_valid_ids(labels, k, as_tensor, as_float):
    a = np.array(labels, dtype=np.float64 if as_float else np.int64)
    arg = torch.tensor(a) if as_tensor else a
    valid = all(v == -100 or 0 <= v < k for v in labels)
    if valid:
        check_labels(arg, k)
    else:
        with pytest.raises(ValueError, match=r"must lie in \[0, "):
            check_labels(arg, k)


@SETTINGS
@given(bad=st.sampled_from([np.nan, np.inf, 0.5, -1e300]), k=st.integers(2, 10))
def test_check_labels_non_integer_values_are_a_clear_error(bad, k):
    with pytest.raises((TypeError, ValueError), match="integer class ids|must lie in"):
        check_labels(np.array([0.0, 1.0, bad]), k)
    with pytest.raises(TypeError, match="integer class ids"):
        check_labels(np.array(["a", "b"]), k)
