"""One label rule everywhere (hf_align.data.labels): -100 marks a sample without a target and is ignored by the
trainer's layer-wise evaluation, calibration / exit curves, the collapse statistics and report, as in the rest of
the HF stack. References: the model's own forward (hidden states, pooler, classifier) and numpy on the kept rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_models import tiny_model

from hf_align import AlignedTrainer, AlignedTrainingArguments, EarlyExitModel, exit_curve
from hf_align.analysis.collapse import ClassStatistics, collapse_report
from hf_align.data import IGNORE_INDEX, check_labels, labelled
from hf_align.modeling.calibration import collect_layer_logits


def _text_rows(n=14, vocab=99, T_=7, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T_), generator=g)
    mask = torch.ones(n, T_, dtype=torch.long)
    mask[::3, -2:] = 0
    labels = torch.randint(0, num_labels, (n,), generator=g)
    labels[1::4] = IGNORE_INDEX  # samples without a target
    return ids, mask, labels


def _reference_layer_logits(model, ids, mask):
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        return [model.classifier(model.bert.pooler(h)) for h in hidden]


def test_check_labels_allows_only_the_ignore_index():
    check_labels([0, 2, -100], 3)
    with pytest.raises(ValueError, match=r"-100 is ignored"):
        check_labels([0, -1], 3)
    assert labelled(torch.tensor([1, -100])).tolist() == [True, False]


def test_trainer_evaluation_ignores_minus_100(tmp_path):
    model = tiny_model("bert", "BertForSequenceClassification")
    ids, mask, labels = _text_rows()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": labels.tolist()}).with_format("torch")
    args = AlignedTrainingArguments(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, save_strategy="no",
                                    per_device_eval_batch_size=5, use_cpu=True, dataloader_num_workers=0)
    metrics = AlignedTrainer(model=model, args=args, train_dataset=data, eval_dataset=data).evaluate()
    keep = labels != -100
    for l, logits in enumerate(_reference_layer_logits(model, ids, mask), start=1):
        accuracy = (logits[keep].argmax(-1) == labels[keep]).double().mean().item()
        loss = F.cross_entropy(logits.double(), labels).item()  # torch's default ignore_index=-100: the mean over kept
        assert metrics[f"eval_layer_{l}_accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert metrics[f"eval_layer_{l}_loss"] == pytest.approx(loss, abs=1e-5)


def test_calibration_and_exit_curve_ignore_minus_100():
    model = tiny_model("bert", "BertForSequenceClassification")
    ids, mask, labels = _text_rows()
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(len(labels))]
    ee = EarlyExitModel(model, threshold=0.5)
    logits, kept = collect_layer_logits(ee, rows, batch_size=4, progress=False)
    keep = (labels != -100).numpy()
    reference = torch.stack(_reference_layer_logits(model, ids, mask), dim=1).numpy()[keep]  # (N_kept, L, C)
    np.testing.assert_allclose(logits, reference, atol=1e-5)
    np.testing.assert_array_equal(kept, labels.numpy()[keep])
    curve = exit_curve(ee, rows, policy="fixed", values=[1, 2], batch_size=4, progress=False)
    for value, accuracy in zip(curve.values, curve.accuracy):
        assert accuracy == pytest.approx(float((reference[:, value - 1].argmax(-1) == kept).mean()), abs=1e-12)
    assert curve.full_accuracy == pytest.approx(float((reference[:, -1].argmax(-1) == kept).mean()), abs=1e-12)


def test_collapse_statistics_and_report_ignore_minus_100():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    y = np.arange(30) % 3
    y[::5] = IGNORE_INDEX
    stats = ClassStatistics(3).update(X, y)
    keep = y != IGNORE_INDEX
    np.testing.assert_allclose(stats.means(), np.stack([X[keep][y[keep] == k].mean(0) for k in range(3)]), atol=1e-12)
    assert stats.num_samples == keep.sum()
    with pytest.raises(ValueError, match="-100 is ignored"):
        ClassStatistics(3).update(X, np.full(30, -1))

    model = tiny_model("bert", "BertForSequenceClassification")
    ids, mask, labels = _text_rows(n=18)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(len(labels))]
    kept_rows = [r for r in rows if int(r["labels"]) != IGNORE_INDEX]
    with_ignored = collapse_report(model, rows, batch_size=4)  # (batches of different rows: float32 sums)
    without = collapse_report(model, kept_rows, batch_size=4)  # the rule: an ignored sample is as if absent
    assert with_ignored.num_samples == len(kept_rows) == without.num_samples
    for a, b in zip(with_ignored.per_layer, without.per_layer):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9, nan_ok=True), key  # float32 batches differ


def test_cli_label_space_and_range_ignore_minus_100():
    from hf_align.cli.loading import CLIError, check_label_range, label_space

    ds = Dataset.from_dict({"label": [0, 2, -100, 1, -100]})
    space = label_space([ds], "label")
    assert space.names == ["0", "1", "2"] and not space.from_strings
    check_label_range([ds], "label", space, 3, "m")
    with pytest.raises(CLIError, match="num_labels=2"):
        check_label_range([ds], "label", space, 2, "m")
    with pytest.raises(CLIError, match="negative"):
        label_space([Dataset.from_dict({"label": [0, -1]})], "label")


def test_one_digits_split_for_the_library_and_the_cli():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from hf_align.cli.loading import embedded_dataset
    from hf_align.data import load_digits_dataset

    target = load_digits().target
    train, test = train_test_split(np.arange(len(target)), test_size=0.25, random_state=3, stratify=target)
    library, cli = load_digits_dataset(seed=3), embedded_dataset("embedded:digits", seed=3)
    for split, idx in (("train", train), ("test", test)):
        assert [int(y) for y in library[split]["labels"]] == target[idx].tolist() == list(cli[split]["label"])
