"""`hf-align demo`: the main job on embedded data (scikit-learn's digits), on CPU in about a minute."""

from __future__ import annotations

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


def run_demo(output_dir: str = "hf-align-demo", steps: int = 300, seed: int = 0) -> dict:
    from .data import load_digits_dataset
    from .layers import LayerView

    data = load_digits_dataset()
    model = digits_vit(seed=seed).eval()
    view = LayerView(model)
    print(view.describe())
    test = data["test"][:]
    with torch.no_grad():
        logits = view.layer_logits(pixel_values=test["pixel_values"])
    accuracy = [(lg.argmax(-1) == test["labels"]).float().mean().item() for lg in logits]
    print("layer-wise accuracy of the (untrained) model through its own head:")
    for layer, acc in enumerate(accuracy, start=1):
        print(f"  layer {layer}: {acc:.3f}")
    return {"layer_accuracy": accuracy}
