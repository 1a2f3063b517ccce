"""GNC2 at scale: the time-budget bounds and the bfloat16 screen, against independent float64 references."""

import math

import numpy as np
import torch
from scipy.optimize import nnls

from hf_align.analysis.collapse import gnc2

rng = np.random.default_rng(7)


def unit(W):
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def exact_margins(W):
    """dist(w_k, conv{w_j: j != k}) for every k from ONE NNLS over all other rows (no candidates, no screen):
    min_y>=0 ||[U^T; 1^T] y - e_{d+1}||, U = w_k - w_j; the distance is ||U^T y|| / sum(y)."""
    Wn = unit(W)
    K, d = Wn.shape
    out = np.empty(K)
    f = np.zeros(d + 1)
    f[d] = 1.0
    for k in range(K):
        U = Wn[k] - np.delete(Wn, k, 0)
        E = np.vstack([U.T, np.ones(K - 1)])
        y, _ = nnls(E, f, maxiter=100 * K)
        out[k] = np.linalg.norm(U.T @ y) / y.sum()
    return out


def check_certificates(W, res):
    """Every class's pair, recomputed here: primal from (support, weights), dual of h against all rows."""
    Wn = unit(W)
    K = len(Wn)
    for k in range(K):
        c = res.certificate(k)
        a, idx, h = c["weights"], c["support"], c["direction"]
        assert np.all(a >= 0) and abs(a.sum() - 1) < 1e-12 and k not in set(idx.tolist())
        assert np.linalg.norm(h) <= 1 + 1e-12
        primal = np.linalg.norm(Wn[k] - a @ Wn[idx])
        dual = max(0.0, np.min((Wn[k] - np.delete(Wn, k, 0)) @ h))
        assert res.primal[k] >= primal - 1e-12 and res.dual[k] <= dual + 1e-12, k


def test_time_budget_zero_still_valid_bounds():
    W = rng.standard_normal((150, 6))
    ref = exact_margins(W)
    res = gnc2(W, time_budget=0.0)
    assert not res.complete and not res.certified.any()
    assert np.all(res.dual <= ref + 1e-12) and np.all(ref <= res.primal + 1e-12)
    assert res.margin_lower <= ref.min() <= res.margin_upper
    check_certificates(W, res)


def test_time_budget_partial_rounds_bracket_exact():
    # max_rounds=3 with a budget stops after three rounds of column generation, deterministically
    W = rng.standard_normal((300, 8)) * rng.uniform(0.5, 2, (300, 1))
    ref = exact_margins(W)
    res = gnc2(W, time_budget=3600, max_rounds=3, candidates=4, add_violators=2)
    assert 0 < res.certified.sum() < len(W)  # some classes finished, some not
    assert np.all(res.dual <= ref + 1e-12) and np.all(ref <= res.primal + 1e-12)
    np.testing.assert_allclose(res.margins[res.certified], ref[res.certified], atol=1e-6)
    assert res.margin_lower <= ref.min() + 1e-12 and ref.min() <= res.margin_upper + 1e-12
    check_certificates(W, res)
    full = gnc2(W, time_budget=3600)  # a generous budget: complete, equal to the reference
    assert full.complete and full.certified.all()
    np.testing.assert_allclose(full.margins, ref, atol=1e-6)
    assert full.margin_upper - full.margin_lower <= 1e-6


def test_bfloat16_screen_agrees_with_float64_near_ties():
    # copies of the cross-polytope's +-e_i, perturbed by 2e-3 (far inside the bf16 band of ~1e-2): for each
    # class many rows tie with the support to within the band, so the screen must defer to exact arithmetic
    K, d = 600, 12
    base = np.vstack([np.eye(d), -np.eye(d)])
    W = base[rng.integers(0, 2 * d, K)] + 2e-3 * rng.standard_normal((K, d))
    ref = exact_margins(W)
    res = gnc2(W, precision="bfloat16", candidates=6, add_violators=4)
    assert res.screened == "bfloat16" and res.complete
    np.testing.assert_allclose(res.margins, ref, atol=1e-6)
    assert np.all(res.gap <= 1e-6)
    res64 = gnc2(W, precision="float64")
    np.testing.assert_allclose(res.margins, res64.margins, atol=1e-9)
    check_certificates(W, res)


def test_bfloat16_rounding_bound_holds():
    from hf_align.analysis.collapse.gnc2 import _UNIT, _abs_bound

    for d in (64, 768):
        Wn = unit(rng.standard_normal((2000, d)))
        Hn = unit(rng.standard_normal((64, d)) + 3 * Wn[:64])  # large inner products too
        exact = Hn @ Wn.T
        s = (torch.from_numpy(Hn).bfloat16() @ torch.from_numpy(Wn).bfloat16().T).double().numpy()
        u = _UNIT[torch.bfloat16]
        bound = _abs_bound(torch.bfloat16, d) + u / (1 - u) * np.abs(s)
        assert np.all(np.abs(s - exact) <= bound)
        assert np.abs(s - exact).max() > 0.05 * bound.max()  # the bound is not vacuous here


def test_time_budget_result_fields_and_progress():
    W = rng.standard_normal((40, 3))
    res = gnc2(W, progress=True)
    assert res.complete and res.certified.all() and res.seconds >= 0
    assert res.margin == res.margin_upper and res.margin_upper - res.margin_lower <= 1e-6
    assert math.isclose(res.margin, float(res.margins.min()))
    np.testing.assert_array_equal(res.lower, res.dual)
    np.testing.assert_array_equal(res.upper, res.primal)


def test_forked_solve_workers_equal_the_serial_loop():
    """The per-class solves spread over 2 forked processes give the same margins and certificates as 1."""
    from hf_align.analysis.collapse import gnc2

    W = np.random.default_rng(7).standard_normal((600, 12))
    one = gnc2(W, workers=1, batch=16)
    two = gnc2(W, workers=2, batch=16)
    np.testing.assert_array_equal(one.margins, two.margins)
    np.testing.assert_array_equal(one.dual, two.dual)
    assert one.solves == two.solves and one.rounds == two.rounds
    budget = gnc2(W, workers=2, batch=16, time_budget=0.0)
    assert np.all(budget.lower <= one.margins + 1e-12) and np.all(one.margins <= budget.upper + 1e-12)
