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


def test_one_name_per_metric_everywhere(monkeypatch):
    """The metric table: each name is the function, the layer_similarity metric and the evaluate configuration,
    and the three give the same number (checked against the numpy reference for linear CKA)."""
    import torch
    from tiny_models import tiny_model

    from hf_align import layer_similarity
    from hf_align.analysis.similarity import SIMILARITY_METRICS, similarity_metric

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    model = tiny_model("bert", "BertForSequenceClassification")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (24, 6), generator=g)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    feats = [h[:, 0].double().numpy() for h in hs]  # CLS, the family's own pooling
    data = [{"input_ids": row} for row in ids]
    assert similarity_metric("cka").name == "linear_cka" and similarity_metric("debiased_cka").name == "debiased_linear_cka"
    for name, metric in SIMILARITY_METRICS.items():
        kwargs = {"batch_size": 8} if name == "minibatch_cka" else {}
        value = metric.function(feats[1], feats[3], **kwargs)
        out = evaluate.load(FOLDER, name).compute(predictions=feats[1].tolist(), references=feats[3].tolist(), **kwargs)
        assert out["cosine" if name == "cosine" else "cka"] == pytest.approx(value, abs=1e-12)
        if metric.streamed:
            res = layer_similarity(model, data, metric=name, batch_size=8, progress=False)
            assert res.metric == name
            assert res.matrix[1, 3] == pytest.approx(value, abs=1e-6)
        else:
            with pytest.raises(ValueError, match="n\\^2 sample pairs"):
                layer_similarity(model, data, metric=name, progress=False)
    assert SIMILARITY_METRICS["linear_cka"].function(feats[1], feats[3]) == pytest.approx(ref_linear_cka(feats[1], feats[3]))
