"""Streaming accumulators: exact equality with whole-matrix computation, any batch size; undefined blocks."""

import numpy as np
import pytest
import torch
from references import ref_u_center

from hf_align.analysis.similarity import cosine, debiased_linear_cka, linear_cka, minibatch_cka
from hf_align.analysis.streaming import StreamingCKA, StreamingCosine, StreamingMean, StreamingMinibatchCKA


def ref_cka_matrices(blocks):
    """n x n references: linear CKA via H K H, debiased via U-centred Grams."""
    n = blocks[0].shape[0]
    H = np.eye(n) - 1.0 / n
    Ks = [b @ b.T for b in blocks]
    Kc = [H @ K @ H for K in Ks]
    Ku = [ref_u_center(K) for K in Ks]
    lin = np.array([[np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) for b in Kc] for a in Kc])
    deb = np.array([[np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) for b in Ku] for a in Ku])
    return lin, deb


def make_blocks(n=30, dims=(5, 8, 5, 3), seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dims[0]))
    out = []
    for d in dims:
        out.append(np.tanh(base @ rng.normal(size=(base.shape[1], d))) + 0.4 * rng.normal(size=(n, d)) + offset * rng.uniform(0.5, 1.5, d))
    return out


def stream(acc, blocks, bs, to=torch.float64):
    n = blocks[0].shape[0]
    for s in range(0, n, bs):
        acc.update([torch.tensor(b[s : s + bs]).to(to) for b in blocks])
    return acc


@pytest.mark.parametrize("bs", [1, 7, 30])
def test_streaming_cka_equals_whole_matrix(bs):
    blocks = make_blocks()
    lin_ref, deb_ref = ref_cka_matrices(blocks)
    acc = stream(StreamingCKA(), blocks, bs)
    lin, deb = acc.linear_cka(), acc.debiased_cka()
    assert lin.n == 30 and not lin.undefined.any() and not deb.undefined.any()
    np.testing.assert_allclose(lin.values, lin_ref, rtol=1e-8, atol=0)
    np.testing.assert_allclose(deb.values, deb_ref, rtol=1e-8, atol=1e-12)
    # and against the whole-matrix functions of this package
    for k in range(4):
        for l in range(4):  # noqa: E741
            assert lin.values[k, l] == pytest.approx(linear_cka(blocks[k], blocks[l]), rel=1e-8)
            assert deb.values[k, l] == pytest.approx(debiased_linear_cka(blocks[k], blocks[l]), rel=1e-8, abs=1e-12)
    np.testing.assert_allclose(np.concatenate([m.numpy() for m in acc.mean()]), np.concatenate([b.mean(0) for b in blocks]), rtol=1e-12)


@pytest.mark.parametrize("bs", [1, 7, 30])
def test_streaming_cosine_equals_whole_matrix(bs):
    blocks = make_blocks(dims=(6, 6, 6))
    acc = stream(StreamingCosine(), blocks, bs)
    got = acc.cosine().values
    ref = np.array([[np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))) for b in blocks] for a in blocks])
    np.testing.assert_allclose(got, ref, rtol=1e-8)
    # centred: two passes, means from the first
    means = stream(StreamingMean(), blocks, bs).means()
    got_c = stream(StreamingCosine(center=means), blocks, bs).cosine().values
    for k in range(3):
        for l in range(3):  # noqa: E741
            assert got_c[k, l] == pytest.approx(cosine(blocks[k], blocks[l], center=True), rel=1e-8)


@pytest.mark.parametrize("bs", [4, 7, 10])
def test_streaming_minibatch_equals_function(bs):
    blocks = make_blocks(n=40 if bs != 7 else 35)
    acc = stream(StreamingMinibatchCKA(), blocks, bs)
    got = acc.minibatch_cka().values
    for k in range(4):
        for l in range(4):  # noqa: E741
            assert got[k, l] == pytest.approx(minibatch_cka(blocks[k], blocks[l], batch_size=bs), rel=1e-8)
    with pytest.raises(ValueError, match=">= 4 samples"):
        acc.update([torch.zeros(3, d) for d in (5, 8, 5, 3)])


def test_streaming_huge_offset_float32():
    """Offset 1e4 x spread, float32 features, batch size 1 and 16: no catastrophic cancellation."""
    blocks32 = [b.astype(np.float32) for b in make_blocks(n=200, offset=1e4)]
    b64 = [b.astype(np.float64) for b in blocks32]
    lin_ref, deb_ref = ref_cka_matrices([b - b.mean(0) for b in b64])
    for bs in (1, 16):
        acc = stream(StreamingCKA(), blocks32, bs, to=torch.float32)
        np.testing.assert_allclose(acc.linear_cka().values, lin_ref, rtol=1e-8)
        np.testing.assert_allclose(acc.debiased_cka().values, deb_ref, rtol=1e-7, atol=1e-10)


def test_constant_block_is_reported_undefined_not_nan_silently():
    blocks = make_blocks(n=24)
    blocks[1] = np.tile(np.linspace(-2, 3, 8), (24, 1)) + 1e3  # constant layer (e.g. CLS embedding output)
    acc = stream(StreamingCKA(), blocks, 5, to=torch.float32)
    for res in (acc.linear_cka(), acc.debiased_cka()):
        assert res.undefined_blocks == [1]
        expect = np.zeros((4, 4), bool)
        expect[1, :] = expect[:, 1] = True
        np.testing.assert_array_equal(res.undefined, expect)
        assert np.isnan(res.values[res.undefined]).all() and np.isfinite(res.values[~res.undefined]).all()
    mb = stream(StreamingMinibatchCKA(), blocks, 6, to=torch.float32).minibatch_cka()
    assert mb.undefined_blocks == [1] and np.isfinite(mb.values[~mb.undefined]).all()
    # centred cosine of a constant layer: undefined; uncentred: defined
    eq = [blocks[0][:, :5], blocks[1][:, :5], blocks[2][:, :5]]
    means = stream(StreamingMean(), eq, 5).means()
    assert stream(StreamingCosine(center=means), eq, 5, to=torch.float32).cosine().undefined_blocks == [1]
    assert stream(StreamingCosine(), eq, 5).cosine().undefined_blocks == []


def test_streaming_bad_input():
    acc = StreamingCKA()
    acc.update([torch.randn(4, 3), torch.randn(4, 2)])
    with pytest.raises(ValueError, match="same samples"):
        acc.update([torch.randn(4, 3), torch.randn(5, 2)])
    with pytest.raises(ValueError, match="widths changed"):
        acc.update([torch.randn(4, 3), torch.randn(4, 5)])
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.update([torch.full((2, 3), float("nan")), torch.randn(2, 2)])
    with pytest.raises(TypeError):
        acc.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least 4"):
        stream(StreamingCKA(), [np.random.randn(3, 2)], 3).debiased_cka()
    with pytest.raises(ValueError, match="same width"):
        StreamingCosine().update([torch.randn(4, 3), torch.randn(4, 2)])
