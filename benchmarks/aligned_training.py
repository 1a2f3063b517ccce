"""Benchmark: standard vs aligned training on two real-data tasks, and the training-step cost of aligned loss.

    python benchmarks/aligned_training.py [--seeds 0] [--force] [--skip-train] [--skip-timing]

Writes benchmarks/results/aligned_training.md (tables, checks, the command) and aligned_training.png.
Same model, data, steps, optimizer and seed for both recipes; only ``layer_weights`` differs
("last" = standard training, "linear" = the paper's aligned loss).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    RESULTS,
    digits_task,
    layer_accuracies,
    machine_info,
    plot_panels,
    scipy_docs_task,
    train_model,
)


def step_time_ratio(task, rounds: int = 25, steps: int = 10, batch_size: int = 32) -> dict:
    """Median over interleaved rounds of (aligned step time / standard step time), same batch and model shape."""
    from common import build_model

    from hf_align import AlignedTrainer, AlignedTrainingArguments

    batch = task["collator"]([task["train"][i] for i in range(batch_size)]) if task["collator"] else task["train"][:batch_size]
    batch = dict(batch)
    setups = {}
    for recipe, weights in [("standard", "last"), ("aligned", "linear")]:
        model = build_model(task, seed=0).train()
        args = AlignedTrainingArguments(output_dir=f"/tmp/hf-align-steptime-{recipe}", layer_weights=weights,
                                        report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = AlignedTrainer(model=model, args=args, train_dataset=task["train"], data_collator=task["collator"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[recipe] = (trainer, model, optimizer)

    def run(recipe):
        # CPU time of this (single-threaded) process: the compute a step costs, not what other jobs on the
        # shared machine take from it (wall-clock is reported beside it)
        trainer, model, optimizer = setups[recipe]
        start, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.process_time() - start) / steps, (time.perf_counter() - wall) / steps

    run("standard"), run("aligned")  # warm-up
    times = {"standard": [], "aligned": []}
    ratios, wall_ratios = [], []
    for r in range(rounds):
        order = ["standard", "aligned"] if r % 2 == 0 else ["aligned", "standard"]
        got = {recipe: run(recipe) for recipe in order}
        for recipe, (cpu, _) in got.items():
            times[recipe].append(cpu)
        ratios.append(got["aligned"][0] / got["standard"][0])
        wall_ratios.append(got["aligned"][1] / got["standard"][1])
    return {"standard_ms": 1e3 * statistics.median(times["standard"]), "aligned_ms": 1e3 * statistics.median(times["aligned"]),
            "ratio_median": statistics.median(ratios), "ratios": ratios, "wall_ratio_median": statistics.median(wall_ratios),
            "batch_size": batch_size, "steps": steps}


def gap_closure(std: list[float], ali: list[float]) -> dict:
    """At half depth h = L/2: the gap standard training leaves, gap = std[L] - std[h], and the share of it
    that aligned training closes, (ali[h] - std[h]) / gap."""
    L = len(std)
    h = L // 2
    gap = std[-1] - std[h - 1]
    return {"half_depth": h, "std_gap": gap, "closed": (ali[h - 1] - std[h - 1]) / gap if gap > 0 else float("inf")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    command = "python benchmarks/aligned_training.py " + " ".join(sys.argv[1:])
    tasks = [digits_task(), scipy_docs_task()]
    lines = ["# Aligned vs standard training (benchmarks/aligned_training.py)", "",
             f"Command: `{command}`  ", f"Machine: `{machine_info()}`", "",
             "Same architecture, data, optimizer, schedule, steps and seed; only `layer_weights` differs "
             "(`last` = standard training, `linear` = the paper's 2l/(L(L+1))). Accuracy of every block through the "
             "model's own (shared) head on the held-out test split.", ""]
    curves = {}
    for task in tasks:
        per_recipe = {}
        for recipe in ("standard", "aligned"):
            runs = [layer_accuracies(train_model(task, recipe, seed=s, force=args.force)[1]) for s in args.seeds]
            per_recipe[recipe] = [statistics.mean(col) for col in zip(*runs)]
        std, ali = per_recipe["standard"], per_recipe["aligned"]
        curves[task["name"]] = per_recipe
        closure = gap_closure(std, ali)
        monotone = all(b >= a for a, b in zip(ali, ali[1:]))
        largest_dip = max([100 * (a - b) for a, b in zip(ali, ali[1:])] + [0.0])
        last_drop = 100 * (std[-1] - ali[-1])
        lines += [f"## {task['name']}", "",
                  f"train {len(task['train'])} / test {len(task['test'])} samples; seeds {args.seeds} (mean)", "",
                  "| block | " + " | ".join(str(l) for l in range(1, len(std) + 1)) + " |",
                  "| --- | " + " | ".join("---:" for _ in std) + " |",
                  "| standard | " + " | ".join(f"{100 * a:.1f}" for a in std) + " |",
                  "| aligned | " + " | ".join(f"{100 * a:.1f}" for a in ali) + " |", "",
                  f"- half depth (block {closure['half_depth']}): standard leaves a gap of {100 * closure['std_gap']:.1f} "
                  f"points to its own last block; aligned closes **{100 * closure['closed']:.0f}%** of it "
                  f"(target >= 50%): **{'met' if closure['closed'] >= 0.5 else 'NOT met'}**",
                  f"- aligned accuracy monotone in depth: **{'yes' if monotone else 'no'}** (largest decrease from one block "
                  f"to the next: {largest_dip:.2f} points; one test sample is {100 / len(task['test']):.2f} points)",
                  f"- last block: aligned {100 * ali[-1]:.1f}% vs standard {100 * std[-1]:.1f}% "
                  f"({last_drop:+.1f} points below standard; target <= 1): **{'met' if last_drop <= 1 else 'NOT met'}**", ""]
    panels = {f"{name}: accuracy through the shared head":
              {recipe: (list(range(1, len(accs) + 1)), [100 * a for a in accs]) for recipe, accs in per_task.items()}
              for name, per_task in curves.items()}
    plot_panels(panels, os.path.join(RESULTS, "aligned_training.png"), xlabel="block l", ylabel="test accuracy (%)")
    lines += ["![layer-wise accuracy](aligned_training.png)", ""]
    if not args.skip_timing:
        lines += ["## Training-step cost (forward + backward + AdamW step, same batch)", "",
                  "Interleaved rounds of 10 steps each (order alternating), one thread; the ratio is the median over 25 "
                  "rounds of (aligned round time / standard round time), timed as this process's CPU time so other jobs "
                  "on the shared machine do not enter it (the wall-clock ratio is given beside it). "
                  "Target: aligned <= 1.05x standard.", "",
                  "| task | batch | standard ms/step | aligned ms/step | ratio (median, CPU time) | range over rounds | wall-clock ratio (median) |", "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
        for task in tasks:
            r = step_time_ratio(task)
            lines.append(f"| {task['name']} | {r['batch_size']} | {r['standard_ms']:.1f} | {r['aligned_ms']:.1f} | "
                         f"**{r['ratio_median']:.3f}x** | {min(r['ratios']):.3f} .. {max(r['ratios']):.3f} | {r['wall_ratio_median']:.3f}x |")
        lines.append("")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "aligned_training.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
