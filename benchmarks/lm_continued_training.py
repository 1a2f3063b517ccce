"""Benchmark: continued aligned training of a *pretrained* decoder LM (LayerSkip's situation, not from scratch).

    python benchmarks/lm_continued_training.py --runs llama-pretrained,llama-standard,...   # train runs (cached)
    python benchmarks/lm_continued_training.py --report-only                                 # rebuild the report

Setup. Data: the Python 3.11 documentation's reST sources as Debian ships them (package ``python3.11-doc``,
``/usr/share/doc/python3.11/html/_sources``; PSF License), 497 documents, 5% held out by document; a byte-level
BPE tokenizer (4,096 tokens) trained on the training documents; blocks of 64 tokens; 256 held-out blocks for
evaluation. (The stdlib's ``pydoc_data`` topics, which the tests use, are too small here: 2,000 steps of
pre-training would be 10 epochs of them.) For each family (Llama, GPT-2; 6 blocks, hidden 128):

* ``<family>-pretrained``: standard training (``layer_weights="last"``) from random init, ``PRETRAIN_STEPS`` steps:
  the "pretrained checkpoint" users start from;
* continued from it for ``CONTINUE_STEPS`` steps (25% of pre-training), same data order and optimiser settings:
  (a) ``-standard``; (b) each aligned recipe variant (``-aligned`` linear weights, ``-gradual`` curriculum,
  ``-kl`` self-distillation of the early exits toward the last layer, ``-dropout`` layer dropout that skips
  compute); (c) ``-lora`` aligned with a LoRA adapter (PEFT), merged into the weights after training;
* ``<family>-scratch``: aligned (gradual) from random init for ``PRETRAIN_STEPS + CONTINUE_STEPS`` steps, the
  same total budget.

Each run is saved (safetensors) under ``benchmarks/.cache/lm_continued/<run>/`` with its metrics; runs already
there are not retrained. The report (``lm_continued_training.md`` / ``.png`` / ``.json``) gives, per run, the
held-out perplexity after every block (through the model's own final norm + LM head), the teacher-forced draft
acceptance per exit block (greedy: the exit's argmax equals the last block's; sampling: ``sum_v min(p_l, p_L)``,
the expected acceptance of one drafted token at T=1), and the measured speculative speed-up of
``generate(custom_generate=hf_align.self_speculative)`` over plain ``generate`` (greedy and sampling) per exit block.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import CACHE, RESULTS  # noqa: E402

CACHE_DIR = os.path.join(CACHE, "lm_continued")
BLOCK_SIZE = 64
VOCAB = 4096
LAYERS, HIDDEN = 6, 128
PRETRAIN_STEPS = 2000
CONTINUE_STEPS = 500  # 25% of pre-training
BATCH = 8
PRETRAIN = dict(per_device_train_batch_size=BATCH, learning_rate=2e-3, warmup_steps=40, weight_decay=0.1,
                lr_scheduler_type="cosine", adam_beta2=0.98, max_grad_norm=1.0)
# continued training: a smaller peak learning rate, short warm-up, cosine to 0 (a common fine-tuning schedule), on
# another draw of the training blocks (pre-training sees 36% of them)
CONTINUE = dict(PRETRAIN, learning_rate=5e-4, warmup_steps=25, data_seed=1)  # data_seed: a new draw of the text

# run suffix -> (layer_weights, AlignedTrainingArguments options, start) ; start: "pretrained" or "scratch"
VARIANTS = {
    "pretrained": ("last", {}, "scratch"),
    "standard": ("last", {}, "pretrained"),
    "aligned": ("linear", {}, "pretrained"),
    "gradual": ("linear", {"early_exit_curriculum": "gradual"}, "pretrained"),
    "kl": ("linear", {"layer_distillation": 1.0}, "pretrained"),
    "dropout": ("linear", {"layer_dropout": 0.2}, "pretrained"),
    "lora": ("linear", {"learning_rate": 2e-3}, "pretrained"),
    "scratch": ("linear", {"early_exit_curriculum": "gradual"}, "scratch"),
}
FAMILIES = ("llama", "gpt2")
RUNS = [f"{family}-{variant}" for family in FAMILIES for variant in VARIANTS]


TEXT_ROOTS = ("/usr/share/doc/python3.11/html/_sources", "/work/debtext/root/usr/share/doc/python3.11/html/_sources")
EVAL_BLOCKS = 256


def load_texts(root: str | None = None, test_fraction: float = 0.05, seed: int = 0) -> dict[str, list[str]]:
    """The Python 3.11 documentation's reST sources (Debian's ``python3.11-doc``: ``_sources/**/*.rst.txt``, 497
    files, 12 MB of English prose and examples; Python Software Foundation License). One document per file; a
    seeded ``test_fraction`` of the files is held out (whole documents: no test text is seen in training)."""
    import glob

    import numpy as np

    root = root or next((r for r in TEXT_ROOTS if os.path.isdir(r)), None)
    if root is None:
        raise SystemExit("the text is Debian's python3.11-doc: `apt-get install python3.11-doc`, or `apt-get download "
                         "python3.11-doc && dpkg -x python3.11-doc_*.deb /work/debtext/root`, or pass --text-root")
    files = sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True))
    rng = np.random.default_rng(seed)
    test = set(rng.choice(len(files), size=max(1, round(test_fraction * len(files))), replace=False).tolist())
    texts = {"train": [], "test": []}
    for i, path in enumerate(files):
        with open(path, encoding="utf-8") as f:
            texts["test" if i in test else "train"].append("\n".join(line.rstrip() for line in f.read().strip().split("\n")))
    return texts


def data(root: str | None = None):
    from hf_align.data import lm_blocks, train_bpe_tokenizer

    texts = load_texts(root)
    tokenizer = train_bpe_tokenizer(texts["train"], vocab_size=VOCAB, model_max_length=BLOCK_SIZE)
    test = lm_blocks(texts["test"], tokenizer, BLOCK_SIZE)
    test = test.select(range(0, len(test), max(1, len(test) // EVAL_BLOCKS))[:EVAL_BLOCKS])  # spread over the test docs
    return tokenizer, texts, lm_blocks(texts["train"], tokenizer, BLOCK_SIZE), test


def fresh_model(family: str, tokenizer, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4 * BLOCK_SIZE,
            tie_word_embeddings=False, **special))
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                                      n_positions=4 * BLOCK_SIZE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      **special))


def run_dir(name: str) -> str:
    return os.path.join(CACHE_DIR, name)


def train_run(name: str, tokenizer, train, test, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM

    from hf_align import AlignedTrainer, AlignedTrainingArguments

    family, variant = name.split("-", 1)
    weights, options, start = VARIANTS[variant]
    options = dict(options)
    schedule = dict(PRETRAIN if start == "scratch" else CONTINUE)
    schedule.update({k: options.pop(k) for k in list(options) if k in schedule})
    steps = {"pretrained": PRETRAIN_STEPS, "scratch": PRETRAIN_STEPS + CONTINUE_STEPS}.get(variant, CONTINUE_STEPS)
    if start == "scratch":
        model = fresh_model(family, tokenizer, seed)
    else:
        base = run_dir(f"{family}-pretrained")
        if not os.path.exists(os.path.join(base, "hf_align_benchmark.json")):
            raise SystemExit(f"{name} continues {family}-pretrained, which is not trained yet")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if family == "llama" \
            else ["c_attn", "c_proj", "c_fc"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    out = run_dir(name)
    args = AlignedTrainingArguments(
        output_dir=out, layer_weights=weights, seed=seed, report_to=[], save_strategy="no", logging_steps=50,
        per_device_eval_batch_size=32, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        max_steps=steps, **schedule, **options)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    begin = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - begin
    if variant == "lora":
        model = trainer.model.merge_and_unload()  # the adapter merged: a plain model, evaluated as such
        trainer = AlignedTrainer(model=model, args=args, eval_dataset=test, processing_class=tokenizer)
    metrics = trainer.evaluate()
    trainer.save_model(out)
    meta = {"run": name, "family": family, "variant": variant, "start": start, "layer_weights": weights,
            "options": VARIANTS[variant][1], "steps": steps, "schedule": schedule, "metrics": metrics,
            "train_seconds": seconds, "seed": seed, "params": sum(p.numel() for p in model.parameters())}
    with open(os.path.join(out, "hf_align_benchmark.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {steps} steps in {seconds:.0f}s, final-layer perplexity {metrics['eval_perplexity']:.3f}", flush=True)
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="", help=f"comma-separated runs to train (of {RUNS})")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--text-root", default=None, help=f"folder of the documentation sources (default: {TEXT_ROOTS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {RUNS}")
    tokenizer, texts, train, test = data(args.text_root)
    if not args.report_only:
        for name in names:
            if os.path.exists(os.path.join(run_dir(name), "hf_align_benchmark.json")) and not args.force:
                print(f"{name}: cached")
                continue
            train_run(name, tokenizer, train, test)


if __name__ == "__main__":
    main()
