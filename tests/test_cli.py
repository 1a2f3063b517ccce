"""The hf-align command line: every command end to end on tiny models saved in tmp_path (a BERT body with a
WordLevel tokenizer, a ViT classifier with its image processor), datasets written as csv files / an image
folder, `--help` of each command, the one-line errors; and the calibration bound behind the demo's promise.

References are independent of hf-align: the saved model's own modules and logits (transformers), a float64
numpy linear CKA, NC1 and exit simulation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as T
from references import ref_linear_cka
from tiny_models import tiny_model

import hf_align
from hf_align.cli import main

WORDS = ["red", "green", "blue", "the", "a", "cat", "dog", "sat", "ran", "on", "mat", "far", "big", "small"]
COLOURS = ["red", "green", "blue"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", model_max_length=32)


def colour_texts(n, seed):
    """Sentences whose label (a string) is the one colour word they contain."""
    rng = np.random.default_rng(seed)
    filler = WORDS[3:]
    rows = []
    for i in range(n):
        colour = COLOURS[i % 3]
        words = list(rng.choice(filler, size=rng.integers(3, 9)))
        words.insert(int(rng.integers(0, len(words) + 1)), colour)
        rows.append((" ".join(words), colour))
    return rows


def write_csv(path, rows, header=("text", "label")):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def one_line_error(capsys, *fragments):
    """The error is one line, the last on stderr (progress bars of `datasets` may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """A BERT *body* (no classification head) + tokenizer, a csv dataset folder, and hf-align train run on it."""
    root = tmp_path_factory.mktemp("cli_text")
    torch.manual_seed(0)
    base = T.BertModel(T.BertConfig(vocab_size=4 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=37, max_position_embeddings=32))
    base.save_pretrained(root / "base")
    word_tokenizer().save_pretrained(root / "base")
    (root / "data").mkdir()
    # one sentence longer than the model's 32 positions: truncated to what the tokenizer and model allow
    write_csv(root / "data" / "train.csv", colour_texts(60, seed=1) + [("red " + "cat " * 40, "red")])
    write_csv(root / "data" / "test.csv", colour_texts(30, seed=2))
    out = root / "trained"
    code = main(["train", "--model_name_or_path", str(root / "base"), "--dataset_name", str(root / "data"),
                 "--output_dir", str(out), "--max_steps", "3", "--gradient_accumulation_steps", "2",
                 "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--layer_weights", "0.25", "0.75",
                 "--save_strategy", "no", "--report_to", "none", "--seed", "3"])
    return root, out, code


def test_help_of_every_command(capsys):
    for command in ("train", "analyze", "evaluate", "demo", "layers"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: hf-align {command}" in out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    out = capsys.readouterr().out
    # the HfArgumentParser dataclasses: hf-align's own, AlignedTrainingArguments and stock TrainingArguments fields
    for option in ("--model_name_or_path", "--dataset_name", "--label_column", "--layer_weights", "--aligned_layers",
                   "--gradient_accumulation_steps", "--lr_scheduler_type", "--output_dir"):
        assert option in out
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(c in out for c in ("train", "analyze", "evaluate", "demo", "layers"))
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hf-align {hf_align.__version__}"


def test_train_text_base_checkpoint(text_setup):
    root, out, code = text_setup
    assert code == 0
    # a plain transformers classifier with a new 3-label head named from the data's string labels (sorted)
    model = T.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    assert os.path.exists(out / "tokenizer.json") and os.path.exists(out / "model.safetensors")
    # the body was trained: the first block's weights moved away from the base checkpoint's
    base = T.BertModel.from_pretrained(root / "base")
    assert not torch.allclose(model.bert.encoder.layer[0].attention.self.query.weight, base.encoder.layer[0].attention.self.query.weight)
    # every TrainingArguments / AlignedTrainingArguments option given on the command line reached the trainer
    card = (out / "README.md").read_text()
    assert "| gradient_accumulation_steps | `2` |" in card and "| global_step | `3` |" in card
    assert "| weights | `[0.25, 0.75]` |" in card and "| seed | `3` |" in card


def _reference_layer_logits(folder, texts):
    """Every block's logits through BERT's own pooler + classifier, and the model's own logits."""
    model = T.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = T.AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
        per_layer = [model.classifier(model.bert.pooler(h)) for h in out.hidden_states[1:]]
    return model, torch.stack(per_layer, 1).double().numpy(), out.logits.double().numpy(), out.hidden_states


def test_evaluate_text(text_setup, tmp_path):
    root, trained, _ = text_setup
    report_dir = tmp_path / "eval"
    assert main(["evaluate", "--model_name_or_path", str(trained), "--dataset_name", str(root / "data"),
                 "--output_dir", str(report_dir), "--values", "0.34", "0.4", "0.5", "--batch_size", "7"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    for name in ("report.md", "layer_accuracy.png", "exit_curve.png", "exit_costs.png"):
        assert (report_dir / name).exists()
    # the cost table: one row per exit depth, blocks run = depth, counted FLOPs at the analytic count
    costs = report["costs"]
    L = len(report["layer_accuracy"])
    assert [r["exit_layer"] for r in costs] == [r["blocks_run"] for r in costs] == list(range(1, L + 1))
    assert all(abs(r["flops_rel_err"]) < 0.02 for r in costs)
    assert all(a["flops"] < b["flops"] for a, b in zip(costs, costs[1:]))
    rows = colour_texts(30, seed=2)
    model, logits, own, _ = _reference_layer_logits(trained, [t for t, _ in rows])
    np.testing.assert_allclose(logits[:, -1], own, atol=1e-5)  # the reference reproduces the model's own logits
    labels = np.array([model.config.label2id[c] for _, c in rows])
    np.testing.assert_allclose(report["layer_accuracy"], (logits.argmax(-1) == labels[:, None]).mean(0), atol=1e-12)
    curve = report["exit_curve"]
    assert curve["values"] == [0.34, 0.4, 0.5]
    probs = torch.tensor(logits).softmax(-1).numpy()
    for value, acc, depth in zip(curve["values"], curve["accuracy"], curve["mean_exit_layer"]):
        sure = probs.max(-1) >= value  # (N, L); the last block always exits
        sure[:, -1] = True
        exits = sure.argmax(1)
        assert acc == pytest.approx(np.mean(logits[np.arange(len(rows)), exits].argmax(-1) == labels), abs=1e-12)
        assert depth == pytest.approx(np.mean(exits + 1), abs=1e-12)


def test_evaluate_by_hub_repo_id_from_the_cache(text_setup, tmp_path):
    """`--model_name_or_path user/name` read offline from a Hub cache in the real layout (refs/main -> snapshot)."""
    import shutil

    root, trained, _ = text_setup
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--aligned-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(trained, repo / "snapshots" / commit)
    for folder, name in ((str(trained), "by_folder"), ("someone/aligned-bert", "by_id")):
        assert main(["evaluate", "--model_name_or_path", folder, "--cache_dir", str(tmp_path / "cache"),
                     "--dataset_name", str(root / "data"), "--output_dir", str(tmp_path / name)]) == 0
    by_folder, by_id = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("by_folder", "by_id"))
    assert by_id["model"] == "someone/aligned-bert"
    assert by_id["layer_accuracy"] == by_folder["layer_accuracy"] and by_id["exit_curve"] == by_folder["exit_curve"]


def test_analyze_text(text_setup, tmp_path):
    root, trained, _ = text_setup
    report_dir = tmp_path / "analysis"
    assert main(["analyze", "--model_name_or_path", str(trained), "--dataset_name", str(root / "data"),
                 "--output_dir", str(report_dir), "--batch_size", "16"]) == 0
    for name in ("report.md", "similarity_cka.png", "similarity_cosine.png", "collapse.png"):
        assert (report_dir / name).exists()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["pooling"] == "cls"
    rows = colour_texts(30, seed=2)
    model, _, _, hidden = _reference_layer_logits(trained, [t for t, _ in rows])
    feats = [h[:, 0].double().numpy() for h in hidden]  # CLS pooling, layers 0..L
    cka = np.array(report["similarity"]["cka"]["matrix"], dtype=float)
    assert np.isnan(cka[0]).all()  # BERT's embedding output at CLS is the same for every sentence: undefined
    for i in range(1, 3):
        for j in range(1, 3):
            assert cka[i, j] == pytest.approx(ref_linear_cka(feats[i], feats[j]), abs=1e-6)
    cosine = np.array(report["similarity"]["cosine"]["matrix"], dtype=float)
    unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in feats]
    assert cosine[1, 2] == pytest.approx(np.mean(np.sum(unit[1] * unit[2], 1)), abs=1e-6)
    # NC1 of the last block: tr(Sigma_W Sigma_B^+) / K, class means' mean as the global mean
    labels = np.array([model.config.label2id[c] for _, c in rows])
    H = feats[2]
    means = np.stack([H[labels == k].mean(0) for k in range(3)])
    centred = H - means[labels]
    sw = centred.T @ centred / len(H)
    mc = means - means.mean(0)
    nc1 = np.trace(sw @ np.linalg.pinv(mc.T @ mc / 3)) / 3
    assert report["collapse"]["layers"] == [1, 2]
    assert report["collapse"]["per_layer"][-1]["nc1"] == pytest.approx(nc1, rel=1e-6)


def test_image_folder_train_and_evaluate(tmp_path, capsys):
    """A ViT classifier + its image processor, an image folder dataset (PNG files), train then evaluate."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 4)):
        for k, name in enumerate(["r", "g", "b"]):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
                pixels[..., k] += 180
                Image.fromarray(pixels).save(tmp_path / "images" / split / name / f"{i}.png")
    model = tiny_model("vit", "ViTForImageClassification", num_hidden_layers=2)
    model.save_pretrained(tmp_path / "vit")
    T.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    assert main(["train", "--model_name_or_path", str(tmp_path / "vit"), "--dataset_name", str(tmp_path / "images"),
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "6",
                 "--save_strategy", "no"]) == 0
    assert (tmp_path / "out" / "preprocessor_config.json").exists()
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "out"), "--dataset_name", str(tmp_path / "images"),
                 "--output_dir", str(tmp_path / "eval"), "--policy", "fixed", "--values", "1", "2"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    # the last block's accuracy is the saved model's own accuracy on the test images, through its own processor
    trained = T.AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    processor = T.AutoImageProcessor.from_pretrained(tmp_path / "out")
    correct = []
    for k, name in enumerate(["r", "g", "b"]):
        folder = tmp_path / "images" / "test" / name
        images = [Image.open(folder / f).convert("RGB") for f in sorted(os.listdir(folder))]
        with torch.no_grad():
            pred = trained(**processor(images=images, return_tensors="pt")).logits.argmax(-1)
        correct += (pred == k).tolist()
    assert report["layer_accuracy"][-1] == pytest.approx(np.mean(correct), abs=1e-12)
    assert report["exit_curve"]["values"] == [1, 2]
    assert report["exit_curve"]["mean_exit_layer"] == [1.0, 2.0]
    assert report["exit_curve"]["accuracy"] == pytest.approx(report["layer_accuracy"], abs=1e-12)


def test_embedded_default_with_a_fresh_model(tmp_path, capsys):
    assert main(["train", "--dataset_name", "embedded:digits", "--output_dir", str(tmp_path / "digits"),
                 "--max_steps", "1", "--max_train_samples", "32", "--max_eval_samples", "20",
                 "--save_strategy", "no"]) == 0
    out = capsys.readouterr().out
    assert "no --model_name_or_path: using a fresh 6-block ViT for 8x8 greyscale digits" in out
    model = T.AutoModelForImageClassification.from_pretrained(tmp_path / "digits")
    assert model.config.num_channels == 1 and model.config.num_labels == 10
    assert (tmp_path / "digits" / "preprocessor_config.json").exists()


# ---------------------------------------------------------------------------------------------- bad arguments


def test_unknown_model_family(tmp_path, capsys):
    T.FunnelConfig(num_labels=2).save_pretrained(tmp_path / "albert")  # a family hf-align does not register
    csv = write_csv(tmp_path / "d.csv", colour_texts(6, 0))
    assert main(["train", "--model_name_or_path", str(tmp_path / "albert"), "--dataset_name", csv,
                 "--output_dir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "hf-align train: error: unknown model family", "model_type='funnel'", "bert (bert:")
    assert not (tmp_path / "out").exists()


def test_missing_dataset_column_names_the_available_ones(text_setup, tmp_path, capsys):
    root, _, _ = text_setup
    assert main(["train", "--model_name_or_path", str(root / "base"), "--dataset_name", str(root / "data"),
                 "--text_column", "sentence", "--output_dir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "column 'sentence' (--text_column)", "available columns: ['text', 'label']")
    assert main(["analyze", "--model_name_or_path", str(root / "base"), "--dataset_name", str(root / "data"),
                 "--label_column", "y", "--output_dir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "hf-align analyze: error: column 'y' (--label_column)", "available columns")
    # string labels the trained model does not know (its labels are blue, green, red)
    csv = write_csv(tmp_path / "d.csv", [("the cat", "cyan"), ("a dog", "red")])
    assert main(["evaluate", "--model_name_or_path", str(root / "trained"), "--dataset_name", csv,
                 "--dataset_test_split", "train", "--output_dir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "label column 'label' holds ['cyan']", "labels ['blue', 'green', 'red']")
    assert not (tmp_path / "out").exists()


def test_label_column_out_of_range(tmp_path, capsys):
    model = tiny_model("bert", "BertForSequenceClassification", num_labels=2, vocab_size=4 + len(WORDS))
    model.save_pretrained(tmp_path / "clf")
    word_tokenizer().save_pretrained(tmp_path / "clf")
    csv = write_csv(tmp_path / "d.csv", [(t, COLOURS.index(c)) for t, c in colour_texts(9, 0)])
    for command in ("train", "evaluate"):
        assert main([command, "--model_name_or_path", str(tmp_path / "clf"), "--dataset_name", csv,
                     "--dataset_test_split", "train", "--output_dir", str(tmp_path / "out")]) == 2
        one_line_error(capsys, f"hf-align {command}: error: label column 'label' holds class ids 0..2", "num_labels=2")
    assert not (tmp_path / "out").exists()


def test_missing_model_folder_and_bad_options(tmp_path, capsys):
    csv = write_csv(tmp_path / "d.csv", colour_texts(6, 0))
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "nope"), "--dataset_name", csv]) == 2
    one_line_error(capsys, "error: model folder", "does not exist")
    assert main(["train", "--dataset_name", csv, "--output_dir", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "--model_name_or_path is required")
    assert main(["train", "--dataset_name", "embedded:digits"]) == 2
    one_line_error(capsys, "hf-align train: error: --output_dir is required")
    assert main(["train", "--dataset_name", "embedded:digits", "--output_dir", str(tmp_path / "o"),
                 "--layer_weights", "heavy"]) == 2
    one_line_error(capsys, "--layer_weights expects one of", "got heavy")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--no_such_option", "1"])
    assert exit_.value.code == 2
    one_line_error(capsys, "hf-align train: error: unrecognized arguments: --no_such_option 1")
    with pytest.raises(SystemExit) as exit_:
        main(["fly"])
    assert exit_.value.code == 2


def test_entry_point_exit_status(tmp_path):
    """The installed `hf-align` script (or `python -m hf_align.cli`): a bad argument exits 2 with one line."""
    script = os.path.join(os.path.dirname(sys.executable), "hf-align")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "hf_align.cli"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(hf_align.__file__))}
    done = subprocess.run([*command, "train", "--model_name_or_path", str(tmp_path / "missing"), "--dataset_name",
                           "embedded:digits", "--output_dir", str(tmp_path / "o")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"hf-align train: error: model folder {str(tmp_path / 'missing')!r} does not exist"]


# ---------------------------------------------------------------------------------------------- layers


def test_layers_family(capsys):
    assert main(["layers", "llama"]) == 0
    out = capsys.readouterr().out
    assert "family='llama'" in out and "num_layers=4" in out and "self-check" in out
    assert main(["layers", "--list_families"]) == 0
    assert "vit (vit, deit: image-classification" in capsys.readouterr().out  # + feature-extraction (base models)
    assert main(["layers", "no-such-family"]) == 2
    one_line_error(capsys, "hf-align layers: error:")
    # a model type of a family (deit: one config type that maps to two image-classification classes)
    assert main(["layers", "deit"]) == 0
    out = capsys.readouterr().out
    assert "DeiTForImageClassification" in out and "family='vit'" in out and "self-check: max |head(h_L)" in out


def test_layers_local_folder(tmp_path, capsys):
    tiny_model("deberta-v2", "DebertaV2ForSequenceClassification").save_pretrained(tmp_path)
    assert main(["layers", str(tmp_path)]) == 0
    assert "DebertaV2ForSequenceClassification" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- demo promise


def _ref_upper_bound(n_h, n_g, n, z):
    """Agresti-Min adjusted Wald upper bound on a paired difference of proportions, written out by hand."""
    a = (n_h + 0.5) / (n + 2)
    b = (n_g + 0.5) / (n + 2)
    return (a - b) + z * np.sqrt((a + b - (a - b) ** 2) / (n + 2))


def test_accuracy_loss_upper_bound():
    from hf_align.modeling.calibration import accuracy_loss_upper_bound

    full = np.array([1] * 90 + [0] * 10, dtype=bool)
    exit_ = full.copy()
    exit_[:4] = False  # 4 samples lost
    exit_[95] = True  # 1 gained
    assert accuracy_loss_upper_bound(full, exit_, 0.95) == pytest.approx(_ref_upper_bound(4, 1, 100, 1.6448536269514722), rel=1e-12)
    assert accuracy_loss_upper_bound(full, full, 0.95) == pytest.approx(_ref_upper_bound(0, 0, 100, 1.6448536269514722), rel=1e-12)
    with pytest.raises(ValueError, match="confidence must be in"):
        accuracy_loss_upper_bound(full, exit_, 1.0)


def test_calibrate_with_confidence_picks_the_shallowest_setting_whose_bound_holds():
    from hf_align.modeling import EarlyExitModel, calibrate

    torch.manual_seed(0)
    model = tiny_model("bert", "BertForSequenceClassification").eval()
    early = EarlyExitModel(model)
    data = [{"input_ids": torch.randint(5, 99, (6,)), "labels": torch.tensor(i % 3)} for i in range(120)]
    values = [0.34, 0.36, 0.38, 0.4, 0.45, 0.5, 1.0]
    # reference: per-layer logits through BERT's own pooler + classifier, exits simulated by hand
    ids = torch.stack([d["input_ids"] for d in data])
    labels = np.array([int(d["labels"]) for d in data])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        per_layer = torch.stack([model.classifier(model.bert.pooler(h)) for h in hs], 1).double()
    probs, pred = per_layer.softmax(-1).numpy(), per_layer.argmax(-1).numpy()
    full_correct = pred[:, -1] == labels
    z = 1.6448536269514722
    expected, best_depth = None, None
    for v in values:
        sure = probs.max(-1) >= v
        sure[:, -1] = True
        exits = sure.argmax(1)
        correct = pred[np.arange(len(labels)), exits] == labels
        bound = _ref_upper_bound(np.sum(full_correct & ~correct), np.sum(correct & ~full_correct), len(labels), z)
        if bound <= 0.05 and (best_depth is None or exits.mean() < best_depth):
            expected, best_depth = v, exits.mean()
    curve = calibrate(early, data, tolerance=0.05, confidence=0.95, values=values, batch_size=32, progress=False)
    assert curve.chosen == expected and early.settings.threshold == expected
    assert len(curve.loss_upper_bound) == len(values)


@pytest.mark.slow
def test_demo_holds_its_exit_tolerance_on_held_out_data(tmp_path):
    from hf_align.cli.demo import run_demo

    result = run_demo(output_dir=str(tmp_path / "demo"))
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["tolerance_held"] and result["tolerance_held"]
    assert report["held_out_full_accuracy"] - report["held_out_exit_accuracy"] <= report["tolerance"] + 1e-12
    assert report["held_out_size"] == 450 and report["validation_size"] == 300
