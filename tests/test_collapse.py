"""Neural-collapse metrics: known geometries, independent float64 numpy references, exact GNC2 certificates,
streaming statistics, bad input, and the per-layer report over a tiny model."""

import math
import os

import numpy as np
import pytest
import torch

from hf_align.analysis.collapse import (
    ClassStatistics,
    collapse_metrics,
    equiangularity,
    equinorm,
    etf_distance,
    gnc2,
    gnc2_projected_gradient,
    gnc3,
    nc1,
    nc2,
    nc3_papyan,
    nc3_zhu,
    nc4,
    tammes,
)

rng = np.random.default_rng(0)


def simplex_etf(K, d, seed=0):
    """K unit vectors in R^d (K <= d+1) with pairwise cosine -1/(K-1), randomly rotated."""
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]
    P = np.eye(K) - np.ones((K, K)) / K  # rows span a (K-1)-dim space
    B = np.linalg.svd(P)[2][: K - 1]  # orthonormal basis of that space (K-1, K)
    V = P @ B.T  # (K, K-1) centred simplex
    V = V / np.linalg.norm(V, axis=1, keepdims=True)
    return V @ Q[: K - 1]  # embed in R^d and rotate


# ---------------- numpy references (written independently of the code) ----------------


def ref_cov(X, y, K):
    M = np.stack([X[y == k].mean(0) for k in range(K)])
    Sw = sum((X[y == k] - M[k]).T @ (X[y == k] - M[k]) for k in range(K)) / len(X)
    muG = M.mean(0)
    Sb = (M - muG).T @ (M - muG) / K
    return M, Sw, Sb, muG


def ref_cos(V):
    Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
    return Vn @ Vn.T


def ref_etf(A, B):
    K = len(A)
    G = A @ B.T
    E = (np.eye(K) - np.ones((K, K)) / K) / np.sqrt(K - 1)
    return np.linalg.norm(G / np.linalg.norm(G) - E)


def certificate_values(W, res, k):
    """Independent check of class k's certificate: primal ||w_k - sum a_j w_j|| with a in the simplex and
    j != k; dual min_{j != k} <w_k - w_j, h> with ||h|| <= 1."""
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    c = res.certificate(k)
    a, idx, h = c["weights"], c["support"], c["direction"]
    assert np.all(a >= 0) and abs(a.sum() - 1) < 1e-12 and k not in set(idx.tolist())
    assert np.linalg.norm(h) <= 1 + 1e-12
    primal = np.linalg.norm(Wn[k] - a @ Wn[idx])
    others = np.delete(np.arange(len(W)), k)
    dual = np.min((Wn[k] - Wn[others]) @ h)
    return primal, dual


# ---------------- known geometries ----------------


@pytest.mark.parametrize("K,d", [(5, 8), (9, 8), (3, 2)])
def test_simplex_etf(K, d):
    V = simplex_etf(K, d) * 3.0
    res = gnc2(V)
    assert res.margin == pytest.approx(K / (K - 1), abs=1e-9)
    np.testing.assert_allclose(res.margins, K / (K - 1), atol=1e-9)
    out = nc2(V)
    for key in ("equinorm", "equiangularity", "cosine_std", "etf_distance"):
        assert abs(out[key]) < 1e-7, key
    assert out["max_cosine"] == pytest.approx(-1 / (K - 1), abs=1e-12)


