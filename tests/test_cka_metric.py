"""The `evaluate` CKA module, loaded from its folder, vs independent numpy references."""

import os

import numpy as np
import pytest
from references import ref_linear_cka
from references import ref_u_center as ref_u

evaluate = pytest.importorskip("evaluate")

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf_align", "metrics", "cka")


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 6))
    Y = np.tanh(X @ rng.normal(size=(6, 4))) + 0.3 * rng.normal(size=(30, 4))
    return X, Y


def test_linear_and_debiased(xy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    X, Y = xy
    lin = evaluate.load(FOLDER, "linear")
    got = lin.compute(predictions=X.tolist(), references=Y.tolist())["cka"]
    assert got == pytest.approx(ref_linear_cka(X, Y), abs=1e-9)
    deb = evaluate.load(FOLDER, "debiased")
    K, L = ref_u(X @ X.T), ref_u(Y @ Y.T)
    assert deb.compute(predictions=X.tolist(), references=Y.tolist())["cka"] == pytest.approx(
        np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L)), abs=1e-9
    )
    # incremental add_batch gives the same value as one compute call
    for s in range(0, 30, 7):
        lin.add_batch(predictions=X[s : s + 7].tolist(), references=Y[s : s + 7].tolist())
    assert lin.compute()["cka"] == pytest.approx(got, abs=1e-12)


def test_other_configs_and_errors(xy):
    X, Y = xy
    assert evaluate.load(FOLDER, "rbf").compute(predictions=X.tolist(), references=X.tolist())["cka"] == pytest.approx(1.0)
    mb = evaluate.load(FOLDER, "minibatch").compute(predictions=X.tolist(), references=(2 * X).tolist(), batch_size=10)
    assert mb["cka"] == pytest.approx(1.0)
    cos = evaluate.load(FOLDER, "cosine").compute(predictions=X.tolist(), references=(-X).tolist())
    assert cos["cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        evaluate.load(FOLDER, "linear").compute(predictions=[[1.0, 2.0]] * 10, references=Y[:10].tolist())
    with pytest.raises(ValueError, match="unknown CKA configuration"):
        evaluate.load(FOLDER, "nope")
