"""Regression tests for issue 20 (what a new user and a fault-injection pass found). One test per item; the
property-based sweep over the numeric entry points is in test_properties.py."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from references import ref_linear_cka
from tiny_models import tiny_model

from hf_align import layer_similarity
from hf_align.analysis.similarity import cosine, debiased_linear_cka, hsic1, linear_cka, minibatch_cka, rbf_cka

# ------------------------------------------------------------------ half precision on a pretrained-like model

OUTLIER_OFFSETS = (100.0, 300.0, 1000.0, 1500.0)  # per layer, on 2 of the 32 features


def pretrained_like_bert(last_scale: float):
    """A tiny BERT whose CLS features look like a pretrained model's: two "massive activation" features carry a
    large constant offset (+-B, set through the LayerNorm biases), which the attention and MLP inputs ignore (their
    weights on those features are 0) and which the next LayerNorm's weights compensate -- as trained models learn
    to do. The centred CLS features then carry 0.25-1.3% of the norm (``last_scale`` shrinks the last layer's),
    while every other feature varies by tens of percent of its own magnitude, which half precision resolves."""
    model = tiny_model("bert", "BertForSequenceClassification", initializer_range=0.2, num_hidden_layers=len(OUTLIER_OFFSETS))
    d = model.config.hidden_size
    previous = 0.0
    with torch.no_grad():
        for layer, offset in zip(model.bert.encoder.layer, OUTLIER_OFFSETS):
            for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value, layer.intermediate.dense):
                linear.weight[:, :2] = 0
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                if previous:
                    norm.weight[2:] *= previous * math.sqrt(2 / d)  # undo the row std the offset features add
                norm.bias[0] += offset
                norm.bias[1] -= offset
                previous = offset
        model.bert.encoder.layer[-1].output.LayerNorm.weight[2:] *= last_scale
        model.bert.pooler.dense.weight[:, :2] = 0
    return model


def text_rows(n=64):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        t = int(torch.randint(6, 14, (1,), generator=g))
        rows.append({"input_ids": [2] + torch.randint(5, 99, (t - 2,), generator=g).tolist() + [3]})
    return rows


@pytest.mark.parametrize(
    "dtype, last_scale, tol",
    [(torch.float16, 0.2, 1e-3), (torch.float16, 0.1, 1e-3), (torch.bfloat16, 0.2, 5e-3)],
)
@pytest.mark.parametrize("metric", ["linear_cka", "debiased_cka"])
def test_half_precision_on_pretrained_like_features(dtype, last_scale, tol, metric):
    rows = text_rows()
    ref_model = pretrained_like_bert(last_scale)
    with torch.no_grad():
        ids = torch.tensor([r["input_ids"][:6] for r in rows])
        states = ref_model(input_ids=ids, output_hidden_states=True).hidden_states
    spread = [float((h[:, 0] - h[:, 0].mean(0)).norm() / h[:, 0].norm()) for h in states]
    assert spread[0] < 1e-6 and all(1e-3 <= s <= 1.5e-2 for s in spread[1:]), spread  # like MiniLM's CLS
    with warnings.catch_warnings(record=True):  # layer 0 (the embedding output at CLS) is constant: warned
        warnings.simplefilter("always")
        ref = layer_similarity(ref_model, rows, metric=metric, batch_size=16, progress=False)
        res = layer_similarity(pretrained_like_bert(last_scale).to(dtype), rows, metric=metric, batch_size=16, progress=False)
    assert ref.undefined_layers == res.undefined_layers == ["layer 0"]  # only the embedding output is constant
    ok = ~ref.undefined
    assert np.abs(res.matrix[ok] - ref.matrix[ok]).max() <= tol


def test_bfloat16_at_the_smallest_spread_is_limited_by_the_models_forward_not_by_the_metric():
    """At last_scale 0.1 the last layer's CLS spread is ~0.13% of its norm. The library's CKA of those float32
    features rounded to bfloat16 stays within 5e-3 of float32 on every pair of layers, but the bfloat16 *model*
    computes a last layer that differs from the float32 one by more than that layer's whole centred spread (its
    LayerNorms add a ~1e3 offset in bfloat16), so no metric could recover float32's CKA from it there."""
    rows = text_rows()
    ids = torch.tensor([r["input_ids"][:6] for r in rows])
    with torch.no_grad():
        f32 = [h[:, 0] for h in pretrained_like_bert(0.1)(input_ids=ids, output_hidden_states=True).hidden_states]
        b16 = [h[:, 0] for h in pretrained_like_bert(0.1).to(torch.bfloat16)(
            input_ids=ids, output_hidden_states=True).hidden_states]
    spread = float((f32[-1] - f32[-1].mean(0)).norm() / f32[-1].norm())
    assert 1e-3 <= spread <= 1.5e-3, spread
    for i in range(1, len(f32)):
        for j in range(1, len(f32)):
            ref = ref_linear_cka(f32[i].double().numpy(), f32[j].double().numpy())
            assert abs(linear_cka(f32[i].bfloat16(), f32[j].bfloat16()) - ref) <= 5e-3
    centred = f32[-1].double() - f32[-1].double().mean(0)
    assert float((b16[-1].double() - f32[-1].double()).norm() / centred.norm()) > 1.0


