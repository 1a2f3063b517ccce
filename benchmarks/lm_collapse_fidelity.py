"""Fidelity: does generalized neural collapse emerge in causal LMs trained here, through training and through depth?

    python benchmarks/lm_collapse_fidelity.py --runs llama-standard,llama-aligned      # train + measure (cached)
    python benchmarks/lm_collapse_fidelity.py --report-only                            # table + plots again

Setup. The text, tokenizer (a 4,096-token byte-level BPE trained on the training documents) and the 6-block,
hidden-128 Llama / GPT-2 of benchmarks/lm_continued_training.py: Debian's ``python3.11-doc`` reST sources (PSF
License), 5% of the documents held out. Each model is trained from scratch for 2,000 steps (batch 8 x 64
tokens, AdamW 2e-3, cosine) either **standard** (loss of the last block only) or **aligned** (AlignedTrainer,
linear layer weights: the model's own head after every block), and saved at steps 0 (initialisation), 100, 250,
500, 1,000, 1,500 and 2,000.

Measure. At every checkpoint, ``hf_align.collapse_report(model, held_out_blocks)``: the token-level report with
the vocabulary as the classes (hf_align.analysis.collapse.tokens), on 256 held-out blocks of 64 tokens (16,128
target tokens), classes with at least ``--min-count`` targets, both weightings; every layer 0..6. The trends
that the generalized-collapse paper (Jiang et al. 2024) and Wu & Papyan's "Linguistic Collapse" (2024) report
as collapse: within-class variability (NC1, CDNV) down, GNC2 margins of the class means up, GNC3 (1 - cos of
W and the centered means) down, i.e. alignment up; equinorm (CoV of the mean norms) down.
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import CACHE, RESULTS, machine_info  # noqa: E402

CACHE_DIR = os.path.join(CACHE, "lm_collapse")
STEPS = 2000
CHECKPOINTS = (0, 100, 250, 500, 1000, 1500, 2000)
VARIANTS = {"standard": "last", "aligned": "linear"}
RUNS = [f"{family}-{variant}" for family in ("llama", "gpt2") for variant in VARIANTS]
KEYS = [("nc1", "NC1 = tr(Σ_W Σ_B⁺)/K (↓)", True), ("cdnv", "CDNV (↓)", True),
        ("gnc2_means_margin_mean", "GNC2 margin of the means, mean (↑)", False),
        ("gnc3", "GNC3 = mean 1 − cos(w_k, μ̃_k) (↓)", False), ("equinorm", "equinorm CoV (↓)", False)]


def ckpt_dir(run: str, step: int) -> str:
    return os.path.join(CACHE_DIR, run, f"step-{step}")


def train(run: str, tokenizer, train_blocks, seed: int = 0) -> None:
    from lm_continued_training import PRETRAIN, fresh_model
    from transformers import TrainerCallback

    from hf_align import AlignedTrainer, AlignedTrainingArguments

    family, variant = run.split("-", 1)
    model = fresh_model(family, tokenizer, seed)
    model.save_pretrained(ckpt_dir(run, 0))

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in CHECKPOINTS:
                model.save_pretrained(ckpt_dir(run, state.global_step))

    args = AlignedTrainingArguments(
        output_dir=os.path.join(CACHE_DIR, run, "trainer"), layer_weights=VARIANTS[variant], seed=seed, report_to=[],
        save_strategy="no", logging_steps=100, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        max_steps=STEPS, **PRETRAIN)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train_blocks, processing_class=tokenizer,
                             callbacks=[SaveAt()])
    begin = time.perf_counter()
    trainer.train()
    print(f"{run}: {STEPS} steps in {time.perf_counter() - begin:.0f}s", flush=True)


def measure(run: str, test_blocks, min_count: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from hf_align import collapse_report

    rows = []
    for step in CHECKPOINTS:
        if not os.path.exists(os.path.join(ckpt_dir(run, step), "model.safetensors")):
            print(f"{run}: no checkpoint at step {step} (training stopped or still running): not measured", flush=True)
            continue
        model = AutoModelForCausalLM.from_pretrained(ckpt_dir(run, step), dtype=torch.float32).eval()
        begin = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = collapse_report(model, test_blocks, batch_size=32, min_count=min_count)
        seconds = time.perf_counter() - begin
        ppl = last_layer_perplexity(model, test_blocks)
        rows.append({"step": step, "seconds": seconds, "perplexity": ppl, "report": rep.to_dict(),
                     "warnings": [str(w.message) for w in caught]})
        print(f"{run} step {step}: {seconds:.0f}s, perplexity {ppl:.1f}, last layer nc1 "
              f"{rep.per_layer[-1].get('nc1', float('nan')):.3g}, {rep.num_seen} classes", flush=True)
    return rows


@torch.no_grad()
def last_layer_perplexity(model, blocks) -> float:
    nll = n = 0.0
    for s in range(0, len(blocks), 32):
        ids = torch.tensor(blocks[s : s + 32]["input_ids"])
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        n += ids[:, 1:].numel()
    return float(np.exp(nll / n))


def plot(results: dict, path: str) -> None:
    from matplotlib.figure import Figure

    runs = list(results)
    fig = Figure(figsize=(3.3 * len(KEYS), 6.4))
    axes = fig.subplots(2, len(KEYS), squeeze=False)
    colors = {"standard": "tab:blue", "aligned": "tab:orange"}
    styles = {"llama": "-", "gpt2": "--"}
    for j, (key, title, log) in enumerate(KEYS):
        ax = axes[0][j]  # through depth, at the last checkpoint
        for run in runs:
            family, variant = run.split("-", 1)
            rep = results[run][-1]["report"]
            ax.plot(rep["layers"], [m.get(key, np.nan) for m in rep["per_layer"]], styles[family], marker="o",
                    color=colors[variant], label=run)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"layer (0 = embeddings), step {CHECKPOINTS[-1]}")
        if log:
            ax.set_yscale("log")
        ax = axes[1][j]  # through training, at the last layer
        for run in runs:
            family, variant = run.split("-", 1)
            steps = [r["step"] for r in results[run]]
            ax.plot(steps, [r["report"]["per_layer"][-1].get(key, np.nan) for r in results[run]], styles[family],
                    marker="o", color=colors[variant], label=run)
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlabel("training step (last layer)")
        if log:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_depth_by_step(results: dict, path: str) -> None:
    """One panel per run and metric: every checkpoint's curve through depth (lighter = earlier)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    runs = list(results)
    keys = KEYS[:4]
    fig = Figure(figsize=(3.3 * len(keys), 2.8 * len(runs)))
    axes = fig.subplots(len(runs), len(keys), squeeze=False)
    cmap = colormaps["viridis"]
    for i, run in enumerate(runs):
        for j, (key, title, log) in enumerate(keys):
            ax = axes[i][j]
            for c, row in enumerate(results[run]):
                rep = row["report"]
                ax.plot(rep["layers"], [m.get(key, np.nan) for m in rep["per_layer"]], marker=".",
                        color=cmap(c / max(1, len(results[run]) - 1)), label=f"step {row['step']}")
            ax.set_title(f"{run}: {title}", fontsize=8)
            ax.set_xlabel("layer")
            if log:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def trend(values: list[float]) -> str:
    a, b = values[1], values[-1]  # from the first trained checkpoint (step 100) to the last
    return f"{a:.3g} → {b:.3g}"


