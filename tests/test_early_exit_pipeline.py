"""pipeline("early-exit-classification"): text and images, single and batched, top_k, saving and reloading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

import hf_align  # noqa: F401  (registers the task)
from hf_align import EarlyExitModel, add_exit_heads
from hf_align.data import train_wordpiece_tokenizer

SENTENCES = ["solve a linear system of equations", "compute the fast fourier transform of a signal",
             "fit a normal distribution to data", "minimise a scalar function of one variable",
             "interpolate a smooth spline", "the gamma function and its logarithm"]


@pytest.fixture(scope="module")
def text_setup():
    tok = train_wordpiece_tokenizer(SENTENCES * 3, vocab_size=120)
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=37, num_labels=3, pad_token_id=tok.pad_token_id,
                          id2label={0: "linalg", 1: "signal", 2: "stats"}, label2id={"linalg": 0, "signal": 1, "stats": 2})
    return T.BertForSequenceClassification(config).eval(), tok


@pytest.fixture(scope="module")
def image_setup():
    torch.manual_seed(0)
    config = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=37, num_labels=4)
    processor = T.ViTImageProcessor(size={"height": 16, "width": 16}, do_resize=True, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)
    return T.ViTForImageClassification(config).eval(), processor


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]


def test_text_single_batched_topk(text_setup):
    model, tok = text_setup
    clf = T.pipeline("early-exit-classification", model=model, tokenizer=tok, threshold=0.36)
    single = clf(SENTENCES[0])
    assert isinstance(single, list) and len(single) == 1
    assert set(single[0]) == {"label", "score", "exit_layer", "num_layers"} and single[0]["num_layers"] == 4
    # the same numbers as the wrapper on the tokenized input
    ee = EarlyExitModel(model, threshold=0.36)
    out = ee(**tok(SENTENCES[0], return_tensors="pt"))
    probs = out.logits[0].softmax(-1)
    assert single[0]["exit_layer"] == out.exit_layers.item()
    assert single[0]["label"] == model.config.id2label[int(probs.argmax())]
    assert single[0]["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    batched = clf(SENTENCES, batch_size=4, top_k=2)
    assert len(batched) == len(SENTENCES) and all(len(r) == 2 for r in batched)
    for sentence, result in zip(SENTENCES, batched):
        alone = clf(sentence, top_k=2)
        assert [r["label"] for r in result] == [r["label"] for r in alone]
        assert result[0]["exit_layer"] == alone[0]["exit_layer"]
        assert result[0]["score"] == pytest.approx(alone[0]["score"], abs=1e-5)
        assert result[0]["score"] >= result[1]["score"]
    # per-call settings
    deep = clf(SENTENCES[0], policy="fixed", exit_layer=4)
    assert deep[0]["exit_layer"] == 4


def test_image_pil_numpy_batched(image_setup):
    model, processor = image_setup
    clf = T.pipeline("early-exit-classification", model=model, image_processor=processor, threshold=0.3)
    pics = images(5)
    res = clf(pics, batch_size=3)
    assert len(res) == 5 and all(r[0]["num_layers"] == 4 for r in res)
    arr = clf(np.asarray(pics[0]))
    assert arr[0]["label"] == res[0][0]["label"] and arr[0]["exit_layer"] == res[0][0]["exit_layer"]
    ee = EarlyExitModel(model, threshold=0.3)
    out = ee(**processor(images=pics, return_tensors="pt"))
    assert [r[0]["exit_layer"] for r in res] == out.exit_layers.tolist()


def test_wrong_modality_and_bad_settings(text_setup, image_setup):
    model, tok = text_setup
    clf = T.pipeline("early-exit-classification", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="text classifier but got an image"):
        clf(images(1)[0])
    with pytest.raises(ValueError, match="confidence threshold"):
        clf("some text", threshold=3.0)
    with pytest.raises(ValueError, match="top_k"):
        clf("some text", top_k=0)
    vit, processor = image_setup
    img_clf = T.pipeline("early-exit-classification", model=vit, image_processor=processor)
    with pytest.raises(ValueError, match="image classifier but got text"):
        img_clf("a sentence, not an image")
    with pytest.raises(ValueError, match="unknown exit policy"):
        T.pipeline("early-exit-classification", model=vit, image_processor=processor, policy="sometimes")
    assert not hasattr(vit.config, "early_exit")


def test_saved_pipeline_reloads(tmp_path, text_setup):
    model, tok = text_setup
    clf = T.pipeline("early-exit-classification", model=model, tokenizer=tok, policy="patience", patience=2)
    clf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # only the trust_remote_code entry, under a key that is not the registered task (which it would shadow)
    assert list(config["custom_pipelines"]) == ["hf-align/early-exit-classification"]
    assert config["early_exit"]["policy"] == "patience"
    shim = (tmp_path / "early_exit_classification.py").read_text()
    assert "from hf_align.pipelines.early_exit_classification import" in shim and "class " not in shim
    assert "pip install hf-align" in shim
    assert not hasattr(model.config, "early_exit") and not hasattr(model.config, "custom_pipelines")  # untouched
    # the registered task is used with the saved model, settings and tokenizer: no extra arguments
    again = T.pipeline("early-exit-classification", model=str(tmp_path))
    assert again.early_exit.settings.policy == "patience"
    assert again(SENTENCES) == clf(SENTENCES)
    # the saved model is still a plain transformers classifier
    assert type(T.AutoModelForSequenceClassification.from_pretrained(tmp_path)) is T.BertForSequenceClassification


def test_multi_exit_model_in_pipeline(tmp_path, text_setup):
    model, tok = text_setup
    multi = add_exit_heads(model).eval()
    clf = T.pipeline("early-exit-classification", model=multi, tokenizer=tok, policy="fixed", exit_layer=1)
    out = clf(SENTENCES[1])
    ee = EarlyExitModel(multi, policy="fixed", exit_layer=1)
    probs = ee(**tok(SENTENCES[1], return_tensors="pt")).logits[0].softmax(-1)
    assert out[0]["score"] == pytest.approx(float(probs.max()), abs=1e-6) and out[0]["exit_layer"] == 1


def _reference_exit(model, tok, sentence, threshold):
    """Independent of the layer view: the model's own hidden states, the BERT head (pooler + classifier) on each,
    and the first block whose top probability reaches the threshold (the last block otherwise)."""
    with torch.no_grad():
        out = model(**tok(sentence, return_tensors="pt"), output_hidden_states=True)
        L = model.config.num_hidden_layers
        for layer in range(1, L + 1):
            probs = model.classifier(model.bert.pooler(out.hidden_states[layer]))[0].softmax(-1)
            if float(probs.max()) >= threshold or layer == L:
                return layer, model.config.id2label[int(probs.argmax())], float(probs.max())


def _hooks(model):
    names = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_forward_pre_hooks_with_kwargs",
             "_forward_hooks_with_kwargs")
    return {(name, attr): list(getattr(m, attr, {})) for name, m in model.named_modules() for attr in names}


def test_one_pipeline_eight_threads_different_thresholds(text_setup):
    """Exit settings are call arguments: 8 threads sharing one pipeline, each with its own threshold, get exactly
    the sequential results (and the view-independent reference), also with the model left in train mode (each call
    runs in eval mode), and the model's settings, config, hooks and train/eval flags are unchanged afterwards."""
    import threading

    model, tok = text_setup
    clf = T.pipeline("early-exit-classification", model=model, tokenizer=tok, threshold=0.5)
    # thresholds spread over the confidences the model really reaches, so the threads exit at different blocks
    confidences = sorted({round(c, 4) for s in SENTENCES for c in
                          [_reference_exit(model, tok, s, 1.0)[2], _reference_exit(model, tok, s, 0.0)[2]]})
    thresholds = [float(t) for t in np.quantile(confidences, np.linspace(0.05, 0.95, 8))]
    sequential = {t: [clf(s, threshold=t) for s in SENTENCES] for t in thresholds}
    for t in thresholds:  # the sequential results are right (not just repeatable)
        for s, result in zip(SENTENCES, sequential[t]):
            layer, label, score = _reference_exit(model, tok, s, t)
            assert (result[0]["exit_layer"], result[0]["label"]) == (layer, label)
            assert result[0]["score"] == pytest.approx(score, abs=1e-5)
    assert len({tuple(r[0]["exit_layer"] for r in sequential[t]) for t in thresholds}) > 1  # the settings matter

    settings, config_exit = clf.early_exit.settings, getattr(model.config, "early_exit", None)
    model.train()  # as a freshly built model is: every call must still run in eval mode (dropout off)
    hooks, modes = _hooks(model), [m.training for m in model.modules()]
    start = threading.Barrier(len(thresholds))
    results, errors = {}, []

    def work(t):
        try:
            start.wait()
            results[t] = [[clf(s, threshold=t) for s in SENTENCES] for _ in range(4)]
        except Exception as error:  # reported below with the thread's threshold
            errors.append((t, repr(error)))

    threads = [threading.Thread(target=work, args=(t,)) for t in thresholds]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert _hooks(model) == hooks and [m.training for m in model.modules()] == modes  # still in train mode
    finally:
        model.eval()  # the module-scoped fixture's mode
    assert errors == []
    for t in thresholds:
        assert all(rep == sequential[t] for rep in results[t]), t
    assert clf.early_exit.settings == settings and clf.early_exit.settings.threshold == 0.5
    assert getattr(model.config, "early_exit", None) == config_exit
    assert clf(SENTENCES[0]) == clf(SENTENCES[0], threshold=0.5)  # the default is still the constructed one