def test_half_precision_features_with_offset_function_level():
    # float16 features with a large constant offset on a few features: the library's own CKA of the float16
    # values agrees with float32 (before: "constant within the resolution of float16")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    y = x @ rng.normal(size=(64, 48)).astype(np.float32) + 0.3 * rng.normal(size=(200, 48)).astype(np.float32)
    x[:, :2] = [6000.0, -6000.0]
    y[:, :3] = 9000.0
    assert np.linalg.norm(x - x.mean(0)) / np.linalg.norm(x) < 2e-3  # below float16's 2 eps of the norm
    ref = linear_cka(x.astype(np.float64), y.astype(np.float64))
    assert abs(linear_cka(torch.tensor(x).half(), torch.tensor(y).half()) - ref) < 1e-3
    assert abs(linear_cka(torch.tensor(x).bfloat16(), torch.tensor(y).bfloat16()) - ref) < 5e-3


# ------------------------------------------------------------------------------------ numbers at the edges


@pytest.mark.parametrize("scale", [1e-200, 1e200, 1e-300, 1e300])
def test_cka_family_is_scale_invariant_at_the_edges_of_float64(scale):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 5)), rng.normal(size=(30, 4))
    Y[:, 0] += X[:, 0]
    for fn in (linear_cka, debiased_linear_cka, rbf_cka, lambda a, b: minibatch_cka(a, b, batch_size=10)):
        assert fn(X * scale, Y) == pytest.approx(fn(X, Y), rel=1e-9, abs=1e-12)
        assert fn(X * scale, Y / scale) == pytest.approx(fn(X, Y), rel=1e-9, abs=1e-12)
    assert linear_cka(X * scale, Y) == pytest.approx(ref_linear_cka(X, Y), abs=1e-12)
    assert cosine(X[:, :4] * scale, Y) == pytest.approx(cosine(X[:, :4], Y), abs=1e-12)
    assert cosine(X[:, :4] * scale, Y, center=True) == pytest.approx(cosine(X[:, :4], Y, center=True), abs=1e-12)


def test_hsic1_scales_exactly_or_says_it_is_out_of_range():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
    assert hsic1(X * 1e100, Y) == pytest.approx(hsic1(X, Y) * 1e200, rel=1e-9)
    with pytest.raises(ValueError, match="outside the float64 range"):
        hsic1(X * 1e200, Y * 1e200)


