"""float16 / bfloat16 models (issue 12, acceptance 3): features accumulate in float64 and the constant-layer test
is relative to the dtype's resolution, so half-precision similarity and collapse match the float32 model's
(within 1e-3 for float16, 1e-2 for bfloat16) and only layers that really are constant are undefined."""

import warnings

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from hf_align import collapse_report, layer_similarity
from hf_align.analysis.similarity import default_constant_rtol

N = 48
TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def text_data():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(N):
        t = int(torch.randint(4, 12, (1,), generator=g))
        rows.append({"input_ids": [2] + torch.randint(5, 99, (t - 2,), generator=g).tolist() + [3], "labels": i % 3})
    return rows


def image_data():
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(N)]


# (family, class, config overrides, data, pooling, layers that really are constant)
CASES = {
    # ViT's CLS: the embedding output is one vector for all images; later layers spread ~10% of their norm,
    # which bfloat16 (eps 7.8e-3) resolves -- the old 32-eps rule called every layer constant (all NaN)
    "vit-cls": ("vit", "ViTForImageClassification", {}, image_data, None, [0]),
    "bert-cls": ("bert", "BertForSequenceClassification", dict(initializer_range=0.2), text_data, None, [0]),
    "gpt2-last": ("gpt2", "GPT2ForSequenceClassification", {}, text_data, None, []),
    # the first token of a causal model sees only itself: constant at every layer, in every dtype
    "gpt2-first": ("gpt2", "GPT2ForSequenceClassification", {}, text_data, "cls", [0, 1, 2, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("metric", ["linear_cka", "cosine"])
def test_half_precision_similarity_matches_float32(case, metric):
    family, cls, overrides, data_fn, pooling, constant = CASES[case]
    data = data_fn()
    results = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = tiny_model(family, cls, **overrides).to(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[dtype] = layer_similarity(model, data, metric=metric, pooling=pooling, batch_size=16, progress=False)
        if results[dtype].undefined_layers:
            text = " ".join(str(w.message) for w in caught)
            assert "zero-variance" not in text and str(dtype).replace("torch.", "") in text
    ref = results[torch.float32]
    undefined = [f"layer {k}" for k in constant] if metric != "cosine" else []  # the cosine of a constant is defined
    assert ref.undefined_layers == undefined
    for dtype, tol in TOL.items():
        res = results[dtype]
        assert res.undefined_layers == undefined  # no NaN unless the layer really is constant
        np.testing.assert_array_equal(np.isnan(res.matrix), ref.undefined)
        ok = ~ref.undefined
        assert not ok.any() or np.abs(res.matrix[ok] - ref.matrix[ok]).max() <= tol


def test_half_precision_collapse_matches_float32():
    data = image_data()
    reports = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = tiny_model("vit", "ViTForImageClassification").to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports[dtype] = collapse_report(model, data, batch_size=16, nc4=False, gnc2_margin=False)
    ref = reports[torch.float32]
    assert ref.undefined_layers == [0]
    for dtype, tol in TOL.items():
        rep = reports[dtype]
        assert rep.undefined_layers == [0]
        for layer in (1, 2, 3):
            for key in ("nc1", "nc2_means_etf_distance", "gnc3"):
                a, b = rep.per_layer[layer][key], ref.per_layer[layer][key]
                assert np.isfinite(a) and abs(a - b) <= 10 * tol * max(1.0, abs(b)), (dtype, layer, key, a, b)


def test_default_constant_rtol_is_the_dtype_resolution():
    assert default_constant_rtol(torch.float32) == 32 * torch.finfo(torch.float32).eps
    assert default_constant_rtol(torch.float16) == 2 * torch.finfo(torch.float16).eps
    assert default_constant_rtol(torch.bfloat16) == 2 * torch.finfo(torch.bfloat16).eps
    assert default_constant_rtol(torch.int64) == 32 * torch.finfo(torch.float64).eps
