"""Token-level collapse of causal LMs (the vocabulary as the classes): statistics and metrics against an
independent float64 computation from the model's own forward (output_hidden_states, and a pre-hook on the LM
head for the last layer), padding / -100 exclusion, the options, and 2 processes = 1."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from tiny_models import tiny_decoder, tiny_model
from torchrun import run_two_processes

from hf_align import collapse_report
from hf_align.analysis.collapse import TokenCollapseReport, gnc2, token_collapse_report

# the final norm (and OPT's projection) each family applies before its LM head, written out by hand
NORMS = {
    "llama": lambda m, h: m.model.norm(h),
    "gpt2": lambda m, h: m.transformer.ln_f(h),
    "qwen3": lambda m, h: m.model.norm(h),
    "opt": lambda m, h: m.model.decoder.project_out(m.model.decoder.final_layer_norm(h)),
}


def make_model(family):
    if family == "llama":
        return tiny_model("llama", "LlamaForCausalLM", vocab_size=24).double()
    if family == "gpt2":
        return tiny_model("gpt2", "GPT2LMHeadModel", vocab_size=24).double()
    return tiny_decoder(family, num_layers=3, vocab_size=24)  # float64


def make_batches(seed=0, vocab=24):
    """Two left-padded batches with ragged lengths, pad id 0 also inside real text, and -100 labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in ((4, 9), (3, 12)):
        ids = torch.randint(0, vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        for b in range(1, B):
            mask[b, : 2 * b] = 0  # left padding
        ids[mask == 0] = 0
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[0, 3] = -100  # a real position without a target: the feature at position 2 is left out
        labels[1, -1] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def reference_samples(model, batches, family):
    """Per layer, (features, targets) of every predicted position, from the model's own forward in float64."""
    L = model.config.num_hidden_layers
    feats = [[] for _ in range(L + 1)]
    ys = []
    head = model.get_output_embeddings()
    captured = []
    for batch in batches:
        captured.clear()
        handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
        try:
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        finally:
            handle.remove()
        hs = out.hidden_states
        assert len(hs) == L + 1
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        B, T = ids.shape
        for b in range(B):
            for t in range(T - 1):
                if mask[b, t] and mask[b, t + 1] and labels[b, t + 1] != -100:
                    ys.append(int(labels[b, t + 1]))
                    for layer in range(L):
                        with torch.no_grad():
                            feats[layer].append(NORMS[family](model, hs[layer][b, t]).numpy())
                    feats[L].append(captured[0][b, t].numpy())  # exactly what lm_head received
    return [np.array(f, dtype=np.float64) for f in feats], np.array(ys)


def ref_metrics(X, y, W):
    """Every token-level metric in float64 numpy, straight from the definitions (module docstring)."""
    classes = np.unique(y)
    K = classes.size
    n = np.array([np.sum(y == k) for k in classes], dtype=np.float64)
    M = np.array([X[y == k].mean(0) for k in classes])
    N = X.shape[0]
    Sw = sum(((X[y == k] - M[i]).T @ (X[y == k] - M[i])) for i, k in enumerate(classes)) / N
    var = np.array([np.mean(np.sum((X[y == k] - M[i]) ** 2, axis=1)) for i, k in enumerate(classes)])
    out = {"counts": n, "means": M, "sw": Sw}
    Ws = W[classes]
    for sfx, pi in (("", np.full(K, 1.0 / K)), ("_freq", n / N)):
        muG = pi @ M
        Mc = M - muG
        Sb = sum(pi[i] * np.outer(Mc[i], Mc[i]) for i in range(K))
        out["nc1" + sfx] = np.trace(Sw @ np.linalg.pinv(Sb)) / K
        num = den = 0.0
        coincident = 0
        for i in range(K):
            for j in range(K):
                d2 = np.sum((M[i] - M[j]) ** 2)
                if i != j and d2 <= 1e-12 * (M[i] @ M[i] + M[j] @ M[j]):
                    coincident += 1  # means that coincide (same token before, at the embedding layer)
                elif i != j:
                    num += pi[i] * pi[j] * (var[i] + var[j]) / (2 * d2)
                    den += pi[i] * pi[j]
        out["cdnv" + sfx] = num / den
        out["coincident_mean_pairs"] = coincident / (K * (K - 1))
        norms = np.linalg.norm(Mc, axis=1)
        out["mean_norm" + sfx] = pi @ norms
        out["equinorm" + sfx] = math.sqrt(pi @ (norms - pi @ norms) ** 2) / (pi @ norms)
        live = np.linalg.norm(Ws, axis=1) > 0  # OPT's pad row (padding_idx, tied head) is zero: no direction
        cos = np.sum(Ws * Mc, 1)[live] / np.linalg.norm(Ws, axis=1)[live] / norms[live]
        out["gnc3" + sfx] = pi[live] @ (1 - cos) / pi[live].sum()
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "opt"])
def test_token_statistics_and_metrics_equal_a_float64_reference(family):
    model = make_model(family)
    batches = make_batches()
    feats, y = reference_samples(model, batches, family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no undefined layer here
        rep = collapse_report(model, batches, batch_size=4)
    assert isinstance(rep, TokenCollapseReport) and rep.features == "head"
    W = model.get_output_embeddings().weight.detach().double().numpy()
    assert rep.num_classes == W.shape[0] == 24
    assert rep.layers == list(range(model.config.num_hidden_layers + 1))
    assert rep.num_tokens == rep.num_samples == y.size
    np.testing.assert_array_equal(rep.class_counts, np.bincount(y, minlength=24))
    np.testing.assert_array_equal(rep.seen_classes, np.unique(y))
    assert rep.num_unseen == 24 - np.unique(y).size
    coincide = []
    for layer, X in enumerate(feats):
        ref = ref_metrics(X, y, W)
        stats = rep.statistics[layer]
        np.testing.assert_array_equal(stats.counts, ref["counts"])
        np.testing.assert_allclose(stats.means(), ref["means"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(stats.within_class_covariance(), ref["sw"], rtol=0, atol=1e-10)
        for key in ("nc1", "cdnv", "mean_norm", "equinorm", "gnc3"):
            for sfx in ("", "_freq"):
                assert rep.per_layer[layer][key + sfx] == pytest.approx(ref[key + sfx], rel=1e-7), (layer, key + sfx)
        assert rep.per_layer[layer]["coincident_mean_pairs"] == ref["coincident_mean_pairs"]
        coincide.append(ref["coincident_mean_pairs"])
        # the margins of the unit centered means (gnc2 itself is checked against known geometry in test_collapse)
        margins = gnc2(ref["means"] - ref["means"].mean(0)).margins
        assert rep.per_layer[layer]["gnc2_means_margin"] == pytest.approx(margins.min(), abs=1e-6)
        assert rep.per_layer[layer]["gnc2_means_margin_mean_freq"] == pytest.approx(ref["counts"] @ margins / y.size, abs=1e-6)
    # Llama / Qwen3 / OPT's embedding output depends on the token alone: tokens that only follow one same token
    # share a mean there (left out of CDNV); GPT-2 adds position embeddings
    assert (coincide[0] > 0) == (family != "gpt2") and not any(coincide[1:])


def test_last_layer_features_are_the_lm_head_input():
    """The last layer's class means are those of what lm_head receives in the model's own forward (a pre-hook),
    for a model whose head input is not the last hidden state (OPT projects it to a smaller width)."""
    model = make_model("opt")
    batches = make_batches(1)
    feats, y = reference_samples(model, batches, "opt")
    assert feats[-1].shape[1] == 16 != model.config.hidden_size
    rep = token_collapse_report(model, batches, layers=[3], gnc2_margin=False)
    np.testing.assert_allclose(rep.statistics[0].means(), ref_metrics(feats[-1], y, np.ones((24, 16)))["means"], atol=1e-12)


def test_padding_and_ignored_labels_are_excluded():
    """The same sequences left-padded, right-padded, and one per batch give the same statistics; -100 targets and
    padded positions never count; pad ids inside real text do."""
    model = make_model("llama")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 24, (n,), generator=g) for n in (9, 4, 7, 2)]
    seqs[1][1] = 0  # a real token equal to the pad id
    ignored = {(2, 4)}  # (sequence, position): no target there

    def labels_of(i, s):
        lab = s.clone()
        for j, p in ignored:
            if j == i:
                lab[p] = -100
        return lab

    def padded(side):
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, 7)  # pad positions hold a *valid* token id: the mask alone must exclude them
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl], labels[i, sl] = s, 1, labels_of(i, s)
        return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]

    single = [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long),
               "labels": labels_of(i, s)[None]} for i, s in enumerate(seqs)]
    reps = [token_collapse_report(model, d, gnc2_margin=False) for d in (padded("left"), padded("right"), single)]
    expected = sum(len(s) - 1 for s in seqs) - len(ignored)
    want = np.zeros(24, dtype=np.int64)
    for i, s in enumerate(seqs):
        for t in range(len(s) - 1):
            if (i, t + 1) not in ignored:
                want[int(s[t + 1])] += 1
    for rep in reps:
        assert rep.num_tokens == expected
        np.testing.assert_array_equal(rep.class_counts, want)
        for layer in rep.layers:
            # left padding shifts the absolute positions: equal up to Llama's float32 rotary tables
            np.testing.assert_allclose(rep.statistics[layer].means(), reps[2].statistics[layer].means(), atol=1e-6)
            np.testing.assert_allclose(rep.statistics[layer].within_class_covariance(),
                                       reps[2].statistics[layer].within_class_covariance(), atol=1e-6)
    # without labels the targets are the next input ids, padding excluded by the mask
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in padded("left")]
    assert token_collapse_report(model, no_labels, gnc2_margin=False).num_tokens == expected + len(ignored)