def test_one_dimensional_features_raise():
    X = np.arange(10.0)
    with pytest.raises(ValueError, match=r"1-D.*X\[:, None\]"):
        linear_cka(X, X[:, None])
    with pytest.raises(ValueError, match="1-D"):
        cosine(X[:, None], X)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_collapse_on_pretrained_like_features(dtype):
    from hf_align import collapse_report

    rows = [dict(r, labels=i % 3) for i, r in enumerate(text_rows())]
    reports = {}
    for dt in (torch.float32, dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports[dt] = collapse_report(pretrained_like_bert(0.2).to(dt), rows, batch_size=16, nc4=False, gnc2_margin=False)
    assert reports[torch.float32].undefined_layers == reports[dtype].undefined_layers == [0]
    for layer in (1, 2, 3, 4):
        a, b = reports[dtype].per_layer[layer]["nc1"], reports[torch.float32].per_layer[layer]["nc1"]
        tol = 3e-2 if dtype == torch.float16 else 1e-1  # NC1 inverts Sigma_B: measured 1.1% (fp16), 5.9% (bf16)
        assert np.isfinite(a) and abs(a - b) <= tol * max(1.0, abs(b)), (layer, a, b)


# -------------------------------------------------------------------------------------------------------- labels


def _trainer_args(tmp_path, **kw):
    from hf_align import AlignedTrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), report_to=[], disable_tqdm=True, save_strategy="no",
                per_device_train_batch_size=4, learning_rate=1e-3, seed=0, use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return AlignedTrainingArguments(**base)


def _text_columns(n=8, labels=None):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (n, 6), generator=g).tolist()
    return {"input_ids": ids, "attention_mask": [[1] * 6] * n, "labels": labels if labels is not None else [i % 3 for i in range(n)]}


def test_iterable_dataset_labels_are_checked_before_the_step(tmp_path):
    from datasets import Dataset

    from hf_align import AlignedTrainer

    data = Dataset.from_dict(_text_columns(labels=[0, 1, 99, 2, 0, 1, 2, 0])).to_iterable_dataset()
    model = tiny_model("bert", "BertForSequenceClassification")
    snapshot = [p.detach().clone() for p in model.parameters()]
    trainer = AlignedTrainer(model=model, args=_trainer_args(tmp_path, max_steps=2), train_dataset=data)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\].*got 99"):  # not "IndexError: Target 99 is out of bounds"
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))


def test_string_labels_fail_in_the_constructor(tmp_path):
    from datasets import Dataset

    from hf_align import AlignedTrainer

    data = Dataset.from_dict(_text_columns(labels=["pos", "neg"] * 4))
    with pytest.raises(TypeError, match="integer class ids.*'pos'.*class_encode_column"):
        AlignedTrainer(model=tiny_model("bert", "BertForSequenceClassification"), args=_trainer_args(tmp_path), train_dataset=data)


def test_headless_base_model_fails_in_the_constructor(tmp_path):
    from datasets import Dataset

    from hf_align import AlignedTrainer

    with pytest.raises(ValueError, match="BertModel has no head.*AutoModelForSequenceClassification"):
        AlignedTrainer(model=tiny_model("bert", "BertModel"), args=_trainer_args(tmp_path), train_dataset=Dataset.from_dict(_text_columns()))


def test_ignored_labels_are_left_out_of_exit_curve_and_calibrate():
    from datasets import Dataset

    from hf_align import EarlyExitModel, calibrate, exit_curve

    ee = EarlyExitModel(tiny_model("bert", "BertForSequenceClassification"))
    cols = _text_columns(n=40, labels=[int(v) for v in torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))])
    plain = Dataset.from_dict(cols).with_format("torch")
    mixed_cols = {k: [x for v in cols[k] for x in (v, v)] for k in cols}
    mixed_cols["labels"] = [x for v in cols["labels"] for x in (v, -100)]  # an unlabelled row after every row
    mixed = Dataset.from_dict(mixed_cols).with_format("torch")
    kw = dict(policy="confidence", values=[0.34, 0.4, 1.0], batch_size=16, progress=False)
    a, b = exit_curve(ee, plain, **kw), exit_curve(ee, mixed, **kw)
    assert b.full_accuracy == pytest.approx(a.full_accuracy) and b.accuracy == pytest.approx(a.accuracy)
    c = calibrate(ee, mixed, tolerance=0.05, confidence=0.9, **kw)
    assert c.full_accuracy == pytest.approx(a.full_accuracy)


