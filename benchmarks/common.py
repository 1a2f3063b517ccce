"""Shared set-up of the benchmarks: the two real-data tasks and their standard / aligned / multi-exit models.

* digits: scikit-learn's 8x8 handwritten digits (1,797 real scans, 10 classes); a 6-block ViT from scratch.
* scipy-docs: paragraphs of SciPy's own documentation labelled by subpackage (8 classes; see
  ``hf_align.data.load_scipy_docs_dataset``); a 6-block post-norm BERT from scratch with a WordPiece
  tokenizer trained on the training split.

Trained models are cached under ``benchmarks/.cache/`` (not committed) so the early-exit benchmark can reuse
the aligned-training benchmark's models.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch

CACHE = os.path.join(os.path.dirname(__file__), ".cache")
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def machine_info() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip(),
    }


def digits_task():
    from hf_align.data import load_digits_dataset

    data = load_digits_dataset()
    return {"name": "digits-vit", "train": data["train"], "test": data["test"], "processing_class": None,
            "collator": None}


def scipy_docs_task(max_length: int = 64):
    from transformers import DataCollatorWithPadding

    from hf_align.data import load_scipy_docs_dataset, train_wordpiece_tokenizer

    data = load_scipy_docs_dataset()
    tokenizer = train_wordpiece_tokenizer(list(data["train"]["text"]), vocab_size=4000, model_max_length=max_length)

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    columns = ["text", "object"]
    train = data["train"].map(encode, batched=True, remove_columns=columns)
    test = data["test"].map(encode, batched=True, remove_columns=columns)
    return {"name": "scipy-docs-bert", "train": train, "test": test, "processing_class": tokenizer,
            "collator": DataCollatorWithPadding(tokenizer), "raw_test": data["test"],
            "label_names": data["train"].features["labels"].names}


def with_model_tokenizer(task: dict, recipe: str, seed: int = 0) -> dict:
    """The task's test split re-encoded with the tokenizer saved beside a cached model.

    WordPiece training is not deterministic (ties between merges), so a tokenizer trained afresh need not
    have the vocabulary a cached model was trained with; evaluation must use the model's own.
    """
    if task["processing_class"] is None:
        return task
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(CACHE, f"{task['name']}-{recipe}-seed{seed}"))

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=tokenizer.model_max_length)

    test = task["raw_test"].map(encode, batched=True, remove_columns=["text", "object"])
    return {**task, "test": test, "processing_class": tokenizer, "collator": DataCollatorWithPadding(tokenizer)}


def build_model(task: dict, seed: int = 0, multi_exit: bool = False):
    """The task's model, from a config (random init, seeded). ``multi_exit``: the separate-heads baseline."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_align.cli.demo import digits_vit

    torch.manual_seed(seed)
    if task["name"] == "digits-vit":
        model = digits_vit(num_layers=6, hidden_size=64, seed=seed)
    else:
        tok = task["processing_class"]
        names = task["label_names"]
        config = BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                            num_labels=len(names), id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})
        model = BertForSequenceClassification(config)
    if multi_exit:
        from hf_align.modeling import add_exit_heads

        model = add_exit_heads(model)
    return model


RECIPES = {
    # name: (layer_weights, separate exit heads)
    "standard": ("last", False),
    "aligned": ("linear", False),
    "multi-exit": ("linear", True),
}

TRAIN = {
    "digits-vit": dict(max_steps=800, per_device_train_batch_size=64, learning_rate=2e-3, warmup_steps=60,
                       weight_decay=0.05),
    "scipy-docs-bert": dict(max_steps=800, per_device_train_batch_size=32, learning_rate=1e-3, warmup_steps=80,
                            weight_decay=0.01),
}


def train_model(task: dict, recipe: str, seed: int = 0, force: bool = False, log=print):
    """Train (or load from the cache) the task's model with a recipe; returns (model, eval metrics, seconds)."""
    from transformers import AutoConfig

    from hf_align import AlignedTrainer, AlignedTrainingArguments
    from hf_align.hub import load_local_model

    out = os.path.join(CACHE, f"{task['name']}-{recipe}-seed{seed}")
    meta_path = os.path.join(out, "hf_align_benchmark.json")
    if os.path.exists(meta_path) and not force:
        with open(meta_path) as f:
            meta = json.load(f)
        if recipe == "multi-exit":
            from hf_align.modeling import load_multi_exit

            model = load_multi_exit(out)
        else:
            model = load_local_model(out, AutoConfig.from_pretrained(out))
        return model.eval(), meta["metrics"], meta["train_seconds"]
    layer_weights, multi_exit = RECIPES[recipe]
    model = build_model(task, seed=seed, multi_exit=multi_exit)
    args = AlignedTrainingArguments(
        output_dir=out, layer_weights=layer_weights, seed=seed, report_to=[], save_strategy="no",
        lr_scheduler_type="cosine", logging_steps=250, per_device_eval_batch_size=256, disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, **TRAIN[task["name"]],
    )
    trainer = AlignedTrainer(model=model, args=args, train_dataset=task["train"], eval_dataset=task["test"],
                             data_collator=task["collator"], processing_class=task["processing_class"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    trainer.save_model(out)
    with open(meta_path, "w") as f:
        json.dump({"metrics": metrics, "train_seconds": seconds, "recipe": recipe, "seed": seed}, f, indent=1)
    log(f"trained {task['name']} {recipe} seed {seed} in {seconds:.0f}s: last-layer acc "
        f"{metrics['eval_layer_6_accuracy']:.4f}")
    return model.eval(), metrics, seconds


def layer_accuracies(metrics: dict, num_layers: int = 6) -> list[float]:
    return [metrics[f"eval_layer_{l}_accuracy"] for l in range(1, num_layers + 1)]


def plot_panels(panels: dict, path: str, xlabel: str, ylabel: str = "accuracy (%)", marker: str = "o"):
    """One subplot per task: ``panels = {title: {label: (xs, ys)}}``, saved as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.5), dpi=120, squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker=marker, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
