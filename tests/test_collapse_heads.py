"""collapse_report with its defaults on BERT, ViT and GPT-2 classifiers (issue 12, acceptance 2): head features
(the input of the final linear classifier when the shared head is applied at layer l), constant layers flagged,
never fatal. References: the classifier's input recorded by a forward pre-hook during the model's own forward,
a truncated copy of the model for an intermediate layer, numpy float64 formulas."""

import copy
import warnings

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from hf_align import LayerView, collapse_report
from hf_align.analysis.collapse import UndefinedCollapseWarning

N, K = 36, 3
CASES = {
    "bert": ("bert", "BertForSequenceClassification"),
    "vit": ("vit", "ViTForImageClassification"),
    "gpt2": ("gpt2", "GPT2ForSequenceClassification"),
}


def make_data(name, seed=1):
    """Tokenized rows as a tokenizer makes them ([CLS]=2 ... [SEP]=3, unpadded) or images; labels 0..K-1;
    and the same samples as one padded batch for the reference forward."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % K
    if name == "vit":
        pixels = torch.randn(N, 3, 16, 16, generator=g)
        return [{"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(N)], {"pixel_values": pixels}, labels
    lengths = torch.randint(4, 10, (N,), generator=g).tolist()
    rows = [[2] + torch.randint(5, 99, (t - 2,), generator=g).tolist() + [3] for t in lengths]
    T = max(lengths)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])  # pad id 0 (the tiny configs' pad_token_id)
    mask = (ids != 0).long()
    return [{"input_ids": r, "label": int(y)} for r, y in zip(rows, labels)], {"input_ids": ids, "attention_mask": mask}, labels


def classifier_input(model, inputs):
    """What the final linear classifier receives during the model's own forward (forward pre-hook)."""
    seen = []
    handle = LayerView(model).classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    assert len(seen) == 1
    x = seen[0].double()
    if x.ndim == 3:  # decoder classifiers score every token and read the logits at the last non-padding one
        last = (inputs["input_ids"] != model.config.pad_token_id).long().cumsum(1).argmax(1)
        x = x[torch.arange(x.shape[0]), last]
    return x.numpy(), logits


def ref_stats(f, y):
    means = np.stack([f[y == c].mean(0) for c in range(K)])
    centred = f - means[y]
    sw = centred.T @ centred / len(f)
    mc = means - means.mean(0)
    sb = mc.T @ mc / K
    return means, np.trace(sw @ np.linalg.pinv(sb)) / K, mc


def ref_gnc3(W, mc):
    return np.mean(1 - np.sum(W * mc, 1) / (np.linalg.norm(W, axis=1) * np.linalg.norm(mc, axis=1)))


