"""Benchmark: per-token early exit (CALM) - speed beside quality, against full-depth greedy decoding.

    python benchmarks/per_token_exit.py [--models llama-aligned,llama-standard] [--thresholds 1,0.5,0.3,0.2,0.1,0.05]
                                        [--confidence softmax] [--min-exit-layer 1] [--repeats 5]
                                        [--prompts 8] [--prompt-tokens 32] [--new-tokens 32] [--score-blocks 8]

Models: the decoders trained by ``benchmarks/lm_aligned_training.py`` and saved to benchmarks/.cache/lm/<name> (or $HF_ALIGN_LM_ROOT/<name>)
(used when their DONE file is there, with their own tokenizer). A name that is not there is replaced by a
random-weight Llama of the same architecture (labelled "random-init") with random-token prompts, which only
exercises the mechanics - its quality numbers mean nothing.

Text: held-out topics of the Python Language Reference shipped in CPython (``pydoc_data.topics``, PSF License),
the same split rule as the training benchmark (10% of the topics, seeded), so none of it was trained on.

For every threshold (``threshold=1`` = no exit = full depth):

* generation: ``--prompts`` prompts of ``--prompt-tokens`` tokens, batch 1, ``--new-tokens`` greedy tokens, no
  EOS stop. tokens/s = new tokens / wall time over all prompts, median of ``--repeats`` repeats in which the
  thresholds and plain ``model.generate`` are interleaved; speed-up is against ``model.generate`` measured in
  the same repeats. Agreement = fraction of new tokens equal to ``model.generate``'s at the same position;
  "same prefix" = mean fraction of new tokens before the first difference.
* quality on text: perplexity of the exit distributions, teacher forced (``PerTokenEarlyExit.score``) on
  ``--score-blocks`` held-out blocks of 128 tokens; mean exit layer there.

Writes benchmarks/results/per_token_exit_<model>.json (one per model, so models can be measured in separate runs),
per_token_exit.md and per_token_exit.png (``--report-only`` rebuilds these two from the JSON files).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import CACHE, RESULTS, machine_info, plot_panels  # noqa: E402

# where benchmarks/lm_aligned_training.py saves its runs (the committed results used its --export copy,
# /work/lmcache/<run>, on the machine that made them: the same files)
LM_ROOT = os.environ.get("HF_ALIGN_LM_ROOT", os.path.join(CACHE, "lm"))


def held_out_texts(test_fraction: float = 0.1, seed: int = 0) -> list[str]:
    """The held-out topics of ``pydoc_data.topics`` (the training benchmark's split)."""
    from hf_align.data import load_python_docs_texts

    return load_python_docs_texts(test_fraction, seed)["test"]


def load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = os.path.join(LM_ROOT, name)
    if any(os.path.exists(os.path.join(path, f)) for f in ("DONE", "hf_align_benchmark.json")):  # export / cache
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
        return model.eval(), AutoTokenizer.from_pretrained(path), path
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), None, "random-init (no cached model)"


