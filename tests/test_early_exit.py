"""EarlyExitModel: exactness, real savings, per-sample independence in padded batches, saving, calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from test_layers import padded_text_batch
from tiny_models import tiny_model

from hf_align import EarlyExitModel, LayerView, add_exit_heads, calibrate, exit_curve


def reference_layer_logits(model, inputs):
    """Independent reference: BERT's pooler + classifier on HF's own hidden states."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1:]
        return torch.stack([model.classifier(model.bert.pooler(h)) for h in hidden], dim=1)  # (B, L, C)


def bert(**kw):
    return tiny_model("bert", "BertForSequenceClassification", num_hidden_layers=6, **kw)


def count_block_rows(blocks):
    """Rows each completed block call processed (forward hooks: the stopped capture call does not count)."""
    counts = []
    handles = [b.register_forward_hook(lambda m, args, out: counts.append((out if isinstance(out, torch.Tensor) else out[0]).shape[0])) for b in blocks]
    return counts, handles


def mixed_threshold(model, inputs):
    """A confidence threshold that makes samples of this batch exit at different blocks."""
    probs = reference_layer_logits(model, inputs).softmax(-1).max(-1).values  # (B, L)
    return float(probs[:, :3].median())


def test_never_triggering_policy_equals_plain_model():
    model = bert()
    inputs = padded_text_batch(model)
    ee = EarlyExitModel(model, policy="confidence", threshold=1.0)
    out = ee(**inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-5)
    assert out.exit_layers.tolist() == [6, 6, 6]


def test_padded_batch_rows_equal_running_alone_and_blocks_counted():
    model = bert()
    inputs = padded_text_batch(model)
    threshold = mixed_threshold(model, inputs)
    ee = EarlyExitModel(model, policy="confidence", threshold=threshold)
    view = LayerView(model)
    counts, handles = count_block_rows(view.blocks)
    try:
        out = ee(**inputs, output_layer_logits=True)
    finally:
        for h in handles:
            h.remove()
    exits = out.exit_layers.tolist()
    assert len(set(exits)) > 1, "the test needs samples that exit at different blocks"
    assert sum(counts) == sum(exits)  # rows that exited never entered another block
    assert len(counts) == max(exits)
    reference = reference_layer_logits(model, inputs)
    for row in range(3):
        n = int(inputs["attention_mask"][row].sum())
        alone = ee(input_ids=inputs["input_ids"][row:row + 1, :n], attention_mask=inputs["attention_mask"][row:row + 1, :n])
        assert alone.exit_layers.item() == exits[row]
        torch.testing.assert_close(alone.logits[0], out.logits[row], rtol=0, atol=1e-5)
        # the exit is where the reference first reaches the threshold
        conf = reference[row].softmax(-1).max(-1).values
        expected_exit = int(next((l for l in range(6) if conf[l] >= threshold), 5)) + 1
        assert exits[row] == expected_exit
        torch.testing.assert_close(out.layer_logits[row], reference[row, :exits[row]], rtol=0, atol=1e-5)


def test_entropy_and_patience_policies_match_independent_rules():
    model = bert()
    inputs = padded_text_batch(model)
    reference = reference_layer_logits(model, inputs).double()
    p = reference.softmax(-1).numpy()
    entropy = -(p * np.log(p)).sum(-1)  # (B, L)
    threshold = float(np.median(entropy[:, :3]))
    out = EarlyExitModel(model, policy="entropy", threshold=threshold)(**inputs)
    for row in range(3):
        expected = next((l + 1 for l in range(6) if entropy[row, l] <= threshold), 6)
        assert out.exit_layers[row].item() == expected
    pred = reference.argmax(-1).numpy()
    for patience in (1, 2, 3):
        out = EarlyExitModel(model, policy="patience", patience=patience)(**inputs)
        for row in range(3):
            streak, expected = 0, 6
            for l in range(6):
                streak = streak + 1 if l > 0 and pred[row, l] == pred[row, l - 1] else 1
                if streak >= patience:
                    expected = l + 1
                    break
            assert out.exit_layers[row].item() == expected
            torch.testing.assert_close(out.logits[row].double(), reference[row, expected - 1], rtol=0, atol=1e-5)