@pytest.mark.parametrize("d", [2, 5, 16])
def test_cross_polytope_margin_one(d):
    C = np.vstack([np.eye(d), -np.eye(d)]) @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    res = gnc2(C)
    np.testing.assert_allclose(res.margins, 1.0, atol=1e-9)
    assert tammes(C)["max_cosine"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("K", [5, 12, 50])
def test_regular_polygon(K):
    t = 2 * np.pi * np.arange(K) / K + 0.3
    G = np.c_[np.cos(t), np.sin(t)] * 2.0
    res = gnc2(G)
    np.testing.assert_allclose(res.margins, 1 - np.cos(2 * np.pi / K), atol=1e-9)
    assert tammes(G)["max_cosine"] == pytest.approx(np.cos(2 * np.pi / K), abs=1e-12)


def test_perfect_collapse_nc1_zero_with_large_offset():
    K, d = 6, 10
    M = simplex_etf(K, d) + 1e4  # features far from the origin: naive sums would cancel
    y = np.repeat(np.arange(K), 7)
    stats = ClassStatistics(K).update(M[y], y)
    assert nc1(stats) == 0.0
    assert np.all(stats.within_class_covariance() == 0)


# ---------------- every metric against float64 numpy ----------------


def test_all_metrics_match_numpy():
    K, d, n = 7, 12, 20
    mu = rng.standard_normal((K, d)) * 3 + 50  # common offset
    y = np.repeat(np.arange(K), n)
    rng.shuffle(y)
    X = mu[y] + rng.standard_normal((len(y), d))
    W = rng.standard_normal((K, d))
    pred = rng.integers(0, K, len(y))
    stats = ClassStatistics(K)
    for s in range(0, len(y), 13):  # streamed in uneven batches
        stats.update(torch.from_numpy(X[s : s + 13]), torch.from_numpy(y[s : s + 13]))
    M, Sw, Sb, muG = ref_cov(X, y, K)
    np.testing.assert_allclose(stats.means(), M, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.within_class_covariance(), Sw, atol=1e-10)
    ref_nc1 = np.trace(Sw @ np.linalg.pinv(Sb)) / K
    assert nc1(stats) == pytest.approx(ref_nc1, rel=1e-9)
    assert nc1(stats, convention="papyan") == pytest.approx(ref_nc1 * K, rel=1e-9)
    Mc = M - muG
    for V in (W, Mc):
        norms = np.linalg.norm(V, axis=1)
        C = ref_cos(V)
        off = C[~np.eye(K, dtype=bool)]
        out = nc2(V)
        assert out["equinorm"] == pytest.approx(norms.std(ddof=1) / norms.mean(), rel=1e-12)
        assert equinorm(V) == out["equinorm"]
        assert out["equiangularity"] == pytest.approx(np.abs(off + 1 / (K - 1)).sum() / (K * (K - 1)), rel=1e-12)
        assert equiangularity(V) == pytest.approx(out["equiangularity"], rel=1e-12)
        assert out["cosine_std"] == pytest.approx(C[np.triu_indices(K, 1)].std(ddof=1), rel=1e-9)
        assert out["max_cosine"] == pytest.approx(off.max(), rel=1e-12)
        assert out["etf_distance"] == pytest.approx(ref_etf(V, V), rel=1e-10)
    assert nc3_papyan(W, Mc) == pytest.approx(np.linalg.norm(W.T / np.linalg.norm(W) - Mc.T / np.linalg.norm(Mc)) ** 2)
    assert nc3_zhu(W, Mc) == pytest.approx(ref_etf(W, Mc), rel=1e-10)
    ncc = np.argmin(((X[:, None, :] - M[None]) ** 2).sum(-1), axis=1)
    assert nc4(X, M, pred) == pytest.approx(np.mean(ncc != pred))
    cosines = np.sum(W * Mc, 1) / np.linalg.norm(W, axis=1) / np.linalg.norm(Mc, axis=1)
    assert gnc3(W, Mc) == pytest.approx(np.mean(1 - cosines), rel=1e-12)
    allm = collapse_metrics(stats, W, features=X, predictions=pred)
    assert allm["nc1"] == pytest.approx(ref_nc1, rel=1e-9)
    assert allm["nc2_W_etf_distance"] == pytest.approx(ref_etf(W, W), rel=1e-10)
    assert allm["nc4"] == pytest.approx(np.mean(ncc != pred))
    # Papyan's global mean (mean of all samples) differs for unbalanced classes
    keep = ~((y == 0) & (np.arange(len(y)) % 2 == 0))
    st2 = ClassStatistics(K).update(X[keep], y[keep])
    muS = X[keep].mean(0)
    np.testing.assert_allclose(st2.global_mean("samples"), muS, atol=1e-10)


def test_large_k_closed_forms_and_float32_pass():
    K, d = 4500, 6  # above the direct K x K limit (4096) -> O(K d^2) closed forms
    V = rng.standard_normal((K, d))
    M = rng.standard_normal((K, d))
    ref = ref_etf(V, V)
    assert etf_distance(V) == pytest.approx(ref, abs=1e-7)
    assert nc3_zhu(V, M) == pytest.approx(ref_etf(V, M), abs=1e-7)
    C = ref_cos(V)
    np.fill_diagonal(C, np.nan)
    want = np.nansum(np.abs(C + 1 / (K - 1))) / (K * (K - 1))
    assert equiangularity(V, precision="float64") == pytest.approx(want, rel=1e-10)
    assert equiangularity(V, precision="float32") == pytest.approx(want, rel=1e-5)
    assert tammes(V, precision="float32")["max_cosine"] == pytest.approx(np.nanmax(C), abs=1e-12)


# ---------------- GNC2: exact, certified ----------------


@pytest.mark.parametrize("K,d", [(60, 3), (400, 8), (1500, 16)])
def test_gnc2_certificates(K, d):
    W = rng.standard_normal((K, d)) * rng.uniform(0.5, 2, (K, 1))
    res = gnc2(W)
    for k in range(K):
        primal, dual = certificate_values(W, res, k)
        assert abs(primal - dual) <= 1e-6, k
        assert res.margins[k] == pytest.approx(primal, abs=1e-12)
    assert res.margin == pytest.approx(res.margins.min())
    res32 = gnc2(W, precision="float32", candidates=4, add_violators=2)  # many rounds, float32 check
    np.testing.assert_allclose(res32.margins, res.margins, atol=1e-9)


def test_gnc2_duplicate_rows_give_zero_margin():
    W = rng.standard_normal((30, 4))
    W[7] = 2.5 * W[3]  # same direction after row normalisation
    res = gnc2(W)
    assert res.margins[7] == pytest.approx(0, abs=1e-9) and res.margins[3] == pytest.approx(0, abs=1e-9)
    assert np.all(res.directions[7] == 0) and res.dual[7] == 0
    primal, dual = certificate_values(W, res, 7)
    assert abs(primal - dual) <= 1e-6


def test_projected_gradient_reference_upper_bounds_exact():
    W = rng.standard_normal((80, 5))
    res = gnc2(W)
    pg = gnc2_projected_gradient(W, classes=[0, 1, 2], iterations=3000)
    assert np.all(pg["margins"] >= res.margins[:3] - 1e-9)  # a feasible primal point is an upper bound
    np.testing.assert_allclose(pg["margins"], res.margins[:3], atol=1e-3)


# ---------------- streaming: merge and reduce ----------------


def test_merge_halves_equals_whole():
    K, d = 5, 4
    y = rng.integers(0, K, 300)
    X = rng.standard_normal((300, d)) + 1e3 * rng.standard_normal(d)
    whole = ClassStatistics(K).update(X, y)
    a = ClassStatistics(K).update(X[:140], y[:140])
    b = ClassStatistics(K).update(X[140:], y[140:])
    a.merge(b)
    assert np.array_equal(a.counts, whole.counts)
    np.testing.assert_allclose(a.means(), whole.means(), rtol=1e-13)
    np.testing.assert_allclose(a.within_class_covariance(), whole.within_class_covariance(), atol=1e-10)
    # a half missing a class still merges
    c = ClassStatistics(K).update(X[y != 2], y[y != 2]).merge(ClassStatistics(K).update(X[y == 2], y[y == 2]))
    np.testing.assert_allclose(c.within_class_covariance(), whole.within_class_covariance(), atol=1e-10)
    assert ClassStatistics(K).update(X, y).reduce() is not None  # no process group: a no-op


def _dist_worker(rank, world, path, X, y, K, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    s = ClassStatistics(K, X.shape[1]).update(X[rank::world], y[rank::world]).reduce()
    np.save(f"{out}_{rank}.npy", np.concatenate([s.means().ravel(), s.within_class_covariance().ravel()]))
    dist.barrier()  # both ranks done before the group goes: gloo aborts a rank torn down mid-exchange
    dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (~30 s on a shared 2-core machine)
def test_reduce_two_processes(tmp_path):
    K, d = 4, 3
    y = np.empty(60, dtype=np.int64)
    y[0::2] = np.arange(30) % K  # process 0 sees every class
    y[1::2] = np.arange(30) % 2  # process 1 never sees classes 2 and 3
    X = rng.standard_normal((60, d)) + 100
    torch.multiprocessing.spawn(
        _dist_worker, args=(2, str(tmp_path / "store"), X, y, K, str(tmp_path / "r")), nprocs=2, join=True
    )
    whole = ClassStatistics(K).update(X, y)
    want = np.concatenate([whole.means().ravel(), whole.within_class_covariance().ravel()])
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"r_{r}.npy"), want, atol=1e-10)


