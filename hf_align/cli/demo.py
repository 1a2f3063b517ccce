"""`hf-align demo`: the main job on embedded data (scikit-learn's digits), on a CPU in a minute or two.

1. trains a 6-block ViT from scratch on the digits with aligned loss (AlignedTrainer) and prints the
   accuracy of every block through the model's one head;
2. measures how representations progress through depth (linear CKA and the paper's sample-wise cosine
   between every pair of layers, and how well the two agree), saved as heatmaps;
3. serves the model with early exit: calibrates a confidence threshold on a validation split carved from the
   training images (never trained on) so that, with 95% confidence, the exit loses at most 1 point of
   accuracy against full depth; then checks that promise on the untouched test set (accuracy and blocks
   actually run) and says plainly whether it held; saves a shareable pipeline.
Everything lands in ``output_dir`` (model + card, plots, pipeline, ``report.md`` / ``report.json``).
"""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import torch


def digits_vit(num_layers: int = 6, hidden_size: int = 64, seed: int = 0):
    """A small ViT for 8x8 one-channel digits (2x2 patches -> 16 tokens + CLS), built from a config."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, intermediate_size=2 * hidden_size, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
    )
    return ViTForImageClassification(config)


def scipy_docs_encoder(texts, num_labels: int, num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    """A small BERT-style encoder for :func:`hf_align.data.load_scipy_docs_dataset`, built from a config, and a
    WordPiece tokenizer trained on ``texts`` (no download): ``(model, tokenizer)``."""
    from transformers import BertConfig, BertForSequenceClassification

    from ..data import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=4000, model_max_length=128)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        intermediate_size=2 * hidden_size, max_position_embeddings=128, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForSequenceClassification(config), tokenizer


def python_docs_llama(texts, block_size: int = 128, num_layers: int = 4, hidden_size: int = 64, vocab_size: int = 2048,
                      seed: int = 0):
    """A small Llama for causal-LM training on :func:`hf_align.data.load_python_docs_texts`, built from a config
    (random init), and a byte-level BPE tokenizer trained on ``texts`` (no download): ``(model, tokenizer)``.
    Positions: ``max(256, block_size)`` (rotary; blocks of ``block_size`` plus room to generate after them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..data import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, model_max_length=block_size)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=int(8 * hidden_size / 3), max_position_embeddings=max(256, block_size),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def digits_image_processor():
    """The processor matching :func:`hf_align.data.load_digits_dataset`: 8x8 grey images scaled to [-1, 1]."""
    try:  # the PIL backend by name: ``ViTImageProcessor`` is the torchvision one and warns when falling back to PIL
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:  # transformers < 5.x without separate backends
        from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 8, "width": 8}, do_resize=True, image_mean=[0.5], image_std=[0.5])


