"""Benchmark: the training-step time that layer dropout saves (batch-dimension skipping: dropped rows skip the block).

    python benchmarks/layer_dropout_step.py [--family llama] [--batch 8] [--block 64] [--rounds 9] [--steps 8]

One aligned-loss step (forward + the per-layer losses through the shared head + backward) of a 6-block, hidden-128
decoder (the size of benchmarks/lm_continued_training.py) on real text blocks, for: no layer dropout; layer
dropout with the skipped rows' compute saved (``skip_compute=True``, the trainer's default); the same draws with
every row still run through the block (``skip_compute=False``: the outputs of dropped rows replaced afterwards,
what the trainer did before). The variants are interleaved in every round, with the same batches and the same
dropout draws; the report gives the median step time per variant over the rounds, its spread (min-max of the
round medians) and the ratios to no dropout. The expected saving is the share of block compute dropped,
``mean_l p_l``, times the blocks' share of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine_info  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8, help="steps per variant per round (their mean is one sample)")
    parser.add_argument("--settings", default="exp:0.2,uniform:0.5", help="scale:p_max pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lm_continued_training as setup

    from hf_align import AlignedTrainer, AlignedTrainingArguments
    from hf_align.data import lm_blocks, load_python_docs_texts, train_bpe_tokenizer
    from hf_align.trainers.curricula import layer_dropout_mask, layer_dropout_probs, skipping_blocks

    texts = load_python_docs_texts()
    tokenizer = train_bpe_tokenizer(texts["train"], vocab_size=4096, model_max_length=args.block)
    blocks = lm_blocks(texts["train"], tokenizer, args.block).with_format("torch")
    model = setup.fresh_model(args.family, tokenizer).train()
    trainer = AlignedTrainer(model=model, args=AlignedTrainingArguments(
        output_dir="/tmp/layer_dropout_step", report_to=[], use_cpu=True, layer_weights="linear"))
    L = trainer.num_layers
    batches = [dict(blocks[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps)]
    settings = [(s.split(":")[0], float(s.split(":")[1])) for s in args.settings.split(",")]
    generator = torch.Generator().manual_seed(0)
    results = {}
    for scale, p_max in settings:
        probs = layer_dropout_probs(p_max, L, scale)
        masks = [layer_dropout_mask(probs, args.batch, generator) for _ in batches]
        variants = {"no dropout": None, "skip compute": True, "run every row": False}
        samples = {name: [] for name in variants}

        def step(batch, mask, skip_compute):
            trainer.args.layer_dropout = 0.0  # the skipping is applied here, with the fixed draws
            context = skipping_blocks(trainer.layer_view.blocks, mask, skip_compute=skip_compute) \
                if skip_compute is not None else contextlib.nullcontext()
            with context:
                loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
            model.zero_grad(set_to_none=True)

        for batch, mask in zip(batches[:2], masks[:2]):  # warm-up
            for skip in variants.values():
                step(batch, mask, skip)
        for _ in range(args.rounds):
            for name, skip in variants.items():
                begin = time.perf_counter()
                for batch, mask in zip(batches, masks):
                    step(batch, mask, skip)
                samples[name].append((time.perf_counter() - begin) / len(batches))
        dropped = float(torch.stack(masks).double().mean())  # share of (block, row) pairs dropped
        base = statistics.median(samples["no dropout"])
        results[f"{scale}:{p_max:g}"] = {
            "probs": probs, "dropped_share": dropped,
            "median_s": {n: statistics.median(v) for n, v in samples.items()},
            "spread_s": {n: [min(v), max(v)] for n, v in samples.items()},
            "ratio_to_no_dropout": {n: statistics.median(v) / base for n, v in samples.items()},
        }
        print(f"{scale}:{p_max:g}: dropped {100 * dropped:.1f}% of block rows; " + ", ".join(
            f"{n} {1000 * statistics.median(v):.1f} ms ({statistics.median(v) / base:.3f}x)" for n, v in samples.items()),
            flush=True)
    command = "python benchmarks/layer_dropout_step.py " + " ".join(sys.argv[1:])
    lines = ["# Layer dropout: the step time saved by skipping dropped rows", "",
             f"Command: `{command}`. One aligned-loss training step (forward, per-layer losses through the shared LM "
             f"head, backward) of a {L}-block hidden-128 {args.family} on batches of {args.batch} x {args.block} tokens of "
             f"real text (CPython's `pydoc_data`), {args.rounds} interleaved rounds of {args.steps} steps per variant; "
             "same batches and dropout draws in every variant. Median step time over the rounds [min-max of the rounds].",
             "", "| layer dropout | dropped block rows | variant | step ms | ratio to no dropout |",
             "|---|---:|---|---:|---:|"]
    for key, r in results.items():
        for name in r["median_s"]:
            lo, hi = r["spread_s"][name]
            lines.append(f"| {key} | {100 * r['dropped_share']:.1f}% | {name} | {1000 * r['median_s'][name]:.1f} "
                         f"[{1000 * lo:.1f}-{1000 * hi:.1f}] | {r['ratio_to_no_dropout'][name]:.3f} |")
    lines += ["", "`skip compute` is what `AlignedTrainer` does (a dropped row never enters the block); `run every row` "
              "computes the same values with the dropped rows still run through the block and replaced afterwards. "
              "The saving is bounded by the dropped share of the blocks' work: the embedding, the per-layer LM-head "
              "losses and the optimizer are not skipped.", "", "Machine: " + json.dumps(machine_info()), ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "layer_dropout_step.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, "layer_dropout_step.json"), "w") as f:
        json.dump({"command": command, "results": results, "machine": machine_info()}, f, indent=1)


if __name__ == "__main__":
    main()
