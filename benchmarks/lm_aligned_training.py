"""Benchmark: decoder LMs trained from scratch on real English text, standard vs aligned, same steps and seed.

    python benchmarks/lm_aligned_training.py [--runs llama-standard,llama-aligned,...] [--export /work/lmcache]
                                             [--out benchmarks/results] [--steps N] [--force] [--report-only]
                                             [--sizes llama=6x128]

Data: the Python Language Reference topics shipped in CPython's standard library (``pydoc_data.topics``,
PSF License; see ``hf_align.data.load_python_docs_texts``), split by topic. Tokenizer: a byte-level BPE
(4,096 tokens) trained on the training topics (deterministic). Models: a Llama-family decoder and a GPT-2,
8 blocks, hidden 256, context 128, random init with the same seed for both recipes; only ``layer_weights``
differs ("last" = standard training, any other scheme = aligned). Each run is trained in this process,
evaluated (``eval_layer_{l}_perplexity`` on the held-out topics) and saved (model + tokenizer, safetensors)
to ``benchmarks/.cache/lm/<run>/`` and, with ``--export DIR``, copied to ``DIR/<run>/`` with a ``DONE`` file
written last. Runs already in the cache are not retrained (``--force`` retrains). The report
(``lm_aligned_training.md`` / ``.png`` / ``.json``) covers every cached run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import CACHE, RESULTS, machine_info, plot_panels  # noqa: E402

LM_CACHE = os.path.join(CACHE, "lm")
BLOCK_SIZE = 128
VOCAB = 4096
# family -> (blocks, hidden size): the Llama is sized so that compute, not Python overhead, dominates a
# single-token forward on CPU (self-speculative decoding drafts with its first blocks); the GPT-2 is smaller
# so that both families' runs fit the 2 shared CPU cores of the machine the results were made on.
SIZES = {"llama": (8, 256), "gpt2": (6, 128)}


def last_heavy(num_layers: int, last: float = 0.5) -> list[float]:
    """``w_L = last``; blocks 1..L-1 share ``1 - last`` in proportion to depth (the paper's linear scheme)."""
    rest = [2 * l / ((num_layers - 1) * num_layers) * (1 - last) for l in range(1, num_layers)]
    return rest + [last]


# run name -> (family, layer_weights)
RUNS = {
    "llama-standard": ("llama", "last"),
    "llama-aligned": ("llama", "linear"),
    "gpt2-standard": ("gpt2", "last"),
    "gpt2-aligned": ("gpt2", "linear"),
    # more weight on the last block (w_L = 0.5), if "linear" costs the final layer more than 5% perplexity
    "llama-aligned-last50": ("llama", last_heavy(SIZES["llama"][0])),
    "gpt2-aligned-last50": ("gpt2", last_heavy(SIZES["gpt2"][0])),
    # torchtune's gradual early-exit curriculum: exits join from the last block towards the first (all on at 50%)
    "llama-aligned-gradual": ("llama", "linear", {"early_exit_curriculum": "gradual"}),
    "gpt2-aligned-gradual": ("gpt2", "linear", {"early_exit_curriculum": "gradual"}),
}
TRAIN = dict(max_steps=160, per_device_train_batch_size=16, learning_rate=2e-3, warmup_steps=16, weight_decay=0.1,
             lr_scheduler_type="cosine", adam_beta2=0.98, max_grad_norm=1.0)


def data(block_size: int = BLOCK_SIZE):
    from hf_align.data import lm_blocks, load_python_docs_texts, train_bpe_tokenizer

    texts = load_python_docs_texts()
    tokenizer = train_bpe_tokenizer(texts["train"], vocab_size=VOCAB, model_max_length=block_size)
    return tokenizer, lm_blocks(texts["train"], tokenizer, block_size), lm_blocks(texts["test"], tokenizer, block_size)


def build_model(family: str, tokenizer, seed: int = 0):
    """The run's decoder from a config (random init, seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    layers, hidden = SIZES[family]
    if family == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=2 * BLOCK_SIZE, tie_word_embeddings=False, **special)
        return LlamaForCausalLM(config)
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4,
                            n_positions=2 * BLOCK_SIZE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown family {family!r}")


def train_run(name: str, family: str, weights, tokenizer, train, test, steps: int, seed: int = 0, log=print,
              options: dict | None = None) -> dict:
    from hf_align import AlignedTrainer, AlignedTrainingArguments

    out = os.path.join(LM_CACHE, name)
    model = build_model(family, tokenizer, seed)
    args = AlignedTrainingArguments(
        output_dir=out, layer_weights=weights, seed=seed, report_to=[], save_strategy="no", logging_steps=20,
        per_device_eval_batch_size=32, use_cpu=True, dataloader_num_workers=0, disable_tqdm=False,
        **{**TRAIN, "max_steps": steps}, **(options or {}),
    )
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    trainer.save_model(out)  # model (safetensors) + tokenizer + model card
    meta = {"run": name, "family": family, "layer_weights": weights, "weights": trainer.layer_loss_weights,
            "options": options or {},
            "metrics": metrics, "train_seconds": seconds, "seed": seed, "train": {**TRAIN, "max_steps": steps},
            "train_tokens": len(train) * BLOCK_SIZE, "eval_tokens": len(test) * BLOCK_SIZE,
            "params": sum(p.numel() for p in model.parameters()), "layers": SIZES[family][0],
            "hidden": SIZES[family][1],
            "log_history": trainer.state.log_history}
    with open(os.path.join(out, "hf_align_benchmark.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"{name}: trained in {seconds:.0f}s, final-layer perplexity {metrics['eval_perplexity']:.3f}")
    return meta


def export(name: str, root: str) -> None:
    """Copy a cached run to ``root/name`` and write ``DONE`` last (other jobs wait for it)."""
    dest = os.path.join(root, name)
    if os.path.exists(os.path.join(dest, "DONE")):
        os.remove(os.path.join(dest, "DONE"))
    shutil.copytree(os.path.join(LM_CACHE, name), dest, dirs_exist_ok=True)
    open(os.path.join(dest, "DONE"), "w").close()


def unigram_perplexity(tokenizer, train, test) -> float:
    """Reference: held-out perplexity of the training set's add-one-smoothed unigram distribution (no context)."""
    import numpy as np

    counts = np.bincount(np.asarray(train["input_ids"]).ravel(), minlength=len(tokenizer)) + 1.0
    targets = np.asarray(test["input_ids"])[:, 1:].ravel()  # the tokens the models are scored on
    return float(np.exp(-np.log(counts[targets] / counts.sum()).mean()))


def perplexities(meta: dict) -> list[float]:
    return [meta["metrics"][f"eval_layer_{l}_perplexity"] for l in range(1, meta["layers"] + 1)]


def report(metas: dict, out: str, command: str, unigram: float | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    families = sorted({m["family"] for m in metas.values()})
    lines = ["# Aligned training of decoder LMs (standard vs aligned, from scratch)", "",
             f"Command (this report): `{command}`. Each run was trained by "
             "`python benchmarks/lm_aligned_training.py --runs <run> [--steps N] [--sizes ...]`, one process per run (runs in the cache are "
             "not retrained; `--report-only` rebuilds this page from them).", "",
             "Data: the Python Language Reference topics in CPython's standard library (`pydoc_data.topics`, "
             "PSF License), split by topic (71 train / 8 held-out test topics); byte-level BPE tokenizer with "
             f"{VOCAB} tokens trained on the train topics; blocks of {BLOCK_SIZE} tokens. "
             "Perplexity is exp of the token-weighted mean next-token NLL over all held-out tokens, through the "
             "model's own final norm + LM head applied after block l (`eval_layer_{l}_perplexity`). "
             "Both recipes of a family: same config, initialisation seed, data order, optimizer (AdamW, cosine "
             "schedule), steps; only `layer_weights` differs. `train s` is wall-clock on a machine shared with "
             "other jobs (2 cores), not a cost measure."
             + (f" Reference: a unigram model (token frequencies of the training split, no context) has held-out "
                f"perplexity {unigram:.1f}." if unigram else ""), ""]
    summary = {}
    for fam in families:
        runs = {n: m for n, m in metas.items() if m["family"] == fam}
        std = runs.get(f"{fam}-standard")
        first = next(iter(runs.values()))
        n_layers = first["layers"]
        lines += [f"## {fam} ({first['params'] / 1e6:.2f}M parameters, {n_layers} blocks, hidden {first['hidden']}; "
                  f"{first['train']['max_steps']} steps x {first['train']['per_device_train_batch_size']} x {BLOCK_SIZE} tokens)", ""]
        header = "| run | layer_weights | " + " | ".join(f"L{l}" for l in range(1, n_layers + 1)) + " | train s |"
        lines += [header, "|" + "---|" * (n_layers + 3)]
        for n, m in runs.items():
            ppl = perplexities(m)
            lw = m["layer_weights"] if isinstance(m["layer_weights"], str) else "[" + ", ".join(f"{w:g}" for w in m["layer_weights"]) + "]"
            if m.get("options"):
                lw += " + " + ", ".join(f"{k}={v}" for k, v in m["options"].items())
            lines.append(f"| {n} | {lw} | " + " | ".join(f"{p:.2f}" for p in ppl) + f" | {m['train_seconds']:.0f} |")
        lines.append("")
        if std is not None:
            s = perplexities(std)
            for n, m in runs.items():
                if n == std["run"]:
                    continue
                a = perplexities(m)
                final_ratio = a[-1] / s[-1]
                mid = n_layers // 2
                summary[n] = {"final_ppl_ratio_vs_standard": final_ratio, "within_5pct": final_ratio <= 1.05,
                              f"layer_{mid}_ppl_aligned": a[mid - 1], f"layer_{mid}_ppl_standard": s[mid - 1],
                              "intermediate_ppl_ratios_standard_over_aligned": [s[i] / a[i] for i in range(n_layers - 1)]}
                lines.append(f"- **{n}** vs {std['run']}: final-layer perplexity ratio {final_ratio:.4f} "
                             f"({'within' if final_ratio <= 1.05 else 'NOT within'} 5%); at block {mid}: "
                             f"{a[mid - 1]:.2f} vs {s[mid - 1]:.2f} (standard/aligned = {s[mid - 1] / a[mid - 1]:.1f}x); "
                             f"blocks 1..{n_layers - 1}: standard/aligned ratio "
                             + ", ".join(f"{s[i] / a[i]:.1f}" for i in range(n_layers - 1)) + ".")
            lines.append("")
    lines += ["Machine: " + json.dumps(machine_info()), ""]
    with open(os.path.join(out, "lm_aligned_training.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "lm_aligned_training.json"), "w") as f:
        json.dump({"runs": {n: {k: v for k, v in m.items() if k != "log_history"} for n, m in metas.items()},
                   "summary": summary, "command": command, "unigram_perplexity": unigram}, f, indent=1)
    panels = {fam: {n: (list(range(1, m["layers"] + 1)), [math.log(p) for p in perplexities(m)])
                    for n, m in metas.items() if m["family"] == fam} for fam in families}
    plot_panels(panels, os.path.join(out, "lm_aligned_training.png"), xlabel="block l (shared final norm + LM head)",
                ylabel="held-out log perplexity")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names (see RUNS)")
    parser.add_argument("--steps", type=int, default=TRAIN["max_steps"])
    parser.add_argument("--out", default=RESULTS, help="folder for the report (md, png, json)")
    parser.add_argument("--export", default=None, help="also copy each trained run to EXPORT/<run>/ + DONE")
    parser.add_argument("--force", action="store_true", help="retrain runs found in the cache")
    parser.add_argument("--report-only", action="store_true", help="only write the report from cached runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="*", default=[], metavar="FAMILY=LxH",
                        help=f"override a family's blocks x hidden size (default {SIZES}), e.g. llama=6x128")
    args = parser.parse_args()
    for item in args.sizes:
        family, _, size = item.partition("=")
        if family not in SIZES or "x" not in size:
            parser.error(f"--sizes expects FAMILY=LxH with FAMILY in {list(SIZES)}, got {item!r}")
        SIZES[family] = tuple(int(v) for v in size.split("x"))
    torch.set_num_threads(args.threads)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {list(RUNS)}")
    tokenizer, train, test = data()
    if not args.report_only:
        for name in names:
            meta_path = os.path.join(LM_CACHE, name, "hf_align_benchmark.json")
            if os.path.exists(meta_path) and not args.force:
                print(f"{name}: cached")
            else:
                family, weights, *options = RUNS[name]
                train_run(name, family, weights, tokenizer, train, test, args.steps, options=options[0] if options else None)
            if args.export:
                export(name, args.export)
    metas = {}
    for name in RUNS:
        path = os.path.join(LM_CACHE, name, "hf_align_benchmark.json")
        if os.path.exists(path):
            with open(path) as f:
                metas[name] = json.load(f)
            metas[name].setdefault("layers", SIZES[metas[name]["family"]][0])  # runs saved before sizes were stored
            metas[name].setdefault("hidden", SIZES[metas[name]["family"]][1])
    if metas:
        report(metas, args.out, "python benchmarks/lm_aligned_training.py " + " ".join(sys.argv[1:]),
               unigram=unigram_perplexity(tokenizer, train, test))


if __name__ == "__main__":
    main()
