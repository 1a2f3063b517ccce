"""`hf-align demo`: the main job on embedded data (scikit-learn's digits), on a CPU in a minute or two.

1. trains a 6-block ViT from scratch on the digits with aligned loss (AlignedTrainer) and prints the
   accuracy of every block through the model's one head;
2. measures how representations progress through depth (linear CKA and the paper's sample-wise cosine
   between every pair of layers, and how well the two agree), saved as heatmaps;
3. serves the model with early exit: calibrates a confidence threshold on half of the test set, reports
   accuracy and the blocks actually run on the other half, and saves a shareable pipeline.
Everything lands in ``output_dir`` (model + card, plots, pipeline).
"""

from __future__ import annotations

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


def digits_image_processor():
    """The processor matching :func:`hf_align.data.load_digits_dataset`: 8x8 grey images scaled to [-1, 1]."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 8, "width": 8}, do_resize=True, image_mean=[0.5], image_std=[0.5])


def digit_image(pixel_values):
    """(1, 8, 8) tensor in [-1, 1] -> the 8x8 greyscale PIL image it came from."""
    from PIL import Image

    array = ((np.asarray(pixel_values)[0] + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


def run_demo(output_dir: str = "hf-align-demo", steps: int = 800, seed: int = 0) -> dict:
    from transformers import pipeline

    from .analysis import UndefinedSimilarityWarning, layer_similarity, rank_correlation
    from .data import load_digits_dataset
    from .modeling import EarlyExitModel, calibrate
    from .trainers import AlignedTrainer, AlignedTrainingArguments

    os.makedirs(output_dir, exist_ok=True)
    data = load_digits_dataset()
    train, test = data["train"], data["test"]
    print(f"digits: {len(train)} train / {len(test)} test images (scikit-learn's handwritten digits)")

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

    # 3. early exit ------------------------------------------------------------------------------------
    half = len(test) // 2
    val, held = test.select(range(half)), test.select(range(half, len(test)))
    early = EarlyExitModel(model, policy="confidence")
    curve = calibrate(early, val, tolerance=0.01, batch_size=256, progress=False)
    curve.plot(os.path.join(output_dir, "exit_curve.png"))
    batch = held[:]
    with torch.no_grad():
        out = early(pixel_values=batch["pixel_values"])
        full = model(pixel_values=batch["pixel_values"]).logits
    exit_acc = (out.logits.argmax(-1) == batch["labels"]).double().mean().item()
    full_acc = (full.argmax(-1) == batch["labels"]).double().mean().item()
    mean_exit = out.exit_layers.double().mean().item()
    print(f"\nearly exit (confidence >= {curve.chosen}, calibrated on {half} images for <= 1 point loss):")
    print(f"  held-out accuracy {100 * exit_acc:.1f}% vs {100 * full_acc:.1f}% at full depth, running "
          f"{mean_exit:.2f} of {L} blocks on average ({100 * (1 - mean_exit / L):.0f}% of the blocks skipped)")
    clf = pipeline("early-exit-classification", model=early, image_processor=digits_image_processor())
    pipe_dir = os.path.join(output_dir, "early-exit-pipeline")
    clf.save_pretrained(pipe_dir)
    print(f"  pipeline saved to {pipe_dir}; three held-out digits through it:")
    for i in range(3):
        result = clf(digit_image(held[i]["pixel_values"]))[0]
        print(f"    true {int(held[i]['labels'])}: {result}")
    return {"layer_accuracy": accuracy, "metrics": metrics, "cka": cka.matrix, "cosine": cos.matrix,
            "rank_correlation": rho, "exit_threshold": curve.chosen, "exit_accuracy": exit_acc,
            "full_accuracy": full_acc, "mean_exit_layer": mean_exit}
