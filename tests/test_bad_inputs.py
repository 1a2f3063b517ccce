"""Bad inputs of issue 12 (acceptance 4): each gets a clear error before any work or step -- or, for a model left
in train() mode, runs in eval mode and gets its modes back -- and leaves the model and its settings unchanged."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as T
from datasets import Dataset
from torch.utils.data import IterableDataset

from hf_align import AlignedTrainer, AlignedTrainingArguments, EarlyExitModel, calibrate, layer_similarity
from hf_align.data import train_wordpiece_tokenizer

SENTENCES = ["solve a linear system", "the fast fourier transform", "fit a normal distribution", "minimise a function",
             "interpolate a smooth spline", "the gamma function"]


def bert(dropout=0.5, vocab=99, pad=0, init=0.02):
    """A tiny BERT whose dropout (p=0.5) would visibly change every output in train mode."""
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=37, num_labels=3, pad_token_id=pad, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout, initializer_range=init)
    return T.BertForSequenceClassification(config)


def examples(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(3, 9, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, 99, (t,), generator=g).tolist(), "labels": i % 3})
    return out


def modes(model):
    return [m.training for m in model.modules()]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------- a model left in train() mode


def test_early_exit_model_runs_a_train_mode_model_in_eval_mode_and_restores():
    model = bert()
    reference = EarlyExitModel(bert().eval(), threshold=0.5)  # the same weights, in eval mode
    model.train()
    model.bert.embeddings.dropout.eval()  # a per-module setting of the user's: must survive
    before = modes(model)
    ee = EarlyExitModel(model, threshold=0.5)
    batch = {"input_ids": torch.randint(1, 99, (4, 6), generator=torch.Generator().manual_seed(3))}
    out = ee(**batch)
    again = ee(**batch)
    expected = reference(**batch)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)  # no dropout ran
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    assert torch.equal(out.exit_layers, expected.exit_layers)
    assert modes(model) == before


def test_calibrate_runs_a_train_mode_model_in_eval_mode_and_restores():
    data = examples()
    eval_curve = calibrate(EarlyExitModel(bert().eval()), data, progress=False, values=[0.4, 0.6, 0.9])
    model = bert().train()
    before = modes(model)
    curve = calibrate(EarlyExitModel(model), data, progress=False, values=[0.4, 0.6, 0.9])
    assert curve.accuracy == eval_curve.accuracy and curve.mean_exit_layer == eval_curve.mean_exit_layer
    assert modes(model) == before


def test_pipeline_runs_a_train_mode_model_in_eval_mode_and_restores():
    tok = train_wordpiece_tokenizer(SENTENCES * 3, vocab_size=120)
    model = bert(vocab=len(tok), pad=tok.pad_token_id).train()
    before = modes(model)
    clf = T.pipeline("early-exit-classification", model=model, tokenizer=tok, threshold=0.5)
    model.train()  # whatever the pipeline did at construction, the user trains it again
    before = modes(model)
    got = clf(SENTENCES, top_k=3)
    ref = EarlyExitModel(bert(vocab=len(tok), pad=tok.pad_token_id).eval(), threshold=0.5)
    for sentence, result in zip(SENTENCES, got):
        out = ref(**tok(sentence, return_tensors="pt"))
        probs = out.logits[0].softmax(-1)
        assert result[0]["score"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert result[0]["exit_layer"] == int(out.exit_layers)
    assert modes(model) == before


def test_analysis_runs_a_train_mode_model_in_eval_mode_and_restores():
    data = examples()
    ref = layer_similarity(bert().eval(), data, progress=False)
    model = bert().train()
    before = modes(model)
    got = layer_similarity(model, data, progress=False)
    np.testing.assert_allclose(got.matrix, ref.matrix, atol=1e-12)
    assert modes(model) == before


# ------------------------------------------------------------------------- labels outside num_labels


def args_for(tmp_path, **kw):
    return AlignedTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], disable_tqdm=True, save_strategy="no",
                                    per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3, use_cpu=True,
                                    dataloader_num_workers=0, **kw)


def test_trainer_refuses_labels_outside_num_labels_before_any_step(tmp_path):
    model = bert(dropout=0.0)
    rows = examples(12)
    rows[9]["labels"] = 3  # num_labels = 3: valid ids are 0, 1, 2; this row would be reached after two steps
    ds = Dataset.from_list([{"input_ids": r["input_ids"][:3], "labels": r["labels"]} for r in rows])
    before = state(model)
    with pytest.raises(ValueError, match=r"train_dataset labels must lie in \[0, 2\].*got 3"):
        AlignedTrainer(model=model, args=args_for(tmp_path), train_dataset=ds)
    assert_same_state(model, before)


class Stream(IterableDataset):
    """Labels that cannot be read up front: the check runs on each batch, before that batch's step."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        for r in self.rows:
            yield {"input_ids": torch.tensor(r["input_ids"][:3]), "labels": torch.tensor(r["labels"])}


def test_trainer_refuses_bad_labels_of_a_stream_before_any_step(tmp_path):
    model = bert(dropout=0.0)
    rows = examples(12)
    rows[1]["labels"] = -5
    before = state(model)
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path), train_dataset=Stream(rows))
    with pytest.raises(ValueError, match="labels must lie in"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert_same_state(model, before)


def test_calibrate_refuses_labels_outside_num_labels_before_any_forward():
    ee = EarlyExitModel(bert().eval(), threshold=0.8)
    data = examples()
    data[-1]["labels"] = 7
    calls = []
    handle = ee.view.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"calibration data labels must lie in \[0, 2\].*got 7"):
            calibrate(ee, data, progress=False)
    finally:
        handle.remove()
    assert calls == [] and ee.settings.threshold == 0.8


# ------------------------------------------------------------------------- threshold="0.9"


def test_string_threshold_is_a_type_error_at_construction():
    model = bert().eval()
    with pytest.raises(TypeError, match="threshold must be a number.*str '0.9'"):
        EarlyExitModel(model, threshold="0.9")
    ee = EarlyExitModel(model, threshold=0.7)
    with pytest.raises(TypeError, match="threshold must be a number"):
        ee.set_exit(threshold="0.9")
    assert ee.settings.threshold == 0.7
    with pytest.raises(TypeError, match="threshold must be a number"):
        EarlyExitModel(model, threshold=True)
    tok = train_wordpiece_tokenizer(SENTENCES * 3, vocab_size=120)
    with pytest.raises(TypeError, match="threshold must be a number"):
        T.pipeline("early-exit-classification", model=bert(vocab=len(tok), pad=tok.pad_token_id).eval(), tokenizer=tok,
                   threshold="0.9")
    assert getattr(model.config, "early_exit", None) is None


# ------------------------------------------------------------------------- half-precision "zero-variance"


def test_bf16_undefined_layers_are_named_with_the_dtype_resolution():
    # initializer_range 0.2: the CLS features of layers 1-3 spread ~25% of their norm (32 bfloat16 ulps), which
    # the old 32-eps rule called "zero-variance"
    model = bert(dropout=0.0, init=0.2).to(torch.bfloat16).eval()
    data = [{"input_ids": [2] + r["input_ids"] + [3]} for r in examples()]  # [CLS]: layer 0 really is constant
    with pytest.warns(UserWarning) as caught:
        res = layer_similarity(model, data, progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert res.undefined_layers == ["layer 0"] and not np.isnan(res.matrix[1:, 1:]).any()
    assert "bfloat16" in text and "zero-variance" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing else warned about
        assert np.isfinite(layer_similarity(model, data, pooling="mean", progress=False).matrix).all()