def test_fixed_depth_and_min_layer():
    model = bert()
    inputs = padded_text_batch(model)
    reference = reference_layer_logits(model, inputs)
    ee = EarlyExitModel(model, policy="fixed", exit_layer=2)  # built first: its self-check runs the model
    counts, handles = count_block_rows(ee.view.blocks)
    try:
        out = ee(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert counts == [3, 3] and out.exit_layers.tolist() == [2, 2, 2]
    torch.testing.assert_close(out.logits, reference[:, 1], rtol=0, atol=1e-5)
    out = EarlyExitModel(model, policy="confidence", threshold=0.0 + 1e-9, min_layer=4)(**inputs)
    assert out.exit_layers.tolist() == [4, 4, 4]


def test_image_model_batch_shrinks():
    model = tiny_model("vit", "ViTForImageClassification", num_hidden_layers=6)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, 16, 16, generator=g)
    with torch.no_grad():
        conf = torch.stack(LayerView(model).layer_logits(pixel_values=pixels), 1).softmax(-1).max(-1).values
    threshold = float(conf[:, :3].median())
    ee = EarlyExitModel(model, threshold=threshold)
    out = ee(pixel_values=pixels)
    assert len(set(out.exit_layers.tolist())) > 1
    for i in range(8):
        alone = ee(pixel_values=pixels[i:i + 1])
        assert alone.exit_layers.item() == out.exit_layers[i].item()
        torch.testing.assert_close(alone.logits[0], out.logits[i], rtol=0, atol=1e-5)


def test_multi_exit_model_uses_separate_heads():
    model = bert()
    multi = add_exit_heads(model).eval()
    inputs = padded_text_batch(model)
    out = EarlyExitModel(multi, policy="fixed", exit_layer=2)(**inputs)
    with torch.no_grad():
        h2 = model(**inputs, output_hidden_states=True).hidden_states[2]
        expected = multi.exit_heads[1](model.bert.pooler(h2))
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)
    full = EarlyExitModel(multi, policy="fixed", exit_layer=6)(**inputs)
    with torch.no_grad():
        torch.testing.assert_close(full.logits, model(**inputs).logits, rtol=0, atol=1e-5)


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("settings,match", [
    (dict(policy="confidence", threshold=1.5), "confidence threshold"),
    (dict(policy="confidence", threshold=0.0), "confidence threshold"),
    (dict(policy="entropy", threshold=-0.1), "entropy threshold"),
    (dict(policy="greedy"), "unknown exit policy"),
    (dict(policy="patience", patience=0), "patience"),
    (dict(policy="fixed", exit_layer=7), "exit_layer"),
    (dict(min_layer=0), "min_layer"),
    (dict(speed="fast"), "unknown early-exit settings"),
])
def test_bad_settings_are_clear_and_model_unchanged(settings, match):
    model = bert()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        EarlyExitModel(model, **settings)
    assert model.training and _hooks(model) == 0 and not hasattr(model.config, "early_exit")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_set_exit_validates_before_changing():
    ee = EarlyExitModel(bert(), threshold=0.8)
    with pytest.raises(ValueError):
        ee.set_exit(threshold=2.0)
    assert ee.settings.threshold == 0.8


def test_call_settings_apply_to_that_call_only():
    """Settings passed to a call are its arguments: the exits follow the independent rule for that threshold and
    the model's own settings (and config) are not touched, also when the call fails validation."""
    model = bert()
    inputs = padded_text_batch(model)
    t = mixed_threshold(model, inputs)
    ee = EarlyExitModel(model, threshold=0.99)
    probs = reference_layer_logits(model, inputs).softmax(-1).max(-1).values  # (B, L)
    L = probs.shape[1]
    expected = [next((l + 1 for l in range(L) if probs[i, l] >= t), L) for i in range(probs.shape[0])]
    assert ee(**inputs, threshold=t).exit_layers.tolist() == expected
    assert ee.settings.threshold == 0.99 and not hasattr(model.config, "early_exit")
    with pytest.raises(ValueError, match="confidence threshold"):
        ee(**inputs, threshold=1.5)
    assert ee.settings.threshold == 0.99
    assert ee(**inputs, policy="fixed", exit_layer=2).exit_layers.tolist() == [2] * probs.shape[0]