def report(results: dict, out: str, command: str, min_count: int) -> None:
    plot(results, out + ".png")
    plot_depth_by_step(results, out + "_depth.png")
    name = os.path.basename(out)
    lines = [
        "# Generalized neural collapse in causal LMs trained here: through training and through depth", "",
        f"Command: `{command}`. Machine: {machine_info()['cpu']}, {machine_info()['cores']} cores, {torch.get_num_threads()} threads (shared with other jobs while it ran).", "",
        __doc__.split("Setup.")[1].strip().replace("\n", " ").replace("Measure.", "\n\nMeasure.").replace(
            "    python", "python"), "",
        f"Classes: tokens with at least {min_count} targets in the held-out blocks (S); the rest are counted, not used.",
        "", f"![through depth and training]({name}.png)", "",
        f"![every checkpoint through depth]({name}_depth.png)", "",
        "## Last layer through training (balanced weighting; `_freq` = frequency-weighted)", "",
    ]
    cols = ["perplexity", "nc1", "nc1_freq", "cdnv", "cdnv_freq", "gnc2_means_margin_mean", "gnc2_means_margin",
            "gnc3", "gnc3_freq", "equinorm"]
    lines += ["| run | step | " + " | ".join(cols) + " |", "| --- | ---: |" + " ---: |" * len(cols)]
    for run, rows in results.items():
        for r in rows:
            m = r["report"]["per_layer"][-1]
            vals = [r["perplexity"]] + [m.get(c, float("nan")) for c in cols[1:]]
            lines.append(f"| {run} | {r['step']} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
    lines += ["", "## Through depth at the last checkpoint", ""]
    dcols = ["nc1", "cdnv", "gnc2_means_margin_mean", "gnc3", "equinorm", "coincident_mean_pairs"]
    lines += ["| run | layer | " + " | ".join(dcols) + " |", "| --- | ---: |" + " ---: |" * len(dcols)]
    for run, rows in results.items():
        rep = rows[-1]["report"]
        for layer, m in zip(rep["layers"], rep["per_layer"]):
            lines.append(f"| {run} | {layer} | " + " | ".join(f"{m.get(c, float('nan')):.4g}" for c in dcols) + " |")
    lines += ["", "## Classes and the head", ""]
    lines += ["| run | step | target tokens | classes in S | below min_count | never seen | GNC2 margin of W, all rows (min / mean) | "
              "GNC2 margin of W, rows in S (min / mean / freq-weighted mean) | Tammes max cos | seconds |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run, rows in results.items():
        for r in rows:
            rep = r["report"]
            c = rep["classifier"]
            lines.append(f"| {run} | {r['step']} | {rep['num_tokens']} | {rep['num_seen']} | {rep['num_rare']} | "
                         f"{rep['num_unseen']} | {c.get('gnc2_W_margin', float('nan')):.3g} / "
                         f"{c.get('gnc2_W_margin_mean', float('nan')):.3g} | {c.get('gnc2_W_seen_margin', float('nan')):.3g} / "
                         f"{c.get('gnc2_W_seen_margin_mean', float('nan')):.3g} / {c.get('gnc2_W_seen_margin_mean_freq', float('nan')):.3g} | "
                         f"{c.get('tammes_max_cosine', float('nan')):.3g} | "
                         f"{r['seconds']:.0f} |")
    lines += ["", "## Trends at the last layer, step 100 → 2,000", ""]
    for run, rows in results.items():
        last = [r["report"]["per_layer"][-1] for r in rows]
        parts = [f"{key} {trend([m.get(key, np.nan) for m in last])}" for key, _, _ in KEYS]
        lines.append(f"- **{run}**: " + "; ".join(parts) + ".")
    notes = os.path.join(os.path.dirname(__file__), "results", "lm_collapse_fidelity_notes.md")
    if os.path.exists(notes):
        lines += ["", open(notes).read().strip()]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump({"command": command, "min_count": min_count, "results": results}, f, indent=1, default=float)
    print(f"wrote {out}.md, .json, .png, _depth.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="llama-standard,llama-aligned", help=f"comma-separated, of {RUNS}")
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--measure-only", action="store_true", help="measure the checkpoints there are, no training")
    parser.add_argument("--out", default=os.path.join(RESULTS, "lm_collapse_fidelity"))
    parser.add_argument("--text-root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/lm_collapse_fidelity.py " + " ".join(sys.argv[1:])
    import glob

    results = {}  # one file per run, so that runs measured by separate processes do not overwrite each other
    for path in sorted(glob.glob(os.path.join(CACHE_DIR, "measured*.json"))):
        results.update(json.load(open(path)))
    results = {run: results[run] for run in RUNS if run in results}
    if not args.report_only:
        from lm_continued_training import data

        tokenizer, _, train_blocks, test_blocks = data(args.text_root)
        for run in [r for r in args.runs.split(",") if r]:
            if run not in RUNS:
                raise SystemExit(f"unknown run {run!r}; choose from {RUNS}")
            if not os.path.exists(ckpt_dir(run, STEPS)) and not args.measure_only:
                train(run, tokenizer, train_blocks)
            results[run] = measure(run, test_blocks, args.min_count)
            os.makedirs(CACHE_DIR, exist_ok=True)
            with open(os.path.join(CACHE_DIR, f"measured-{run}.json"), "w") as f:
                json.dump({run: results[run]}, f, default=float)
    if args.report_only:  # the results were made by the training + measuring runs
        command = (f"python benchmarks/lm_collapse_fidelity.py --runs {','.join(results)} --min-count {args.min_count}` "
                   f"(train + measure, cached per run), then `{command}")
    report(results, args.out, command, args.min_count)


if __name__ == "__main__":
    main()