@pytest.mark.parametrize("name", list(CASES))
def test_default_report_uses_head_features(name):
    model = tiny_model(*CASES[name])
    model.train()  # left in train mode by the user: the report runs in eval mode and restores it
    data, inputs, labels = make_data(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = collapse_report(model, data, batch_size=8)  # default arguments
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert rep.features == "head" and rep.pooling == "head" and rep.layers == [0, 1, 2, 3]
    # layer 0 at the first token is the same vector for every sample in BERT ([CLS]) and ViT (CLS token):
    # flagged, NaN, warned about; GPT-2 pools its last non-padding token, which varies
    expect_constant = [0] if name in ("bert", "vit") else []
    assert rep.undefined_layers == expect_constant
    if expect_constant:
        assert np.isnan(rep.per_layer[0]["nc1"]) and "constant" in rep.undefined_reasons[0]
        assert any(issubclass(w.category, UndefinedCollapseWarning) for w in caught)
    # the last layer's head features are exactly the classifier's input in the model's own forward
    feats, logits = classifier_input(model, inputs)
    y = labels.numpy()
    means, nc1, mc = ref_stats(feats, y)
    np.testing.assert_allclose(rep.statistics[-1].means(), means, atol=1e-6)  # batches of 8 (own padding)
    assert rep.per_layer[-1]["nc1"] == pytest.approx(nc1, rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedCollapseWarning)
        rep = collapse_report(model, data, batch_size=N)  # one batch, padded exactly as the reference
    np.testing.assert_allclose(rep.statistics[-1].means(), means, rtol=0, atol=1e-12)
    last = rep.per_layer[-1]
    assert last["nc1"] == pytest.approx(nc1, rel=1e-9)
    W = LayerView(model).classifier.weight.detach().double().numpy()
    assert W.shape[1] == feats.shape[1]  # NC3 / GNC3: W and the means live in the same space
    assert last["gnc3"] == pytest.approx(ref_gnc3(W, mc), rel=1e-9)
    ncc = np.argmin(((feats[:, None] - means[None]) ** 2).sum(-1), 1)
    assert last["nc4"] == pytest.approx(np.mean(ncc != logits.argmax(-1).numpy()))


def test_head_features_at_an_intermediate_layer_equal_a_truncated_model():
    """Head features at layer 2 of a 3-layer BERT = the classifier input of the same model cut after block 2."""
    model = tiny_model("bert", "BertForSequenceClassification")
    data, inputs, labels = make_data("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedCollapseWarning)
        rep = collapse_report(model, data, batch_size=N, nc4=False)
    cut = copy.deepcopy(model)
    cut.bert.encoder.layer = cut.bert.encoder.layer[:2]
    cut.config.num_hidden_layers = 2
    feats, _ = classifier_input(cut, inputs)
    means, nc1, _ = ref_stats(feats, labels.numpy())
    np.testing.assert_allclose(rep.statistics[2].means(), means, rtol=0, atol=1e-12)
    assert rep.per_layer[2]["nc1"] == pytest.approx(nc1, rel=1e-9)


def test_hidden_features_stay_an_option_and_undefined_layers_are_never_fatal():
    model = tiny_model("gpt2", "GPT2ForSequenceClassification")
    data, inputs, labels = make_data("gpt2")
    # hidden states at the first token of a causal model: the same vector at every layer -> all undefined
    with pytest.warns(UndefinedCollapseWarning, match="layer 0: constant"):
        rep = collapse_report(model, data, features="hidden", pooling="cls", batch_size=8)
    assert rep.features == "hidden" and rep.undefined_layers == [0, 1, 2, 3]
    assert all(np.isnan(m["nc1"]) for m in rep.per_layer)
    with pytest.raises(ValueError, match="undefined"):
        collapse_report(model, data, features="hidden", pooling="cls", on_undefined="raise")
    # the model's own pooling ("last") on hidden states: as output_hidden_states returns them (ln_f on the last)
    rep = collapse_report(model, data, features="hidden", batch_size=8, nc4=False)
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
    last = inputs["attention_mask"].sum(1) - 1
    f = hs[-1].double()[torch.arange(N), last].numpy()
    assert rep.pooling == "last" and rep.per_layer[-1]["nc1"] == pytest.approx(ref_stats(f, labels.numpy())[1], rel=1e-6)


def test_bad_arguments_fail_before_any_work():
    model = tiny_model("bert", "BertForSequenceClassification")
    data, _, _ = make_data("bert")
    with pytest.raises(ValueError, match="pooling applies to features='hidden'"):
        collapse_report(model, data, features="head", pooling="mean")
    with pytest.raises(ValueError, match="features must be one of"):
        collapse_report(model, data, features="logits")
    bad = [dict(e) for e in data]
    bad[-1]["label"] = 7
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\].*got 7"):
        collapse_report(model, bad)


_DIST_SCRIPT = """
import json, sys, warnings
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
from test_collapse_heads import make_data
from tiny_models import tiny_model
from hf_align import collapse_report
model = tiny_model("bert", "BertForSequenceClassification")
data, _, _ = make_data("bert")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rep = collapse_report(model, data, batch_size=5)
if dist.get_rank() == 0:
    json.dump({{"per_layer": rep.per_layer, "n": rep.num_samples, "undefined": rep.undefined_layers}}, open(sys.argv[1], "w"))
dist.barrier()  # both ranks done before the group goes: gloo aborts a rank torn down mid-exchange
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Batches dealt round-robin over 2 gloo processes, statistics and NC4 counts summed: the 1-process report."""
    import json

    from torchrun import run_two_processes

    run_two_processes(_DIST_SCRIPT, tmp_path, 29523, "out.json")
    two = json.loads((tmp_path / "out.json").read_text())
    data, _, _ = make_data("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = collapse_report(tiny_model("bert", "BertForSequenceClassification"), data, batch_size=5)
    assert two["n"] == one.num_samples == N and two["undefined"] == one.undefined_layers == [0]
    for a, b in zip(two["per_layer"], one.per_layer):
        for key, value in b.items():
            if np.isnan(value):
                assert a[key] is None or np.isnan(a[key])
            else:
                assert a[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
