"""Train the decoder that the self-speculative decoding benchmark runs on: an 8-block, hidden-256 Llama (blocks that
cost more than its LM head), pre-trained with the standard loss and continued with the aligned loss.

    python benchmarks/lm_decoding_model.py [--pretrain-steps 1600] [--continue-steps 400] [--threads 2]
    python benchmarks/lm_decoding_model.py --recipe scratch [--scratch-steps 2400]     # llama8x256-scratch
    python benchmarks/speculative_batched.py --model-dir benchmarks/.cache/lm_decoding/llama8x256-aligned \
        --texts debian-docs --name llama8x256-aligned

Text: Debian's python3.11-doc reST sources, the held-out documents of ``lm_continued_training.py`` kept out (the
same split); byte-level BPE with 4,096 tokens; blocks of 128 tokens, batches of 8. Pre-training: standard, AdamW
peak lr 2e-3, cosine. Continuation: 25% of that, aligned (``layer_weights="linear"``), peak lr 5e-4, on another
draw of the text. ``--recipe scratch``: the aligned loss (linear weights, gradual curriculum) from random
initialisation, peak lr 2e-3, cosine (the recipe ``lm_continued_training.py`` found best on every block). Saved (safetensors + tokenizer) under ``benchmarks/.cache/lm_decoding/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import lm_continued_training as text_setup  # noqa: E402
from common import CACHE  # noqa: E402

ROOT = os.path.join(CACHE, "lm_decoding")
BLOCK = 128


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=1600)
    parser.add_argument("--continue-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", choices=["continued", "scratch"], default="continued")
    parser.add_argument("--scratch-steps", type=int, default=2400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_align import AlignedTrainer, AlignedTrainingArguments
    from hf_align.data import lm_blocks, train_bpe_tokenizer

    texts = text_setup.load_texts()
    tokenizer = train_bpe_tokenizer(texts["train"], vocab_size=4096, model_max_length=4 * BLOCK)
    train = lm_blocks(texts["train"], tokenizer, BLOCK)
    test = lm_blocks(texts["test"], tokenizer, BLOCK)
    test = test.select(range(0, len(test), max(1, len(test) // 128))[:128])
    stages = [("llama8x256-pretrained", "last", args.pretrain_steps, dict(learning_rate=2e-3, warmup_steps=40)),
              ("llama8x256-aligned", "linear", args.continue_steps, dict(learning_rate=5e-4, warmup_steps=25, data_seed=1))]
    if args.recipe == "scratch":
        stages = [("llama8x256-scratch", "linear", args.scratch_steps,
                   dict(learning_rate=2e-3, warmup_steps=40, early_exit_curriculum="gradual"))]
    for name, weights, steps, schedule in stages:
        out = os.path.join(ROOT, name)
        if os.path.exists(os.path.join(out, "hf_align_benchmark.json")):
            print(f"{name}: cached")
            continue
        if weights == "last" or args.recipe == "scratch":
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4 * BLOCK, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        else:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, stages[0][0]), dtype=torch.float32)
        targs = AlignedTrainingArguments(
            output_dir=out, layer_weights=weights, max_steps=steps, per_device_train_batch_size=8, weight_decay=0.1,
            lr_scheduler_type="cosine", adam_beta2=0.98, max_grad_norm=1.0, seed=0, report_to=[], save_strategy="no",
            logging_steps=50, per_device_eval_batch_size=16, use_cpu=True, disable_tqdm=True, **schedule)
        trainer = AlignedTrainer(model=model, args=targs, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
        begin = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - begin
        metrics = trainer.evaluate()
        trainer.save_model(out)
        with open(os.path.join(out, "hf_align_benchmark.json"), "w") as f:
            json.dump({"run": name, "steps": steps, "schedule": schedule, "metrics": metrics, "train_seconds": seconds},
                      f, indent=1)
        print(f"{name}: {steps} steps in {seconds:.0f}s, perplexity after every block: "
              + ", ".join(f"{metrics[f'eval_layer_{l}_perplexity']:.1f}" for l in range(1, 9)), flush=True)


if __name__ == "__main__":
    main()