def test_exit_curve_markdown_marks_the_chosen_row_inside_the_table():
    from hf_align.modeling.calibration import ExitCurve

    curve = ExitCurve(policy="confidence", values=[0.5, 0.9], accuracy=[0.8, 0.9], mean_exit_layer=[1.5, 2.5], num_layers=3,
                      full_accuracy=0.9, chosen=0.9)
    rows = [line for line in curve.to_markdown().splitlines() if line.startswith("|")]
    assert {line.count("|") for line in rows} == {5}  # 4 cells on every row, the header's and the chosen one's
    assert "0.9 **chosen**" in rows[-1]


# ----------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_base(tmp_path_factory):
    """A BERT body + WordLevel tokenizer (as test_cli's) and a csv of 9 rows with integer labels 0..2."""
    import transformers as T
    from test_cli import WORDS, colour_texts, word_tokenizer, write_csv

    root = tmp_path_factory.mktemp("robust_cli")
    torch.manual_seed(0)
    base = T.BertModel(T.BertConfig(vocab_size=4 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=37, max_position_embeddings=32))
    base.save_pretrained(root / "base")
    word_tokenizer().save_pretrained(root / "base")
    rows = [(t, i % 3) for i, (t, _) in enumerate(colour_texts(12, 0))]
    return root, rows, write_csv


def _train(root, data, out, *extra):
    from hf_align.cli import main

    return main(["train", "--model_name_or_path", str(root / "base"), "--dataset_name", str(data), "--output_dir", str(out),
                 "--max_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no", *extra])


@pytest.mark.parametrize("bad", ["huge-id", "nan-csv", "null-jsonl"])
def test_cli_bad_label_values_are_one_line_errors(cli_base, tmp_path, capsys, bad):
    import json

    from test_cli import one_line_error

    root, rows, write_csv = cli_base
    if bad == "huge-id":
        data = write_csv(tmp_path / "d.csv", rows[:-1] + [(rows[-1][0], 10**12)])
        expect = ("holds the class id 1000000000000, far beyond its 4 distinct ids",)
    elif bad == "nan-csv":
        data = write_csv(tmp_path / "d.csv", rows[:-1] + [(rows[-1][0], "nan")])
        expect = ("has 1 missing value(s)", "first at row 11")
    else:
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"text": t, "label": None if i == 3 else y}) + "\n" for i, (t, y) in enumerate(rows)))
        expect = ("has 1 missing value(s)", "first at row")
    assert _train(root, data, tmp_path / "out") == 2
    one_line_error(capsys, "hf-align train: error: label column 'label'", *expect)
    assert not (tmp_path / "out").exists()


