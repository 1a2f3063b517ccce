"""hf_align.layer_similarity on tiny random models vs an independent reference: the model's own
``output_hidden_states=True`` forward over all the data at once, pooled by hand, numpy n x n CKA formulas."""

import os
import textwrap
import warnings

import numpy as np
import pytest
import torch
from references import ref_linear_cka as ref_cka
from references import ref_u_center as ref_u
from torchrun import run_two_processes
from transformers import BertConfig, BertForSequenceClassification

from hf_align.analysis import rank_correlation
from hf_align.analysis.collect import UndefinedSimilarityWarning, layer_similarity
from hf_align.analysis.pooling import pool
from hf_align.analysis.similarity import SimilarityUndefinedError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_bert(seed=0, hidden=32, layers=2):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, num_labels=3, pad_token_id=0,
    )
    return BertForSequenceClassification(cfg).eval()


def make_examples(n=23, seed=0, cls_id=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(3, 9))
        ids = rng.integers(1, 50, size=T).tolist()
        if cls_id is not None:
            ids[0] = cls_id
        out.append({"input_ids": ids, "text": "ignored", "label": 1})
    return out


def reference_features(model, examples, pooling):
    """All examples in one padded batch, the model's own forward with output_hidden_states."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (T - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (T - len(e["input_ids"])) for e in examples])
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    out = []
    for h in hs:
        h = h.double()
        m = mask.bool()
        if pooling == "cls":
            f = h[:, 0]
        elif pooling == "mean":
            f = torch.stack([h[i, m[i]].mean(0) for i in range(len(h))])
        elif pooling == "last":
            f = torch.stack([h[i, int(m[i].sum()) - 1] for i in range(len(h))])
        else:
            f = torch.cat([h[i, m[i]] for i in range(len(h))])
        out.append(f.numpy())
    return out


def ref_dcka(a, b):
    K, L = ref_u(a @ a.T), ref_u(b @ b.T)
    return np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))


def ref_cos(a, b):
    return np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def test_pool_helpers_left_and_right_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(h, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(h, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(h, right, "mean").flatten().tolist() == [0.5, 5.5]
    assert pool(h, right, "tokens").flatten().tolist() == [0.0, 1.0, 4.0, 5.0, 6.0, 7.0]
    assert pool(h, None, "cls").flatten().tolist() == [0.0, 4.0]
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(h, right, "max")


@pytest.mark.parametrize("pooling", ["cls", "mean", "last", "tokens"])
def test_matches_reference_all_poolings(pooling):
    model = tiny_bert()
    ex = make_examples()
    feats = reference_features(model, ex, pooling)
    res = layer_similarity(model, ex, metric="cka", pooling=pooling, batch_size=5, progress=False)
    ref = np.array([[ref_cka(a, b) for b in feats] for a in feats])
    assert res.matrix.shape == (3, 3) and res.layers == [0, 1, 2] and not res.undefined.any()
    np.testing.assert_allclose(res.matrix, ref, atol=1e-5)
    assert res.num_samples == len(feats[0])


def test_metrics_and_data_forms_agree():
    from datasets import Dataset
    from torch.utils.data import DataLoader

    model = tiny_bert(1)
    ex = make_examples(30, seed=1)
    feats = reference_features(model, ex, "mean")
    dcka = layer_similarity(model, ex, metric="debiased_cka", pooling="mean", batch_size=7, progress=False)
    np.testing.assert_allclose(dcka.matrix, [[ref_dcka(a, b) for b in feats] for a in feats], atol=1e-5)
    cos = layer_similarity(model, ex, metric="cosine", pooling="mean", batch_size=7, progress=False)
    np.testing.assert_allclose(cos.matrix, [[ref_cos(a, b) for b in feats] for a in feats], atol=1e-5)
    cc = layer_similarity(model, ex, metric="cosine", center=True, pooling="mean", batch_size=7, progress=False)
    fc = [f - f.mean(0) for f in feats]
    np.testing.assert_allclose(cc.matrix, [[ref_cos(a, b) for b in fc] for a in fc], atol=1e-5)
    # same data as a datasets.Dataset and as a DataLoader of padded dict batches
    ds = Dataset.from_list(ex)
    cka_list = layer_similarity(model, ex, pooling="mean", batch_size=7, progress=False)
    cka_ds = layer_similarity(model, ds, pooling="mean", batch_size=7, progress=False)
    from hf_align.analysis.collect import _default_collate

    dl = DataLoader(ex, batch_size=6, collate_fn=lambda b: _default_collate(b, 0))
    cka_dl = layer_similarity(model, dl, pooling="mean", progress=False)
    np.testing.assert_allclose(cka_ds.matrix, cka_list.matrix, atol=1e-10)
    np.testing.assert_allclose(cka_dl.matrix, cka_list.matrix, atol=1e-5)
    # the paper's claim as a number: rank agreement of cosine and CKA (finite, in [-1, 1])
    rho = rank_correlation(cos, cka_list)
    assert -1 <= rho <= 1
    mb = layer_similarity(model, ex, metric="minibatch_cka", pooling="mean", batch_size=10, progress=False)
    assert np.allclose(np.diag(mb.matrix), 1.0)


def test_model_a_vs_model_b():
    a, b = tiny_bert(0), tiny_bert(5, hidden=16, layers=3)
    ex = make_examples(20, seed=2)
    fa, fb = reference_features(a, ex, "cls"), reference_features(b, ex, "cls")
    res = layer_similarity(a, ex, metric="cka", pooling="cls", batch_size=6, model_b=b, progress=False)
    assert res.matrix.shape == (3, 4) and res.layers_b == [0, 1, 2, 3]
    np.testing.assert_allclose(res.matrix, [[ref_cka(x, y) for y in fb] for x in fa], atol=1e-5)
    with pytest.raises(ValueError, match="same width"):
        layer_similarity(a, ex, metric="cosine", model_b=b, progress=False)


def test_constant_cls_embedding_is_flagged(tmp_path):
    """Every input starts with the same token: the embedding output at CLS is constant -> layer 0 undefined."""
    model = tiny_bert(2)
    ex = make_examples(16, seed=3, cls_id=7)
    with pytest.warns(UndefinedSimilarityWarning, match="layer 0"):
        res = layer_similarity(model, ex, metric="cka", pooling="cls", batch_size=4, progress=False)
    assert res.undefined_layers == ["layer 0"]
    assert res.undefined[0].all() and res.undefined[:, 0].all() and not res.undefined[1:, 1:].any()
    assert np.isnan(res.matrix[0]).all() and np.isfinite(res.matrix[1:, 1:]).all()
    with pytest.raises(SimilarityUndefinedError, match="layer 0"):
        layer_similarity(model, ex, metric="debiased_cka", pooling="cls", batch_size=4, progress=False, on_undefined="raise")
    # plot marks it n/a and writes a file
    fig = res.plot(path=tmp_path / "cka.png")
    assert (tmp_path / "cka.png").stat().st_size > 1000
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("n/a") == 5  # row 0 and column 0 of a 3 x 3 matrix
    # uncentred cosine is defined there
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedSimilarityWarning)
        cos = layer_similarity(model, ex, metric="cosine", pooling="cls", batch_size=4, progress=False)
    assert np.isfinite(cos.matrix).all()


def test_bad_arguments():
    model = tiny_bert()
    ex = make_examples(8)
    with pytest.raises(ValueError, match="unknown metric"):
        layer_similarity(model, ex, metric="rbf_cka", progress=False)
    with pytest.raises(ValueError, match="unknown pooling"):
        layer_similarity(model, ex, pooling="max", progress=False)
    with pytest.raises(TypeError):
        layer_similarity(model, 42, progress=False)
    with pytest.raises(ValueError, match=">= 4"):
        layer_similarity(model, ex[:7], metric="minibatch_cka", batch_size=5, progress=False)


_DIST_SCRIPT = textwrap.dedent(
    """
    import os, sys, json, numpy as np, torch, torch.distributed as dist
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_layer_similarity import tiny_bert, make_examples
    from hf_align.analysis.collect import layer_similarity
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, ex = tiny_bert(3), make_examples(29, seed=4)
    out = {{}}
    for metric, pooling in [("cka", "mean"), ("debiased_cka", "tokens"), ("cosine", "last"), ("minibatch_cka", "mean")]:
        out[metric] = layer_similarity(model, ex, metric=metric, pooling=pooling, batch_size=5, progress=False).matrix.tolist()
    if dist.get_rank() == 0:
        json.dump(out, open(sys.argv[1], "w"))
    dist.barrier()  # both ranks done before the group goes: gloo aborts a rank torn down mid-exchange
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    run_two_processes(_DIST_SCRIPT, tmp_path, 29517, "out.json")
    import json

    two = json.loads((tmp_path / "out.json").read_text())
    model, ex = tiny_bert(3), make_examples(29, seed=4)
    for metric, pooling in [("cka", "mean"), ("debiased_cka", "tokens"), ("cosine", "last"), ("minibatch_cka", "mean")]:
        one = layer_similarity(model, ex, metric=metric, pooling=pooling, batch_size=5, progress=False).matrix
        np.testing.assert_allclose(np.array(two[metric]), one, rtol=1e-10, atol=1e-12)