def test_min_count_and_weightings():
    model = make_model("llama")
    batches = make_batches()
    feats, y = reference_samples(model, batches, "llama")
    W = model.get_output_embeddings().weight.detach().double().numpy()
    counts = np.bincount(y, minlength=24)
    keep = np.isin(y, np.flatnonzero(counts >= 3))
    rep = collapse_report(model, batches, min_count=3, weightings=["frequency"], gnc2_margin=False)
    assert rep.min_count == 3 and rep.num_samples == keep.sum() and rep.num_tokens == y.size
    assert rep.num_rare == np.count_nonzero((counts > 0) & (counts < 3))
    np.testing.assert_array_equal(rep.seen_classes, np.flatnonzero(counts >= 3))
    ref = ref_metrics(feats[2][keep], y[keep], W)
    assert rep.per_layer[2]["nc1_freq"] == pytest.approx(ref["nc1_freq"], rel=1e-7)
    assert rep.per_layer[2]["cdnv_freq"] == pytest.approx(ref["cdnv_freq"], rel=1e-7)
    assert "nc1" not in rep.per_layer[2]  # only the weighting asked for
    assert rep.to_dict()["num_rare"] == rep.num_rare


def test_classifier_margins_and_bad_input():
    model = make_model("gpt2")
    batches = make_batches()
    rep = collapse_report(model, batches)
    W = model.get_output_embeddings().weight.detach().double().numpy()
    exact = gnc2(W)
    assert rep.classifier["gnc2_W_margin"] == pytest.approx(exact.margin, abs=1e-9)
    assert rep.classifier["gnc2_W_margin_mean"] == pytest.approx(exact.margins.mean(), abs=1e-9)
    seen = rep.seen_classes
    assert rep.classifier["gnc2_W_seen_margin"] == pytest.approx(gnc2(W[seen]).margin, abs=1e-9)
    with pytest.raises(ValueError, match="min_count"):
        collapse_report(model, batches, min_count=0)
    with pytest.raises(ValueError, match="weightings"):
        collapse_report(model, batches, weightings=["zipf"])
    with pytest.raises(ValueError, match="causal LM only"):
        collapse_report(model, [{"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}],
                        num_classes=2, pooling="last", min_count=2)
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        collapse_report(model, [{"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.tensor([[1, 1, 30]])}])
    with pytest.raises(ValueError, match="no target tokens"):
        collapse_report(model, [{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.zeros(1, 3)}])
    with pytest.raises(ValueError, match="one-shot iterator"):
        collapse_report(model, (b for b in batches), min_count=2)
    # the pooled per-sequence report stays available with pooling + num_classes
    pooled = collapse_report(model, [{"input_ids": torch.randint(1, 24, (6, 5)), "labels": torch.tensor([0, 1, 0, 1, 0, 1])}],
                             num_classes=2, pooling="last", gnc2_margin=False)
    assert type(pooled).__name__ == "CollapseReport" and pooled.num_samples == 6


_DIST_SCRIPT = """
import json, sys, warnings
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
from test_token_collapse import make_batches, make_model
from hf_align import collapse_report
batches = make_batches() + make_batches(5)  # 4 batches, dealt round-robin
for min_count in (1, 2):
    rep = collapse_report(make_model("llama"), batches, min_count=min_count)
    if dist.get_rank() == 0:
        json.dump({{"per_layer": rep.per_layer, "classifier": rep.classifier, "n": rep.num_samples,
                   "counts": rep.class_counts.tolist()}}, open(sys.argv[1] + str(min_count), "w"))
dist.barrier()  # both ranks done before the group goes: gloo aborts a rank torn down mid-exchange
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    run_two_processes(_DIST_SCRIPT, tmp_path, 29531, "out")
    batches = make_batches() + make_batches(5)
    for min_count in (1, 2):
        two = json.loads((tmp_path / f"out{min_count}").read_text())
        one = collapse_report(make_model("llama"), batches, min_count=min_count)
        assert two["n"] == one.num_samples and two["counts"] == one.class_counts.tolist()
        for a, b in zip(two["per_layer"], one.per_layer):
            assert a.keys() == b.keys()
            for key, value in b.items():
                assert a[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert two["classifier"] == pytest.approx(one.classifier, rel=1e-12)


def test_a_one_shot_stream_is_read_once_and_equals_a_list():
    """With min_count=1 a generator is read once (statistics over the whole vocabulary, then the seen classes kept);
    a list is counted first and allocated for the seen classes only: the same report."""
    model = make_model("qwen3")
    batches = make_batches(2)
    listed = collapse_report(model, batches, gnc2_margin=False)
    streamed = collapse_report(model, (b for b in batches), gnc2_margin=False)
    np.testing.assert_array_equal(listed.seen_classes, streamed.seen_classes)
    for a, b in zip(listed.per_layer, streamed.per_layer):
        assert a == pytest.approx(b, rel=1e-10)