def digit_image(pixel_values):
    """(1, 8, 8) tensor in [-1, 1] -> the 8x8 greyscale PIL image it came from."""
    from PIL import Image

    array = ((np.asarray(pixel_values)[0] + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


TOLERANCE = 0.01  # the promise: the calibrated exit loses at most 1 point of accuracy against full depth ...
CONFIDENCE = 0.95  # ... with this confidence, on new data (calibration uses an upper confidence bound)
VALIDATION_SIZE = 300  # images carved from the training split for calibration (stratified, never trained on)


def run_demo(output_dir: str = "hf-align-demo", steps: int = 800, seed: int = 0) -> dict:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        # max_steps=0 would make the Trainer fall back to its default of 3 epochs
        raise ValueError(f"--steps must be a positive number of training steps, got {steps!r}")
    from transformers import pipeline

    from ..analysis import UndefinedSimilarityWarning, layer_similarity, rank_correlation
    from ..data import load_digits_dataset
    from ..modeling import EarlyExitModel, calibrate
    from ..trainers import AlignedTrainer, AlignedTrainingArguments

    os.makedirs(output_dir, exist_ok=True)
    from sklearn.model_selection import train_test_split

    data = load_digits_dataset()
    train, test = data["train"], data["test"]
    idx_fit, idx_val = train_test_split(np.arange(len(train)), test_size=VALIDATION_SIZE, random_state=seed,
                                        stratify=np.asarray(train["labels"]))
    train, val = train.select(np.sort(idx_fit)), train.select(np.sort(idx_val))
    print(f"digits: {len(train)} train / {len(val)} validation (calibration) / {len(test)} test images "
          "(scikit-learn's handwritten digits)")

    # 1. aligned training ------------------------------------------------------------------------------
    model = digits_vit(seed=seed)
    model_dir = os.path.join(output_dir, "aligned-vit")
    args = AlignedTrainingArguments(
        output_dir=model_dir, layer_weights="linear", max_steps=steps, per_device_train_batch_size=64,
        learning_rate=2e-3, warmup_steps=max(1, steps // 15), lr_scheduler_type="cosine", weight_decay=0.05,
        logging_steps=max(1, steps // 3), save_strategy="no", report_to=[], seed=seed, use_cpu=True,
        per_device_eval_batch_size=256,
    )
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    start = time.perf_counter()
    trainer.train()
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f}s")
    metrics = trainer.evaluate()
    trainer.save_model(model_dir)
    L = trainer.num_layers
    accuracy = [metrics[f"eval_layer_{l}_accuracy"] for l in range(1, L + 1)]
    print("\naccuracy of every block through the model's own head (test set):")
    for layer, acc in enumerate(accuracy, start=1):
        print(f"  block {layer}: {100 * acc:5.1f}%  " + "#" * int(round(40 * acc)))
    print(f"minimal depth: {int(metrics['eval_minimal_depth'])} of {L}; monotone in depth: "
          f"{'yes' if metrics['eval_monotone'] == 1.0 else 'no'}  (model + card: {model_dir})")

    # 2. layer-wise similarity -----------------------------------------------------------------------------
    images = test.remove_columns("labels")
    model.eval()
    with warnings.catch_warnings():  # the undefined (constant) layers are reported below
        warnings.simplefilter("ignore", UndefinedSimilarityWarning)
        cka = layer_similarity(model, images, metric="cka", pooling="cls", batch_size=256, progress=False)
        cos = layer_similarity(model, images, metric="cosine", pooling="cls", batch_size=256, progress=False)
    cka.plot(os.path.join(output_dir, "layer_cka.png"))
    cos.plot(os.path.join(output_dir, "layer_cosine.png"))
    rho = rank_correlation(cos.matrix, cka.matrix)
    neighbours = ["undefined" if np.isnan(cka.matrix[l, l + 1]) else f"{cka.matrix[l, l + 1]:.2f}" for l in range(L)]
    print(f"\nlinear CKA between neighbouring layers (0 = embeddings): {', '.join(neighbours)}")
    if cka.undefined_layers:
        print(f"  undefined (constant features, e.g. the CLS input is the same for every image): {cka.undefined_layers}")
    print(f"cosine vs CKA agreement (Spearman over layer pairs): {rho:.3f}  (heatmaps: layer_cka.png, layer_cosine.png)")

    # 3. early exit: calibrated on the validation split, checked on the untouched test set -------------------
    early = EarlyExitModel(model, policy="confidence")
    curve = calibrate(early, val, tolerance=TOLERANCE, confidence=CONFIDENCE, batch_size=256, progress=False)
    curve.plot(os.path.join(output_dir, "exit_curve.png"))
    held = test
    batch = held[:]
    with torch.no_grad():
        out = early(pixel_values=batch["pixel_values"])
        full = model(pixel_values=batch["pixel_values"]).logits
    exit_acc = (out.logits.argmax(-1) == batch["labels"]).double().mean().item()
    full_acc = (full.argmax(-1) == batch["labels"]).double().mean().item()
    mean_exit = out.exit_layers.double().mean().item()
    loss = full_acc - exit_acc
    held_ok = loss <= TOLERANCE + 1e-12
    c = curve.values.index(curve.chosen)
    promise = (f"the calibrated exit loses at most {100 * TOLERANCE:.0f} point of accuracy against full depth on new "
               f"data ({100 * CONFIDENCE:.0f}% upper confidence bound on the paired loss, calibrated on {len(val)} "
               "validation images carved from the training split)")
    verdict = (f"held-out ({len(held)} test images): {100 * exit_acc:.2f}% with early exit vs {100 * full_acc:.2f}% at "
               f"full depth, loss {100 * loss:+.2f} points -> tolerance "
               f"{'HELD' if held_ok else 'NOT HELD'}")
    print(f"\nearly exit (confidence >= {curve.chosen}): promise: {promise}")
    print(f"  validation: loss {100 * (curve.full_accuracy - curve.accuracy[c]):+.2f} points, upper bound "
          f"{100 * curve.loss_upper_bound[c]:.2f} points")
    print(f"  {verdict}; running {mean_exit:.2f} of {L} blocks on average "
          f"({100 * (1 - mean_exit / L):.0f}% of the blocks skipped)")
    clf = pipeline("early-exit-classification", model=early, image_processor=digits_image_processor())
    pipe_dir = os.path.join(output_dir, "early-exit-pipeline")
    clf.save_pretrained(pipe_dir)
    print(f"  pipeline saved to {pipe_dir}; three held-out digits through it:")
    for i in range(3):
        result = clf(digit_image(held[i]["pixel_values"]))[0]
        print(f"    true {int(held[i]['labels'])}: {result}")
    report = {"promise": promise, "tolerance": TOLERANCE, "confidence": CONFIDENCE, "threshold": curve.chosen,
              "validation_size": len(val), "validation_loss": curve.full_accuracy - curve.accuracy[c],
              "validation_loss_upper_bound": curve.loss_upper_bound[c], "held_out_size": len(held),
              "held_out_exit_accuracy": exit_acc, "held_out_full_accuracy": full_acc, "held_out_loss": loss,
              "tolerance_held": held_ok, "mean_exit_layer": mean_exit, "num_layers": L,
              "layer_accuracy": accuracy, "cka_cosine_rank_correlation": rho}
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("# hf-align demo report\n\n"
                + "Accuracy of every block through the model's own head (test set): "
                + ", ".join(f"{100 * a:.1f}%" for a in accuracy) + "\n\n"
                + f"## Early exit\n\nPromise: {promise}.\n\nChosen: confidence >= {curve.chosen}.\n\n"
                + f"Result: {verdict}; {mean_exit:.2f} of {L} blocks run on average.\n\n"
                + "Calibration curve (validation split):\n\n" + curve.to_markdown() + "\n\n![exit curve](exit_curve.png)\n")
    return {"layer_accuracy": accuracy, "metrics": metrics, "cka": cka.matrix, "cosine": cos.matrix,
            "rank_correlation": rho, "exit_threshold": curve.chosen, "exit_accuracy": exit_acc,
            "full_accuracy": full_acc, "mean_exit_layer": mean_exit, "tolerance_held": held_ok, "held_out_loss": loss}