def test_cli_truncated_safetensors_is_a_one_line_error(cli_base, tmp_path, capsys):
    import shutil

    from test_cli import one_line_error

    root, rows, write_csv = cli_base
    shutil.copytree(root / "base", tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert _train(tmp_path, write_csv(tmp_path / "d.csv", rows), tmp_path / "out") == 2
    one_line_error(capsys, "could not load the weights", "safetensors only")


def test_cli_analyze_a_single_file_uses_its_only_split(cli_base, tmp_path, capsys):
    from hf_align.cli import main

    root, rows, write_csv = cli_base
    data = write_csv(tmp_path / "d.csv", rows)
    assert main(["analyze", "--model_name_or_path", str(root / "base"), "--dataset_name", data, "--output_dir", str(tmp_path / "a"),
                 "--metrics", "cka"]) == 0
    assert "no 'test' split; using the only split, 'train'" in capsys.readouterr().out
    assert (tmp_path / "a" / "report.md").exists()


def test_cli_demo_steps_must_be_positive(tmp_path, capsys):
    from test_cli import one_line_error

    from hf_align.cli import main

    assert main(["demo", "--steps", "0", "--output_dir", str(tmp_path / "demo")]) == 2  # not a silent 3-epoch run
    one_line_error(capsys, "--steps must be a positive number of training steps, got 0")
    assert not (tmp_path / "demo").exists()


def test_cli_resume_from_checkpoint_resumes(cli_base, tmp_path):
    from safetensors.torch import load_file

    root, rows, write_csv = cli_base
    data = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    steps = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    assert _train(root, data, out, *steps) == 0
    checkpoint = load_file(out / "checkpoint-2" / "model.safetensors")
    # the same command, another learning rate, resumed: already at step 2 of 2, so no step runs and the saved model
    # is the checkpoint's (restarting from step 0 would train 2 steps at the new learning rate)
    assert _train(root, data, out, *steps, "--learning_rate", "0.5", "--resume_from_checkpoint", "True") == 0
    final = load_file(out / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in checkpoint.items())
    assert _train(root, data, tmp_path / "o2", "--resume_from_checkpoint", str(tmp_path / "nope")) == 2


# -------------------------------------------------------------------------------------------------------- images


def test_card_snippet_runs_on_a_grey_scale_model(tmp_path):
    import transformers as T

    import hf_align  # noqa: F401  (registers the pipeline)
    from hf_align.demo import digits_image_processor
    from hf_align.hub import usage_snippet

    model = T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=37, num_labels=10))
    model.save_pretrained(tmp_path / "digits")
    digits_image_processor().save_pretrained(tmp_path / "digits")
    lines = usage_snippet("image-classification", str(tmp_path / "digits"))
    code = "\n".join(lines[lines.index("```python") + 1 : lines.index("```", lines.index("```python") + 1)])
    assert 'Image.new("RGB"' in code  # the snippet feeds an RGB image to the 1-channel model: the pipeline converts it
    namespace: dict = {}
    exec(compile(code, "card-snippet", "exec"), namespace)  # before: "mean must have 3 elements"
    clf = namespace["clf"]
    from PIL import Image

    out = clf(Image.new("RGBA", (20, 20), "white"))
    assert out[0]["num_layers"] == 2 and 1 <= out[0]["exit_layer"] <= 2


# ------------------------------------------------------------------------------------------ noise every user sees


def test_digits_image_processor_selects_the_pil_backend_without_a_warning():
    import subprocess
    import sys

    code = "from hf_align.demo import digits_image_processor; print(type(digits_image_processor()).__name__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "falling back" not in run.stderr and "torchvision" not in run.stderr, run.stderr


@pytest.mark.skipif(torch.accelerator.is_available(), reason="pinning memory is useful with an accelerator")
def test_no_pin_memory_warning_on_a_cpu_only_machine(tmp_path):
    from datasets import Dataset

    from hf_align import AlignedTrainer, DREAMTrainingArguments

    args = _trainer_args(tmp_path, max_steps=1)
    assert args.dataloader_pin_memory is False
    assert DREAMTrainingArguments(output_dir=str(tmp_path / "d"), report_to=[]).dataloader_pin_memory is False
    trainer = AlignedTrainer(model=tiny_model("bert", "BertForSequenceClassification"), args=args,
                             train_dataset=Dataset.from_dict(_text_columns()).with_format("torch"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]


# ------------------------------------------------------------------------------------------- loading and saving


def test_save_keeps_the_users_plot_and_writes_no_pickle(tmp_path):
    from datasets import Dataset

    from hf_align import AlignedTrainer

    data = Dataset.from_dict(_text_columns()).with_format("torch")
    out = tmp_path / "out"
    out.mkdir()
    (out / "layer_accuracy.png").write_bytes(b"the user's own figure")
    trainer = AlignedTrainer(model=tiny_model("bert", "BertForSequenceClassification"), args=_trainer_args(tmp_path, max_steps=1),
                             train_dataset=data, eval_dataset=data)
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(out))
    assert (out / "layer_accuracy.png").read_bytes() == b"the user's own figure"
    assert "![layer-wise accuracy](layer_accuracy_hf_align.png)" in (out / "README.md").read_text()
    assert (out / "layer_accuracy_hf_align.png").exists()
    assert not (out / "training_args.bin").exists()  # what push_to_hub uploads: no pickle
    assert json_args(out)["max_steps"] == 1
    trainer.save_model(str(tmp_path / "fresh"))
    trainer.save_model(str(tmp_path / "fresh"))  # our own plot is replaced by later saves
    assert "![layer-wise accuracy](layer_accuracy.png)" in (tmp_path / "fresh" / "README.md").read_text()


