"""Benchmark: self-speculative decoding vs plain greedy generate vs transformers' assistant_early_exit.

    python benchmarks/speculative_decoding.py --model-dir benchmarks/.cache/lm/llama-aligned \
        --compare-dir benchmarks/.cache/lm/llama-standard [--exit-layers 1 2 3 4] [--draft-tokens 2 4 6] \
        [--new-tokens 48] [--prompts 4] [--repeats 5] [--name llama]

Same model, same prompts, batch size 1, greedy, float32, one thread. Every repeat runs every method on every prompt
(interleaved: plain generate, each (k, n) of ``hf_align.speculative_generate``, each k of
``model.generate(assistant_early_exit=k, num_assistant_tokens=n)``); the speed-up of a method is the median over
repeats of (plain time / method time) measured in the same repeat. Greedy outputs are compared token for token
with plain ``generate`` on every prompt. ``--compare-dir`` (the standard-trained model of the same size) is run
through the same grid so its acceptance rate and speed-up stand beside the aligned model's.

Prompts: the first ``--prompt-tokens`` tokens of held-out topics of the Python Language Reference shipped with
CPython (``pydoc_data.topics``, PSF License), the topics the LM-training benchmark keeps out of training
(``hf_align.data.load_python_docs_texts`` when present: 10% of the sorted topic names drawn with seed 0).
Writes ``benchmarks/results/speculative_decoding_<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine_info  # noqa: E402


def held_out_texts(test_fraction: float = 0.1, seed: int = 0) -> list[str]:
    try:
        from hf_align.data import load_python_docs_texts

        return load_python_docs_texts(test_fraction=test_fraction, seed=seed)["test"]
    except ImportError:  # the same split, written out
        from pydoc_data.topics import topics

        names = sorted(topics)
        rng = np.random.default_rng(seed)
        test = set(rng.choice(names, size=max(1, round(test_fraction * len(names))), replace=False).tolist())
        return ["\n".join(line.rstrip() for line in topics[n].strip().split("\n")) for n in names if n in test]


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def prompts_for(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    out = []
    for text in held_out_texts():
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :length]
        if ids.shape[1] == length:
            out.append(ids)
        if len(out) == count:
            break
    return out


def run_grid(model, prompts, args, log) -> dict:
    from hf_align import speculative_generate

    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    num_layers = model.config.num_hidden_layers
    methods = [("generate", None, None)]
    methods += [("speculative", k, n) for k in args.exit_layers for n in args.draft_tokens]
    methods += [("assistant_early_exit", k, n) for k in args.exit_layers for n in args.aee_draft_tokens]
    if args.sample_draft_tokens:
        methods += [("generate (sampling)", None, None)]
        methods += [("speculative (sampling)", k, n) for k in args.exit_layers for n in args.sample_draft_tokens]
    reference = [model.generate(input_ids=p, **gen) for p in prompts]  # also warms up
    results = {m: {"times": [], "ratios": [], "identical": True, "accepted": 0, "drafted": 0, "tokens": 0,
                   "error": None} for m in methods}
    for repeat in range(args.repeats):
        plain = {}
        for method in methods:
            kind, k, n = method
            entry = results[method]
            if entry["error"]:
                continue
            total, tokens = 0.0, 0
            try:
                for prompt, ref in zip(prompts, reference):
                    start = time.perf_counter()
                    with torch.no_grad():
                        if kind == "generate":
                            out = model.generate(input_ids=prompt, **gen)
                        elif kind == "speculative":
                            out, stats = speculative_generate(model, input_ids=prompt, exit_layer=k, num_draft_tokens=n,
                                                              return_stats=True, **gen)
                        elif kind == "generate (sampling)":
                            torch.manual_seed(repeat)
                            out = model.generate(input_ids=prompt, **{**gen, "do_sample": True})
                        elif kind == "speculative (sampling)":
                            out, stats = speculative_generate(
                                model, input_ids=prompt, exit_layer=k, num_draft_tokens=n, return_stats=True,
                                generator=torch.Generator().manual_seed(repeat), **{**gen, "do_sample": True})
                        else:
                            out = model.generate(input_ids=prompt, assistant_early_exit=k, num_assistant_tokens=n,
                                                 num_assistant_tokens_schedule="constant", **gen)
                    total += time.perf_counter() - start
                    tokens += out.shape[1] - prompt.shape[1]
                    if "sampling" not in kind:
                        entry["identical"] &= out.shape == ref.shape and bool(torch.equal(out, ref))
                    if kind.startswith("speculative"):
                        entry["accepted"] += stats.accepted
                        entry["drafted"] += stats.drafted
            except Exception as error:  # recorded for the report (transformers' assistant_early_exit on GPT-2)
                frame = traceback.extract_tb(error.__traceback__)[-1]
                where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
                entry["error"] = f"{type(error).__name__}: {error} (at {where})"
                if model.config.num_hidden_layers != num_layers:  # the failed call left the config truncated
                    entry["error"] += (f"; the failed call left config.num_hidden_layers = "
                                       f"{model.config.num_hidden_layers} (restored to {num_layers} by this script)")
                    model.config.num_hidden_layers = num_layers
                log(f"  {kind} k={k} n={n}: {entry['error']}")
                continue
            entry["times"].append(total)
            entry["tokens"] += tokens
            entry.setdefault("rates", []).append(tokens / total)
            sampling = "sampling" in kind
            if kind.startswith("generate"):
                plain[sampling] = tokens / total
            entry["ratios"].append((tokens / total) / plain[sampling])  # tokens/s ratio (= time ratio when greedy)
        log(f"  repeat {repeat + 1}/{args.repeats}: plain {plain[False]:.1f} tokens/s")
    rows = []
    for (kind, k, n), entry in results.items():
        row = {"method": kind, "exit_layer": k, "num_draft_tokens": n, "num_layers": num_layers,
               "error": entry["error"],
               "identical": entry["identical"] if not entry["error"] and "sampling" not in kind else None}
        if entry["times"]:
            row.update(tokens_per_s=statistics.median(entry["rates"]), tokens=entry["tokens"],
                       speedup_median=statistics.median(entry["ratios"]), seconds=entry["times"],
                       ratios=entry["ratios"])
        if kind.startswith("speculative"):
            row.update(accepted=entry["accepted"], drafted=entry["drafted"],
                       acceptance_rate=entry["accepted"] / entry["drafted"] if entry["drafted"] else None)
        rows.append(row)
    return {"rows": rows}


def teacher_forced_agreement(model, tokenizer, count: int, length: int) -> dict:
    """alpha_k on held-out text: the fraction of positions where the head on block k's output has the full model's
    argmax (the greedy acceptance probability of a k-block draft on real text, free of degenerate repetition)."""
    from hf_align import LayerView

    view = LayerView(model)
    agree = torch.zeros(view.num_layers)
    total = 0
    with torch.no_grad():
        for ids in prompts_for(tokenizer, count, length):
            logits = view.layer_logits(input_ids=ids)
            final = logits[-1].argmax(-1)
            agree += torch.stack([(lg.argmax(-1) == final).float().sum() for lg in logits])
            total += final.numel()
    return {"positions": total, "alpha": {k + 1: float(agree[k] / total) for k in range(view.num_layers - 1)}}


def auto_choice(model, prompts, args) -> dict:
    from hf_align import speculative_generate

    out = []
    for n in args.draft_tokens:
        for prompt in prompts[:1]:
            start = time.perf_counter()
            _, stats = speculative_generate(model, input_ids=prompt, exit_layer="auto", num_draft_tokens=n,
                                            max_new_tokens=args.new_tokens, return_stats=True)
            calib = stats.calibration
            out.append({"num_draft_tokens": n, "exit_layer": stats.exit_layer, "seconds_with_calibration":
                        time.perf_counter() - start, "alpha": calib["alpha"],
                        "predicted_speedup": {k: v / calib["predicted_plain_tokens_per_s"]
                                              for k, v in calib["predicted_tokens_per_s"].items()}})
    return {"auto": out}


def fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def report(name, command, results, path):
    lines = [f"# Self-speculative decoding ({name}, benchmarks/speculative_decoding.py)", "",
             f"Command: `{command}`  ", f"Machine: `{results['machine']}`", ""]
    main, other = results["models"][0], results["models"][1:]
    lines += [
        f"Model: `{main['dir']}` ({main['num_layers']} blocks); prompts: {results['prompts']} held-out prompts of "
        f"{results['prompt_tokens']} tokens, {results['new_tokens']} new tokens each, batch 1, greedy, float32. "
        f"Speed-up = median over {results['repeats']} interleaved repeats of (method tokens/s / plain `generate` "
        "tokens/s) in the same repeat (greedy: the same tokens, so the time ratio); sampling rows against "
        "`generate(do_sample=True)`. `identical` = every prompt's greedy output equals plain `generate` token for "
        "token.", ""]
    header = "| method | k | n | tokens/s | speed-up | acceptance | identical |"
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | :---: |"
    if other:
        header += f" {other[0]['label']} acceptance | {other[0]['label']} speed-up |"
        sep += " ---: | ---: |"
    lines += [header, sep]
    compare = {(r["method"], r["exit_layer"], r["num_draft_tokens"]): r for r in other[0]["rows"]} if other else {}
    for row in main["rows"]:
        if row["error"]:
            cells = f"| {row['method']} | {fmt(row['exit_layer'], '{}')} | {fmt(row['num_draft_tokens'], '{}')} | " \
                    f"error: {row['error']} | | | |"
        else:
            cells = (f"| {row['method']} | {fmt(row['exit_layer'], '{}')} | {fmt(row['num_draft_tokens'], '{}')} | "
                     f"{row['tokens_per_s']:.1f} | **{row['speedup_median']:.2f}x** | "
                     f"{fmt(row.get('acceptance_rate'))} | "
                     f"{'-' if row['identical'] is None else ('yes' if row['identical'] else 'NO')} |")
        if other:
            c = compare.get((row["method"], row["exit_layer"], row["num_draft_tokens"]), {})
            cells += f" {fmt(c.get('acceptance_rate'))} | " + (
                f"{c['speedup_median']:.2f}x |" if c.get("speedup_median") is not None else "- |")
        lines.append(cells)
    lines += ["", "Teacher-forced agreement alpha_k on held-out text (128-token windows; the fraction of positions where "
              "the shared head on block k's output has the full model's argmax: the greedy acceptance rate a k-block "
              "draft would have on real text):", "",
              "| model | positions | " + " | ".join(f"k={k}" for k in main["teacher_forced"]["alpha"]) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in main["teacher_forced"]["alpha"]) + " |"]
    for model in results["models"]:
        tf = model["teacher_forced"]
        lines.append(f"| {model['label']} | {tf['positions']} | " + " | ".join(f"{v:.2f}" for v in tf["alpha"].values())
                     + " |")
    for model in results["models"]:
        if model.get("auto"):
            lines += ["", f"`exit_layer=\"auto\"` on `{model['dir']}` (calibration on the first prompt):", "",
                      "| n | chosen k | alpha_k (greedy agreement of block k with the full model) | "
                      "predicted speed-up per k | seconds incl. calibration |", "| ---: | ---: | --- | --- | ---: |"]
            for a in model["auto"]:
                alpha = ", ".join(f"{k}: {v:.2f}" for k, v in a["alpha"].items())
                pred = ", ".join(f"{k}: {v:.2f}" for k, v in a["predicted_speedup"].items())
                lines.append(f"| {a['num_draft_tokens']} | {a['exit_layer']} | {alpha} | {pred} | "
                             f"{a['seconds_with_calibration']:.2f} |")
    lines += ["", "Raw per-repeat times and ratios: the .json beside this file."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--compare-dir", default=None, help="the standard-trained model (same grid)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--aee-draft-tokens", type=int, nargs="+", default=[4])
    parser.add_argument("--sample-draft-tokens", type=int, nargs="*", default=[4],
                        help="n of the sampling rows (do_sample=True, generate's default top_k=50); none: no rows")
    parser.add_argument("--agreement-texts", type=int, default=8, help="held-out texts for teacher-forced alpha_k")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-auto", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.name or os.path.basename(os.path.normpath(args.model_dir))
    command = "python benchmarks/speculative_decoding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"machine": machine_info(), "command": command, "repeats": args.repeats, "new_tokens": args.new_tokens,
               "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "models": []}
    for model_dir in (args.model_dir, args.compare_dir):
        if model_dir is None:
            continue
        label = os.path.basename(os.path.normpath(model_dir))
        print(f"{label}: {model_dir}", flush=True)
        model, tokenizer = load(model_dir)
        prompts = prompts_for(tokenizer, args.prompts, args.prompt_tokens)
        entry = {"label": label, "dir": model_dir, "num_layers": model.config.num_hidden_layers,
                 "teacher_forced": teacher_forced_agreement(model, tokenizer, args.agreement_texts, 128),
                 **run_grid(model, prompts, args, print)}
        if not args.no_auto:
            entry.update(auto_choice(model, prompts, args))
        results["models"].append(entry)
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"speculative_decoding_{name}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    report(name, command, results, base + ".md")
    print(open(base + ".md").read())


if __name__ == "__main__":
    main()
