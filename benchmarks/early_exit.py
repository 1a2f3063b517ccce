"""Benchmark: early exit through the shared head vs full depth, for aligned, standard and multi-exit models.

    python benchmarks/early_exit.py [--repeats 3] [--bs1-samples 200]

Uses the models of benchmarks/aligned_training.py (cached in benchmarks/.cache; trained if missing) and a
separately trained multi-exit baseline (one classifier per block, PABEE-style, same recipe). The held-out
test split is halved: the confidence threshold is calibrated on the first half (the smallest mean exit depth
whose accuracy stays within 1 point of full depth), and everything reported is measured on the second half.
Speed-up = wall-clock of the plain model at full depth / wall-clock of EarlyExitModel, same inputs, same
batch size, interleaved repeats, median. Writes benchmarks/results/early_exit.md and early_exit.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    RESULTS,
    digits_task,
    machine_info,
    plot_panels,
    scipy_docs_task,
    train_model,
    with_model_tokenizer,
)


def batches(task, data, batch_size):
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    collate = task["collator"] or default_data_collator
    out = []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate):
        batch = dict(batch)
        labels = batch.pop("labels")
        out.append((batch, labels))
    return out


@torch.no_grad()
def timed(fn, items, repeats):
    """Median over repeats of the total wall-clock of fn over items, and the last outputs."""
    times, outputs = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [fn(batch) for batch, _ in items]
        times.append(time.perf_counter() - start)
    return statistics.median(times), outputs


def evaluate_recipe(task, recipe, repeats, bs1_samples, log):
    from hf_align import EarlyExitModel, calibrate

    model, metrics, _ = train_model(task, recipe, seed=0, log=log)
    task = with_model_tokenizer(task, recipe)
    model.eval()
    test = task["test"]
    half = len(test) // 2
    val, rep = test.select(range(half)), test.select(range(half, len(test)))
    ee = EarlyExitModel(model, policy="confidence", threshold=0.9)
    curve = calibrate(ee, val, tolerance=0.01, batch_size=128, collate_fn=task["collator"], progress=False)
    plain = ee.view.hf_model if recipe == "multi-exit" else model
    row = {"recipe": recipe, "threshold": curve.chosen, "curve": curve}
    for bs, n in [(1, bs1_samples), (32, len(rep))]:
        items = batches(task, rep.select(range(min(n, len(rep)))), bs)
        labels = torch.cat([lab for _, lab in items])
        # interleave: full, exit, full, exit ... so load changes hit both alike
        full_times, exit_times = [], []
        for _ in range(repeats):
            t_full, full_out = timed(lambda b: plain(**b).logits, items, 1)
            t_exit, exit_out = timed(lambda b: ee(**b), items, 1)
            full_times.append(t_full)
            exit_times.append(t_exit)
        full_acc = (torch.cat(full_out).argmax(-1) == labels).double().mean().item()
        flops = {}
        for name, fn in [("full", lambda b: plain(**b).logits), ("exit", lambda b: ee(**b))]:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                for b, _ in items:
                    fn(b)
            flops[name] = counter.get_total_flops() / len(labels)
        exit_logits = torch.cat([o.logits for o in exit_out])
        exit_layers = torch.cat([o.exit_layers for o in exit_out]).double()
        row[bs] = {
            "n": len(labels),
            "full_acc": full_acc,
            "exit_acc": (exit_logits.argmax(-1) == labels).double().mean().item(),
            "mean_exit": exit_layers.mean().item(),
            "full_ms": 1e3 * statistics.median(full_times) / len(labels),
            "exit_ms": 1e3 * statistics.median(exit_times) / len(labels),
            "speedup": statistics.median(f / e for f, e in zip(full_times, exit_times)),
            "full_mflops": flops["full"] / 1e6,
            "exit_mflops": flops["exit"] / 1e6,
        }
    return row


def pipeline_overhead(task, repeats, samples=100):
    """Wall-clock of pipeline(...) over calling the wrapper on the same already-prepared inputs, batch size 1."""
    from transformers import pipeline

    from hf_align import EarlyExitModel

    model, _, _ = train_model(task, "aligned", seed=0)
    task = with_model_tokenizer(task, "aligned")
    ee = EarlyExitModel(model.eval(), policy="confidence", threshold=0.9)
    if task["name"] == "digits-vit":
        import numpy as np
        from PIL import Image
        from transformers import ViTImageProcessor

        processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5], do_resize=False)
        raw = [Image.fromarray(np.uint8(((x[0].numpy() + 1) / 2 * 255).round()), mode="L") for x in task["test"][:samples]["pixel_values"]]
        clf = pipeline("early-exit-classification", model=ee, image_processor=processor)

        def direct(x):
            return ee(**processor(images=x, return_tensors="pt"))
    else:
        raw = list(task["raw_test"][:samples]["text"])
        tok = task["processing_class"]
        clf = pipeline("early-exit-classification", model=ee, tokenizer=tok)

        def direct(x):
            return ee(**tok(x, return_tensors="pt", truncation=True))
    ratios = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for x in raw:
                direct(x)
            t_direct = time.perf_counter() - start
            start = time.perf_counter()
            for x in raw:
                clf(x)
            ratios.append((time.perf_counter() - start) / t_direct)
    return statistics.median(ratios), ratios


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bs1-samples", type=int, default=200)
    args = parser.parse_args()
    command = "python benchmarks/early_exit.py " + " ".join(sys.argv[1:])
    lines = ["# Early exit vs full depth (benchmarks/early_exit.py)", "", f"Command: `{command}`  ",
             f"Machine: `{machine_info()}`", "",
             "Confidence policy; threshold calibrated on the first half of the test split (lowest mean exit block within "
             "1 point of full depth), all numbers below on the second half. Full depth = the plain transformers model's "
             f"forward. Speed-up = median over {args.repeats} interleaved repeats of (full-depth time / early-exit time). "
             "Targets: >= 2x at <= 1 point loss for batch size 1, >= 1.5x for batch size 32. FLOPs are counted by "
             "torch.utils.flop_counter over the same inputs (heads included); the survey's other cost axes, layers run "
             "and latency, are the mean-exit and ms columns.", ""]
    rows_by_task = {}
    for task in (digits_task(), scipy_docs_task()):
        rows = [evaluate_recipe(task, recipe, args.repeats, args.bs1_samples, print)
                for recipe in ("aligned", "standard", "multi-exit")]
        rows_by_task[task["name"]] = rows
        lines += [f"## {task['name']}", "",
                  "| model | threshold | batch | full acc | exit acc | loss (pts) | mean exit block / 6 | MFLOPs/sample full -> exit | full ms/sample | exit ms/sample | speed-up |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in rows:
            for bs in (1, 32):
                r = row[bs]
                lines.append(f"| {row['recipe']} | {row['threshold']} | {bs} | {100 * r['full_acc']:.2f} | {100 * r['exit_acc']:.2f} | "
                             f"{100 * (r['full_acc'] - r['exit_acc']):+.2f} | {r['mean_exit']:.2f} | {r['full_mflops']:.2f} -> {r['exit_mflops']:.2f} | "
                             f"{r['full_ms']:.3f} | "
                             f"{r['exit_ms']:.3f} | **{r['speedup']:.2f}x** |")
        lines.append("")
        for row in rows:
            lines += [f"<details><summary>{row['recipe']}: calibration curve (validation half)</summary>", "",
                      row["curve"].to_markdown(), "", "</details>", ""]
    panels = {f"{name}: confidence exit (validation half)":
              {row["recipe"]: (row["curve"].mean_exit_layer, [100 * a for a in row["curve"].accuracy]) for row in rows}
              for name, rows in rows_by_task.items()}
    plot_panels(panels, os.path.join(RESULTS, "early_exit.png"), xlabel="mean exit block", marker=".")
    lines += ["![accuracy vs mean exit block](early_exit.png)", "", "## Pipeline overhead", "",
              "`pipeline(\"early-exit-classification\")` per input vs preprocessing + `EarlyExitModel` called directly, "
              "batch size 1, 100 inputs, median of repeats. Target <= 1.10x.", "",
              "| task | ratio (median) | repeats |", "| --- | ---: | --- |"]
    for task in (digits_task(), scipy_docs_task()):
        med, ratios = pipeline_overhead(task, args.repeats + 2)
        lines.append(f"| {task['name']} | **{med:.3f}x** | {', '.join(f'{r:.3f}' for r in ratios)} |")
    with open(os.path.join(RESULTS, "early_exit.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