def json_args(folder):
    import json

    return json.loads((folder / "training_args.json").read_text())


# ------------------------------------------------------------------------------------------------- other checks


def test_neural_collapse_metric_without_predictions():
    import evaluate

    from hf_align.metrics import path

    metric = evaluate.load(path("neural_collapse"))
    rng = np.random.default_rng(0)
    H, y = rng.normal(size=(30, 4)), np.arange(30) % 3
    out = metric.compute(features=H.tolist(), references=y.tolist())  # before: TypeError ... NoneType has no len()
    assert "nc1" in out and "nc4" not in out and np.isfinite(out["nc1"])
    full = metric.compute(features=H.tolist(), references=y.tolist(), predictions=y.tolist())
    assert full["nc1"] == pytest.approx(out["nc1"]) and "nc4" in full


@pytest.mark.parametrize("field, value", [("patience", True), ("min_layer", True), ("exit_layer", True)])
def test_boolean_exit_settings_are_refused(field, value):
    from hf_align.modeling.early_exit import EarlyExitConfig

    policy = {"patience": "patience", "exit_layer": "fixed", "min_layer": "confidence"}[field]
    with pytest.raises(ValueError, match=field):
        EarlyExitConfig(policy=policy, **{field: value}).validate(3)


def test_undefined_collapse_warning_points_at_the_caller():
    from hf_align import collapse_report
    from hf_align.analysis.collapse import UndefinedCollapseWarning

    rows = [dict(r, labels=i % 3) for i, r in enumerate(text_rows(24))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collapse_report(tiny_model("bert", "BertForSequenceClassification"), rows, batch_size=8, nc4=False, gnc2_margin=False)
    ours = [w for w in caught if issubclass(w.category, UndefinedCollapseWarning)]
    assert ours and all(w.filename == __file__ for w in ours), [w.filename for w in ours]


def test_resume_continues_the_layer_dropout_draws(tmp_path):
    from datasets import Dataset

    from hf_align import AlignedTrainer

    data = Dataset.from_dict(_text_columns(n=24)).with_format("torch")

    def make(out):
        args = _trainer_args(tmp_path, output_dir=str(out), max_steps=6, logging_steps=1, save_strategy="steps", save_steps=3,
                             learning_rate=5e-3, layer_dropout=0.5)
        return AlignedTrainer(model=tiny_model("bert", "BertForSequenceClassification"), args=args, train_dataset=data)

    full = make(tmp_path / "full")
    full.train()
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for key in ("loss", "layer_1_loss", "layer_2_loss"):
        ref = [e[key] for e in full.state.log_history if key in e]
        again = [e[key] for e in resumed.state.log_history if key in e]
        assert again[-3:] == ref[-3:], key  # before: steps 4-6 repeated the draws of steps 1-3


# -- exit_costs at the position limit ----------------------------------------------------------------------


def _llama_128():
    import transformers as T

    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=37, vocab_size=99, num_key_value_heads=2,
                                            max_position_embeddings=128, pad_token_id=0)).eval()


def test_exit_costs_decodes_up_to_the_last_position():
    import hf_align

    table = hf_align.exit_costs(_llama_128(), mode="decode", kv_length=127, repeats=1, progress=False)
    assert table.kv_length == 127 and "KV cache of 127" in table.to_markdown()
    assert hf_align.exit_costs(_llama_128(), repeats=1, progress=False).kv_length == 127  # default: what fits


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="decode", kv_length=128), "kv_length must be at most 127"),
    (dict(mode="decode", seq_len=128), "seq_len must be at most 127"),
    (dict(mode="forward", seq_len=129), "seq_len must be at most 128"),
])
def test_exit_costs_refuses_lengths_beyond_the_positions_before_any_forward(kwargs, message):
    import hf_align

    model = _llama_128()
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        hf_align.exit_costs(model, repeats=1, progress=False, **kwargs)
    assert not calls