def token_stream(tokenizer, vocab: int, n_tokens: int) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(1, vocab, (n_tokens,), generator=torch.Generator().manual_seed(0))
    ids: list[int] = []
    for text in held_out_texts():
        ids.extend(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
        ids.append(tokenizer.eos_token_id)
    if len(ids) < n_tokens:
        raise ValueError(f"the held-out text has {len(ids)} tokens, {n_tokens} needed")
    return torch.tensor(ids[:n_tokens])


@torch.no_grad()
def run_model(name, args, log):
    from hf_align.generation import PerTokenEarlyExit

    model, tokenizer, source = load(name)
    L = model.config.num_hidden_layers
    n_prompt, n_new = args.prompt_tokens, args.new_tokens
    stream = token_stream(tokenizer, model.config.vocab_size, args.prompts * n_prompt + args.score_blocks * 128)
    prompts = stream[: args.prompts * n_prompt].view(args.prompts, n_prompt)
    blocks = stream[args.prompts * n_prompt:].view(args.score_blocks, 128)
    runners = {t: PerTokenEarlyExit(model, threshold=t, confidence=args.confidence,
                                    min_exit_layer=args.min_exit_layer) for t in args.thresholds}
    gen = dict(max_new_tokens=n_new, eos_token_id=None, pad_token_id=0)

    def plain():
        return [model.generate(input_ids=p[None], attention_mask=torch.ones(1, n_prompt, dtype=torch.long),
                               do_sample=False, **gen)[0, n_prompt:] for p in prompts]

    def early(t):
        return [runners[t].generate(input_ids=p[None], **gen) for p in prompts]

    times = {"generate": []} | {t: [] for t in args.thresholds}
    outputs = {}
    plain()  # warm-up
    for t in args.thresholds:
        early(t)
    for r in range(args.repeats):
        for key in ["generate", *args.thresholds]:
            start = time.perf_counter()
            out = plain() if key == "generate" else early(key)
            times[key].append(time.perf_counter() - start)
            outputs[key] = out
        log(f"{name}: repeat {r + 1}/{args.repeats} done")
    reference = torch.stack(outputs["generate"])  # (P, n_new)
    total = args.prompts * n_new
    base = statistics.median(times["generate"])
    rows = []
    for t in args.thresholds:
        outs = outputs[t]
        new = torch.stack([o.sequences[0, n_prompt:] for o in outs])
        same = new == reference
        first_diff = [int(row.logical_not().nonzero()[0]) if (~row).any() else n_new for row in same]
        exit_layers = torch.cat([o.exit_layers[0] for o in outs]).double()
        blocks_run = sum(o.blocks_run for o in outs)
        scored = runners[t].score(blocks, prefix_length=1)
        seconds = statistics.median(times[t])
        rows.append({
            "threshold": t,
            "tokens_per_s": total / seconds,
            "speedup_vs_generate": base / seconds,
            "agreement": float(same.double().mean()),
            "same_prefix": float(np.mean(first_diff) / n_new),
            "mean_exit_layer": float(exit_layers.mean()),
            "blocks_fraction": blocks_run / (L * total),
            "perplexity": scored.perplexity,
            "score_mean_exit_layer": float(scored.exit_layers.double().mean()),
        })
    return {"model": name, "source": source, "num_layers": L, "generate_tokens_per_s": total / base, "rows": rows}


def report(results, args, path_md, path_png):
    info = machine_info()
    lines = [
        "# Per-token early exit (CALM) - speed beside quality",
        "",
        f"torch {info['torch']}, {info['cores']} cores, shared machine; the command of each model's run is in its "
        "section (ratios are within one run: thresholds and plain `model.generate` interleaved in every repeat).",
        "",
        f"Confidence `{args.confidence}`, min exit layer {args.min_exit_layer}. Generation: {args.prompts} prompts x "
        f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens each, batch 1, greedy, no EOS stop. "
        "Threshold 1 never exits (= full depth through this loop). Speed-up: against plain `model.generate` in the "
        "same repeats. Agreement: new tokens equal to `model.generate`'s at the same position; same prefix: share "
        "of new tokens before the first difference. Blocks: blocks run / (L x new tokens), prefill included. "
        f"Perplexity: teacher-forced exit distributions on {args.score_blocks} held-out blocks of 128 tokens.",
        "",
    ]
    for res in results:
        lines += [f"## {res['model']} ({res['source']}, L = {res['num_layers']})", "",
                  f"Command: `python benchmarks/per_token_exit.py {res['command']}` (git {res['git']}, "
                  f"{res['threads']} thread(s), median of {res['repeats']} interleaved repeats)", "",
                  f"plain `model.generate`: {res['generate_tokens_per_s']:.1f} tokens/s", "",
                  "| threshold | tokens/s | speed-up vs generate | agreement | same prefix | mean exit layer | "
                  "blocks run / full | perplexity (text) | mean exit layer (text) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['threshold']:g} | {r['tokens_per_s']:.1f} | {r['speedup_vs_generate']:.2f}x | "
                         f"{r['agreement']:.1%} | {r['same_prefix']:.1%} | {r['mean_exit_layer']:.2f} | "
                         f"{r['blocks_fraction']:.3f} | {r['perplexity']:.3f} | {r['score_mean_exit_layer']:.2f} |")
        lines.append("")
    lines += [
        "**Reading these numbers.** The greedy continuations of these small, briefly trained models are degenerate "
        "repetitions (for llama-aligned and llama-standard on the first prompt: `' | | | | ...'`), which even "
        "block 1 predicts, so agreement with full-depth greedy is easy here and says little. The teacher-forced "
        "perplexity on held-out text (real tokens fed back, exits and state propagation as in decoding) is the "
        "quality measure to read; its mean exit layer is the compute actually saved on text. Wall-clock ratios "
        "on this shared 2-core machine move by +-20% between runs (compare threshold 1, which does the same work "
        "as `model.generate` through a Python loop over blocks).",
        "",
        "![](per_token_exit.png)",
    ]
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    panels = {
        "speed-up vs model.generate": {r["model"]: ([x["mean_exit_layer"] for x in r["rows"]],
                                                    [x["speedup_vs_generate"] for x in r["rows"]]) for r in results},
        "agreement with full-depth greedy (%)": {r["model"]: ([x["mean_exit_layer"] for x in r["rows"]],
                                                           [100 * x["agreement"] for x in r["rows"]]) for r in results},
        "perplexity (held-out text)": {r["model"]: ([x["score_mean_exit_layer"] for x in r["rows"]],
                                                    [x["perplexity"] for x in r["rows"]]) for r in results},
    }
    plot_panels(panels, path_png, xlabel="mean exit layer", ylabel="")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama-aligned,llama-standard")
    parser.add_argument("--thresholds", default="1,0.5,0.3,0.2,0.1,0.05")
    parser.add_argument("--confidence", default="softmax")
    parser.add_argument("--min-exit-layer", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--score-blocks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the per-model JSON files")
    args = parser.parse_args()
    args.command = " ".join(sys.argv[1:])
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.models.split(","):
        path = os.path.join(args.out, f"per_token_exit_{name}.json")
        if args.report_only:
            with open(path) as f:
                saved = json.load(f)
            results.append(saved["result"])
            continue
        result = run_model(name, args, lambda m: print(m, flush=True))
        result.update(command=args.command, git=machine_info()["git"], threads=args.threads, repeats=args.repeats)
        results.append(result)
        with open(path, "w") as f:  # one file per model: models may be measured in separate runs
            json.dump({"command": args.command, "args": {k: v for k, v in vars(args).items()},
                       "machine": machine_info(), "result": result}, f, indent=1)
    report(results, args, os.path.join(args.out, "per_token_exit.md"), os.path.join(args.out, "per_token_exit.png"))
    print(open(os.path.join(args.out, "per_token_exit.md")).read())


if __name__ == "__main__":
    main()
