"""Benchmark: the compiled path of self-speculative decoding on this CPU, against plain ``generate`` with the same
static cache, eager and compiled.

    python benchmarks/speculative_compiled.py --model-dir benchmarks/.cache/lm_decoding/llama8x256-scratch \
        [--batches 1 4] [--exit-layer 2] [--draft-tokens 3] [--repeats 5] [--texts debian-docs]

transformers compiles ``generate``'s decoding steps only on GPU-like devices (``_valid_auto_compile_criteria``);
on a CPU ``compile_config._compile_all_devices = True`` forces it, for plain ``generate`` and for hf-align alike.
Methods, every one on the same ragged left-padded held-out batches (greedy, ``min_new_tokens = max_new_tokens``):
plain ``generate`` with the dynamic cache (the baseline), with ``cache_implementation="static"``, static +
compiled; ``self_speculative`` at a fixed (k, n), static, eager and compiled. Repeat 0 compiles and warms up (its
time, minus the median steady time, is reported as the compile cost); speed-ups are medians over interleaved
repeats of baseline time / method time from the same repeat, with min-max. Writes
``benchmarks/results/speculative_compiled_<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine_info  # noqa: E402
from speculative_batched import batches_for, distinct  # noqa: E402
from speculative_decoding import load  # noqa: E402

METHODS = ["generate", "generate static", "generate static compiled", "speculative static",
           "speculative static compiled"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--prompt-batches", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exit-layer", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--texts", default="debian-docs", choices=["pydoc", "debian-docs"])
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    import hf_align

    name = a.name or os.path.basename(os.path.normpath(a.model_dir))
    model, tokenizer = load(a.model_dir)
    compile_config = transformers.CompileConfig(dynamic=False)
    compile_config._compile_all_devices = True
    gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
               pad_token_id=tokenizer.pad_token_id)
    spec = dict(custom_generate=hf_align.self_speculative, exit_layer=a.exit_layer, num_draft_tokens=a.draft_tokens)
    options = {
        "generate": {},
        "generate static": dict(cache_implementation="static"),
        "generate static compiled": dict(cache_implementation="static", compile_config=compile_config),
        "speculative static": dict(cache_implementation="static", **spec),
        "speculative static compiled": dict(cache_implementation="static", compile_config=compile_config, **spec),
    }
    results = []
    for batch in a.batches:
        data = batches_for(tokenizer, batch, a.prompt_batches, a.new_tokens, source=a.texts)
        references = [model.generate(input_ids=ids, attention_mask=mask, **gen) for ids, mask, _ in data]
        rec = {m: {"times": [], "ratios": [], "first": None, "identical": True, "accepted": 0, "drafted": 0,
                   "rejections": 0, "compiled": None, "tokens": []} for m in METHODS}
        for repeat in range(a.repeats + 1):
            base = None
            for method in METHODS:
                entry = rec[method]
                total = 0.0
                for (ids, mask, _), reference in zip(data, references):
                    kwargs = dict(input_ids=ids, attention_mask=mask, **gen, **options[method])
                    stats = None
                    if method.startswith("speculative"):
                        stats = hf_align.SpeculativeStats(exit_layer=a.exit_layer, num_draft_tokens=a.draft_tokens,
                                                          num_layers=model.config.num_hidden_layers)
                        kwargs["speculative_stats"] = stats
                    start = time.perf_counter()
                    out = model.generate(**kwargs)
                    total += time.perf_counter() - start
                    entry["identical"] &= bool(torch.equal(out, reference))
                    if repeat and stats is not None:
                        entry["accepted"] += stats.accepted
                        entry["drafted"] += stats.drafted
                        entry["rejections"] += stats.rejections
                        entry["compiled"] = stats.compiled
                    if repeat:
                        entry["tokens"] += out[:, ids.shape[1]:].tolist()
                if repeat == 0:
                    entry["first"] = total
                    continue
                entry["times"].append(total)
                if method == "generate":
                    base = total
                entry["ratios"].append(base / total)
        row = {"batch": batch, "methods": {}, "human_distinct2": distinct([c for _, _, cs in data for c in cs], 2)}
        tokens = batch * a.new_tokens * len(data)
        compiled_plain = statistics.median(rec["generate static compiled"]["times"])
        for method, entry in rec.items():
            steady = statistics.median(entry["times"])
            row["methods"][method] = {
                "tokens_per_s": tokens / steady, "speedup_median": statistics.median(entry["ratios"]),
                "speedup_min": min(entry["ratios"]), "speedup_max": max(entry["ratios"]),
                "vs_compiled_generate": compiled_plain / steady,
                "first_call_extra_s": entry["first"] - steady, "identical": entry["identical"],
                "acceptance": entry["accepted"] / entry["drafted"] if entry["drafted"] else None,
                "alpha": entry["accepted"] / (entry["accepted"] + entry["rejections"])
                if entry["accepted"] + entry["rejections"] else None,
                "compiled": entry["compiled"], "distinct2": distinct(entry["tokens"], 2)}
        results.append(row)
        print(json.dumps(row)[:800], flush=True)
    write(results, a, name)


def write(results, a, name):
    os.makedirs(a.out, exist_ok=True)
    command = "python benchmarks/speculative_compiled.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(a).items() if k != "out" and v is not None)
    with open(os.path.join(a.out, f"speculative_compiled_{name}.json"), "w") as f:
        json.dump({"command": command, "machine": machine_info(), "results": results}, f, indent=1)
    lines = [f"# The compiled path on this CPU: {name}", "", f"Command: `{command}`", "",
             f"Greedy, {a.new_tokens} new tokens, k={a.exit_layer}, n={a.draft_tokens}, {a.repeats} interleaved "
             "repeats after one compiling/warm-up repeat. Speed-up: median of plain `generate` (dynamic cache) time "
             "/ method time (min-max); `vs compiled generate`: plain `generate` static + compiled time / method "
             "time; `first-call extra`: the first repeat's time minus the steady median (compilation). "
             "`identical`: token for token equal to plain `generate` on every prompt, every repeat.", "",
             "| batch | method | tok/s | speed-up (min-max) | vs compiled generate | first-call extra | identical | "
             "alpha | distinct-2 |", "|---:|---|---:|---|---:|---:|---|---:|---:|"]
    for row in results:
        for method, m in row["methods"].items():
            alpha = "" if m["alpha"] is None else f"{m['alpha']:.2f}"
            lines.append(f"| {row['batch']} | {method} | {m['tokens_per_s']:.0f} | {m['speedup_median']:.2f}x "
                         f"({m['speedup_min']:.2f}-{m['speedup_max']:.2f}) | {m['vs_compiled_generate']:.2f}x | "
                         f"{m['first_call_extra_s']:.1f} s | {'yes' if m['identical'] else 'NO'} | {alpha} | "
                         f"{m['distinct2']:.2f} |")
        lines.append(f"| {row['batch']} | human continuation | | | | | | | {row['human_distinct2']:.2f} |")
    lines += ["", f"Machine: {json.dumps(machine_info())}"]
    with open(os.path.join(a.out, f"speculative_compiled_{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