def test_exit_costs_measures_exactly_the_asked_length():
    import transformers as T

    import hf_align

    torch.manual_seed(0)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=200,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    seen = []
    gpt2.transformer.wte.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    table = hf_align.exit_costs(gpt2, mode="forward", seq_len=200, repeats=1, progress=False)
    assert table.seq_len == 200 and set(seen) - {8} == {200}  # 8: the layer view's self-check batch
    with pytest.raises(ValueError, match="seq_len must be at most 200"):
        hf_align.exit_costs(gpt2, mode="forward", seq_len=201, progress=False)


# -- one pickle policy: safetensors only, through the pipeline too ------------------------------------------


def _saved_bert(folder, pickled: bool):
    import os

    import transformers as T
    from test_cli import word_tokenizer

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=37,
                                                         max_position_embeddings=32, num_labels=3)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if pickled:  # transformers 5 writes safetensors only: make the pickled-only folder by hand
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return model


def test_pipeline_refuses_pickled_only_weights_like_from_pretrained(tmp_path, monkeypatch):
    import transformers as T

    import hf_align
    from hf_align.modeling.early_exit import PickledWeightsError

    folder = str(tmp_path / "bin-only")
    _saved_bert(folder, pickled=True)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (reads.append(a), real_load(*a, **k))[1])
    with pytest.raises(PickledWeightsError) as from_pretrained:
        hf_align.EarlyExitModel.from_pretrained(folder)
    with pytest.raises(PickledWeightsError) as from_pipeline:
        T.pipeline("early-exit-classification", model=folder)
    assert str(from_pipeline.value) == str(from_pretrained.value)
    assert "pytorch_model.bin" in str(from_pipeline.value) and "safetensors" in str(from_pipeline.value)
    assert not reads  # refused before any weight file was unpickled
    T.BertForSequenceClassification.from_pretrained(folder)  # the control: transformers itself reads the pickle
    assert reads


def test_pipeline_still_loads_a_safetensors_folder(tmp_path):
    import transformers as T

    folder = str(tmp_path / "safe")
    _saved_bert(folder, pickled=False)
    clf = T.pipeline("early-exit-classification", model=folder, threshold=0.5)
    out = clf("the red cat")
    assert out[0]["num_layers"] == 2 and 1 <= out[0]["exit_layer"] <= 2
    with pytest.raises(Exception, match="use_safetensors=False"):
        T.pipeline("early-exit-classification", model=folder, model_kwargs={"use_safetensors": False})


# -- the super-resolution folder without `import hf_align` ---------------------------------------------------

_SR_WITHOUT_HF_ALIGN = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
out = {}
for name, kwargs in [("plain", {}), ("custom_untrusted", {"custom_pipeline": "pipeline"})]:
    try:
        DiffusionPipeline.from_pretrained(SR, **kwargs)
        out[name] = "loaded"
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
    out[name + "_imported"] = "hf_align" in sys.modules