# ---------------- bad input ----------------


def test_bad_input_errors():
    X = rng.standard_normal((10, 3))
    y = np.arange(10) % 3
    with pytest.raises(ValueError, match="no samples"):
        nc1(ClassStatistics(4).update(X, y))
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassStatistics(1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        gnc2(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        ClassStatistics(3).update(X, np.arange(10))
    with pytest.raises(ValueError, match=r"must lie in"):
        ClassStatistics(3).update(X, -np.ones(10, int))
    Xn = X.copy()
    Xn[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ClassStatistics(3).update(Xn, y)
    with pytest.raises(ValueError, match="NaN"):
        gnc2(Xn)
    W = rng.standard_normal((5, 3))
    W[2] = 0
    for fn in (gnc2, tammes, equiangularity, nc2):
        with pytest.raises(ValueError, match="zero row"):
            fn(W)
    with pytest.raises(ValueError, match="columns"):
        ClassStatistics(3, 4).update(X, y)
    with pytest.raises(ValueError, match="1-D"):
        ClassStatistics(3).update(X, y[:5])
    with pytest.raises(TypeError):
        nc1(X)
    with pytest.raises(ValueError, match="empty"):
        ClassStatistics(3).means()


# ---------------- per-layer report over a model ----------------


def _tiny_bert(num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_collapse_report_matches_numpy(tmp_path, pooling):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hf_align.analysis.collapse import collapse_report, plot_collapse_progression

    model = _tiny_bert()
    g = torch.Generator().manual_seed(1)
    n, T, K = 24, 7, 3
    ids = torch.randint(5, 50, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::3, 5:] = 0
    labels = torch.arange(n) % K
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]
    rep = collapse_report(model, data, pooling=pooling, batch_size=5)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    pred = out.logits.argmax(-1).numpy()
    assert rep.layers == [0, 1, 2] and rep.num_samples == n
    for l, h in enumerate(out.hidden_states):
        h = h.double()
        if pooling == "cls":
            f = h[:, 0].numpy()
        else:
            m = mask[..., None].double()
            f = ((h * m).sum(1) / m.sum(1)).numpy()
        y = labels.numpy()
        M, Sw, Sb, muG = ref_cov(f, y, K)
        assert rep.per_layer[l]["nc1"] == pytest.approx(np.trace(Sw @ np.linalg.pinv(Sb)) / K, rel=1e-6)
        ncc = np.argmin(((f[:, None] - M[None]) ** 2).sum(-1), 1)
        assert rep.per_layer[l]["nc4"] == pytest.approx(np.mean(ncc != pred))
        W = model.classifier.weight.detach().double().numpy()
        assert rep.per_layer[l]["nc3_zhu"] == pytest.approx(ref_etf(W, M - muG), rel=1e-6)
    Wd = model.classifier.weight.detach().double().numpy()
    assert rep.classifier["nc2_W_etf_distance"] == pytest.approx(ref_etf(Wd, Wd), rel=1e-9)
    fig = plot_collapse_progression(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0 and fig is not None


def test_collapse_report_bad_layers():
    from hf_align.analysis.collapse import collapse_report

    with pytest.raises(ValueError, match="layers must lie"):
        collapse_report(_tiny_bert(), [], layers=[5])
    with pytest.raises(ValueError, match="pooling"):
        collapse_report(_tiny_bert(), [], pooling="max")


def test_margin_formula_independent_small_lp():
    """dist(w_k, conv others) from an independent solver (scipy SLSQP on the simplex) on a tiny case."""
    from scipy.optimize import minimize

    W = rng.standard_normal((9, 3))
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    res = gnc2(W)
    for k in range(3):
        V = np.delete(Wn, k, 0)
        fun = lambda a, k=k, V=V: np.sum((Wn[k] - a @ V) ** 2)
        sol = minimize(fun, np.full(8, 1 / 8), bounds=[(0, 1)] * 8,
                       constraints={"type": "eq", "fun": lambda a: a.sum() - 1}, method="SLSQP",
                       options={"ftol": 1e-14, "maxiter": 500})
        assert math.sqrt(sol.fun) == pytest.approx(res.margins[k], abs=1e-5)