def test_unsupported_models():
    bart = T.BartForSequenceClassification(T.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1,
                                                        encoder_attention_heads=2, decoder_attention_heads=2,
                                                        encoder_ffn_dim=8, decoder_ffn_dim=8, vocab_size=50))
    with pytest.raises(ValueError, match="no layer-view adapter"):
        EarlyExitModel(bart)
    with pytest.raises(ValueError, match="early exit is for classifiers"):
        EarlyExitModel(tiny_model("llama", "LlamaForCausalLM"))


def test_settings_saved_in_config_and_plain_loading(tmp_path):
    model = bert()
    ee = EarlyExitModel(model, policy="patience", patience=3, min_layer=2)
    ee.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["early_exit"]
    assert stored["policy"] == "patience" and stored["patience"] == 3 and stored["min_layer"] == 2
    plain = T.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(plain) is T.BertForSequenceClassification
    again = EarlyExitModel.from_pretrained(tmp_path)
    assert again.settings == ee.settings
    inputs = padded_text_batch(model)
    torch.testing.assert_close(again(**inputs).logits, ee(**inputs).logits, rtol=0, atol=0)


def test_multi_exit_saved_and_reloaded(tmp_path):
    multi = add_exit_heads(bert()).eval()
    ee = EarlyExitModel(multi, policy="fixed", exit_layer=3)
    ee.save_pretrained(tmp_path)
    again = EarlyExitModel.from_pretrained(tmp_path)
    assert type(again.model).__name__ == "MultiExitModel" and again.settings.exit_layer == 3
    inputs = padded_text_batch(multi.backbone)
    torch.testing.assert_close(again(**inputs).logits, ee(**inputs).logits, rtol=0, atol=0)


def test_calibration_curve_matches_real_runs():
    from datasets import Dataset

    model = bert()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (40, 7), generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")
    ee = EarlyExitModel(model)
    curve = exit_curve(ee, data, policy="confidence", values=[0.34, 0.36, 0.4, 1.0], batch_size=16, progress=False)
    for value, acc, depth in zip(curve.values, curve.accuracy, curve.mean_exit_layer):
        ee.set_exit(policy="confidence", threshold=value)
        out = ee(input_ids=ids)
        assert abs(out.exit_layers.double().mean().item() - depth) <= 1e-9
        assert abs((out.logits.argmax(-1) == labels).double().mean().item() - acc) <= 1e-9
    with torch.no_grad():
        full = (model(input_ids=ids).logits.argmax(-1) == labels).double().mean().item()
    assert curve.full_accuracy == pytest.approx(full)
    chosen = calibrate(ee, data, tolerance=0.05, values=[0.34, 0.36, 0.4, 1.0], batch_size=16, progress=False)
    i = chosen.values.index(chosen.chosen)
    assert chosen.accuracy[i] >= full - 0.05
    assert all(chosen.mean_exit_layer[j] >= chosen.mean_exit_layer[i] for j, a in enumerate(chosen.accuracy) if a >= full - 0.05)
    assert ee.settings.threshold == chosen.chosen
    assert "chosen" in chosen.to_markdown()


def test_multi_exit_trains_with_aligned_trainer(tmp_path):
    """PABEE-style baseline: loss = sum_l w_l CE(W_l pooler(h_l) + b_l, y), each block with its own classifier."""
    import torch.nn.functional as F
    from datasets import Dataset

    from hf_align import AlignedTrainer, AlignedTrainingArguments

    model = bert()
    multi = add_exit_heads(model).eval()
    assert multi.config.id2label == model.config.id2label
    inputs = padded_text_batch(model)
    labels = torch.tensor([0, 2, 1])
    data = Dataset.from_dict({**{k: v.tolist() for k, v in inputs.items()}, "labels": labels.tolist()}).with_format("torch")
    args = AlignedTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                    per_device_train_batch_size=3, learning_rate=1e-2, save_strategy="no")
    trainer = AlignedTrainer(model=multi, args=args, train_dataset=data)
    loss = trainer.compute_loss(multi, {**inputs, "labels": labels})
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1:]
        heads = list(multi.exit_heads) + [model.classifier]
        weights = [2 * l / 42 for l in range(1, 7)]
        expected = sum(w * F.cross_entropy(head(model.bert.pooler(h)).double(), labels)
                       for w, head, h in zip(weights, heads, hidden))
    assert abs(loss.item() - expected.item()) <= 1e-6
    before = multi.exit_heads[0].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, multi.exit_heads[0].weight)