low = np.full((1, 8, 8, 3), 0.5, dtype=np.float32)
for name, kwargs in [("trusted", {"trust_remote_code": True}),
                     ("custom_trusted", {"custom_pipeline": "pipeline", "trust_remote_code": True})]:
    pipe = DiffusionPipeline.from_pretrained(SR, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    high = pipe(low, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    out[name] = [type(pipe).__name__, type(pipe).__module__, np.asarray(high).tolist()]
print("RESULT" + json.dumps(out))
"""


def _saved_sr(folder):
    from diffusers import DDPMScheduler

    from hf_align.diffusion import sr_unet
    from hf_align.pipelines.super_resolution import SuperResolutionPipeline

    torch.manual_seed(0)
    pipe = SuperResolutionPipeline(sr_unet(image_channels=3, block_out_channels=(8, 16), norm_num_groups=4),
                                   DDPMScheduler(num_train_timesteps=20), scale_factor=2)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def test_sr_folder_carries_a_pipeline_file_that_only_imports_hf_align(tmp_path):
    import json

    folder = tmp_path / "sr"
    _saved_sr(folder)
    code = (folder / "pipeline.py").read_text()
    imports = [line.strip() for line in code.splitlines() if line.strip().startswith(("import ", "from "))]
    assert imports == ["from hf_align.pipelines.super_resolution import SuperResolutionPipeline  # noqa: F401"]
    # diffusers' [file, class] pair for a pipeline defined elsewhere
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == ["pipeline",
                                                                                   "SuperResolutionPipeline"]
    card = (folder / "README.md").read_text()
    assert "import hf_align" in card and f'DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)' in card


def test_sr_folder_loads_after_import_without_trust_and_runs_no_file_of_it(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils

    from hf_align.pipelines.super_resolution import SuperResolutionPipeline

    folder = tmp_path / "sr"
    pipe = _saved_sr(folder)
    (folder / "pipeline.py").write_text("raise RuntimeError('the folder code ran')\n")  # must never run

    def no_dynamic_module(*args, **kwargs):
        raise AssertionError("diffusers was asked to load code from the folder")

    monkeypatch.setattr(dynamic_modules_utils, "get_class_from_dynamic_module", no_dynamic_module)
    low = np.full((1, 8, 8, 3), 0.25, dtype=np.float32)
    expected = pipe(low, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    for loader in (DiffusionPipeline, SuperResolutionPipeline):
        got = loader.from_pretrained(folder)
        assert type(got) is SuperResolutionPipeline
        got.set_progress_bar_config(disable=True)
        out = got(low, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        np.testing.assert_allclose(out, expected, atol=1e-6)
    # with trust given, diffusers' own path decides (here it runs the replaced file, and its error surfaces)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="the folder code ran"):
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)


def test_other_pipelines_resolve_as_diffusers_does(tmp_path):
    import json

    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "ddpm")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "ddpm")) is DDPMPipeline
    # a third party's [file, class] pair is not hf-align's: diffusers' refusal stands
    folder = tmp_path / "other"
    _saved_sr(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "mine.py").write_text((folder / "pipeline.py").read_text())
    index["_class_name"] = ["mine", "SuperResolutionPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: ~10-30 s
def test_sr_folder_loads_without_import_through_its_trusted_pipeline_file(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    folder = tmp_path / "sr"
    pipe = _saved_sr(folder)
    low = np.full((1, 8, 8, 3), 0.5, dtype=np.float32)
    expected = pipe(low, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
           "HF_MODULES_CACHE": str(tmp_path / "home" / "modules"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, "-c", f"SR = {str(folder)!r}\n" + _SR_WITHOUT_HF_ALIGN], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    # no argument, or naming the file, without trust: diffusers refuses before running it, and says what to pass
    for name in ("plain", "custom_untrusted"):
        assert out[name][0] == "ValueError" and "custom code in pipeline.py" in out[name][1]
        assert "trust_remote_code=True" in out[name][1]
        assert out[name + "_imported"] is False
    for name in ("trusted", "custom_trusted"):
        assert out[name][:2] == ["SuperResolutionPipeline", "hf_align.pipelines.super_resolution"]
        np.testing.assert_allclose(np.asarray(out[name][2]), expected, atol=1e-6)


def test_pickled_only_hub_repo_is_refused_from_the_offline_cache(tmp_path):
    import transformers as T
    from hub_cache import populate_hub_cache

    import hf_align
    from hf_align.modeling.early_exit import PickledWeightsError

    folder = tmp_path / "bin-only"
    _saved_bert(str(folder), pickled=True)
    cache = tmp_path / "cache"
    populate_hub_cache(cache, "user/bin-only", str(folder))
    with pytest.raises(PickledWeightsError, match="user/bin-only holds only pickled weights"):
        hf_align.EarlyExitModel.from_pretrained("user/bin-only", cache_dir=str(cache))
    with pytest.raises(PickledWeightsError, match="user/bin-only holds only pickled weights"):
        T.pipeline("early-exit-classification", model="user/bin-only", model_kwargs={"cache_dir": str(cache)})
