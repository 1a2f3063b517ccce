"""Benchmark: self-speculative decoding through ``model.generate(custom_generate=...)`` on held-out text, at batch
1, 4 and 8, greedy and sampling, against plain ``generate`` at the same batch and transformers'
``assistant_early_exit``.

    python benchmarks/speculative_batched.py --model-dir benchmarks/.cache/lm/llama-aligned-gradual \
        [--batches 1 4 8] [--new-tokens 64] [--repeats 5] [--name llama-aligned]

Prompts: held-out topics of the Python Language Reference shipped with CPython (``pydoc_data.topics``, PSF
License; the topics the LM-training benchmark keeps out of training), cut at ragged lengths (24-48 tokens) and
left-padded, so batches carry real padding. Each repeat runs every method on the same batches, interleaved; a
method's speed-up is the median over repeats of (plain time / method time) from the same repeat, with the spread
(min-max over repeats). Greedy outputs are compared token for token with plain ``generate`` on every prompt.
Beside acceptance: distinct-2/4 of the generated text and of the human continuation of the same prompts.

**Predicted limit.** For self-speculative decoding at depth k with n drafts, the cost model of
``hf_align.generation.auto_exit`` (preamble, one block, head on 1 and n+1 positions, measured on the same batch)
and the measured acceptance alpha = accepted / (accepted + rejections) predict
``speed-up = E(alpha, n) / T(k, n) * t_plain`` with ``E = (1 - alpha^{n+1}) / (1 - alpha)``; the report gives
measured / predicted.
Writes ``benchmarks/results/speculative_batched_<name>.md`` and ``.json``.
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
from speculative_decoding import held_out_texts, load  # noqa: E402

MODES = {
    "greedy": dict(do_sample=False),
    # greedy text of a small model repeats itself (which flatters acceptance); a repetition penalty, as many users
    # decode, makes it non-degenerate, and shows the acceptance on such text (exactness is checked as for greedy)
    "greedy rep. penalty 1.3": dict(do_sample=False, repetition_penalty=1.3),
    "T=0.7": dict(do_sample=True, temperature=0.7, top_k=0),
    "T=1.0 top-p 0.9": dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0),
}


def distinct(token_lists: list[list[int]], n: int) -> float:
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def texts_for(source: str) -> list[str]:
    """Held-out documents: ``pydoc`` (the LM-training benchmark's held-out ``pydoc_data`` topics) or ``debian-docs``
    (the held-out documents of benchmarks/lm_continued_training.py, Debian's python3.11-doc sources)."""
    if source == "debian-docs":
        import lm_continued_training

        return lm_continued_training.load_texts()["test"]
    return held_out_texts()


def batches_for(tokenizer, batch: int, count: int, new_tokens: int, seed: int = 0, source: str = "pydoc"):
    """``count`` left-padded batches of ``batch`` prompts (ragged 24-48 tokens) + each prompt's human continuation."""
    import random

    rng = random.Random(seed)
    rows = []
    for text in texts_for(source):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 48 - new_tokens, 97):
            length = rng.randint(24, 48)
            rows.append((ids[start:start + length], ids[start + length:start + length + new_tokens]))
    rng.shuffle(rows)
    pad = tokenizer.pad_token_id
    out = []
    for b in range(count):
        chunk = rows[b * batch:(b + 1) * batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        out.append((ids, mask, [c for _, c in chunk]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--prompt-batches", type=int, default=2, help="batches per batch size")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--exit-layer", default="auto")
    ap.add_argument("--draft-tokens", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--texts", default="pydoc", choices=["pydoc", "debian-docs"],
                    help="held-out prompts: pydoc_data topics, or benchmarks/lm_continued_training.py's held-out documents")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hf_align
    from hf_align.generation.auto_exit import expected_tokens_per_round

    name = a.name or os.path.basename(os.path.normpath(a.model_dir))
    model, tokenizer = load(a.model_dir)
    L = model.config.num_hidden_layers
    k_opt = a.exit_layer if a.exit_layer == "auto" else int(a.exit_layer)
    n_opt = a.draft_tokens if a.draft_tokens == "auto" else int(a.draft_tokens)
    gen_base = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=tokenizer.pad_token_id)
    results = []
    for batch in a.batches:
        data = batches_for(tokenizer, batch, a.prompt_batches, a.new_tokens, source=a.texts)
        for mode in a.modes:
            gen = {**gen_base, **MODES[mode]}
            methods = ["generate", "generate static", "speculative", "speculative static"]
            if batch == 1:
                methods.append("assistant_early_exit")
            rec = {m: {"times": [], "ratios": [], "identical": True, "accepted": 0, "drafted": 0, "rejections": 0,
                       "tokens": [], "error": None, "calibration_s": 0.0, "k": [], "n": []} for m in methods}
            predicted, overhead_shares = [], []
            for repeat in range(a.repeats + 1):  # repeat 0 warms up (not timed)
                plain_time = None
                for method in methods:
                    entry = rec[method]
                    if entry["error"]:
                        continue
                    total = 0.0
                    try:
                        for ids, mask, _ in data:
                            torch.manual_seed(1000 * repeat + batch)
                            kwargs = dict(input_ids=ids, attention_mask=mask, **gen)
                            if method.endswith("static"):
                                kwargs["cache_implementation"] = "static"
                            stats = None
                            start = time.perf_counter()
                            if method.startswith("speculative"):
                                stats = hf_align.SpeculativeStats(exit_layer=0, num_draft_tokens=0, num_layers=L)
                                out = model.generate(**kwargs, custom_generate=hf_align.self_speculative,
                                                     exit_layer=k_opt, num_draft_tokens=n_opt, speculative_stats=stats)
                            elif method == "assistant_early_exit":
                                depth = rec["speculative"]["k"][-1] if rec["speculative"]["k"] else 1
                                out = model.generate(**kwargs, assistant_early_exit=depth, num_assistant_tokens=4)
                            else:
                                out = model.generate(**kwargs)
                            total += time.perf_counter() - start
                            if repeat == 0:
                                continue
                            if not gen.get("do_sample") and method != "generate":
                                reference = model.generate(input_ids=ids, attention_mask=mask, **gen)
                                entry["identical"] &= bool(torch.equal(out, reference))
                            entry["tokens"] += out[:, ids.shape[1]:].tolist()
                            if stats is not None:
                                entry["accepted"] += stats.accepted
                                entry["drafted"] += stats.drafted
                                entry["rejections"] += stats.rejections
                                entry["k"].append(stats.exit_layer)
                                entry["n"].append(stats.num_draft_tokens)
                                if stats.calibration:
                                    entry["calibration_s"] += stats.calibration["calibration_seconds"]
                                    if method == "speculative" and stats.calibration.get("costs_s"):
                                        chooser_costs = stats.calibration["costs_s"]
                                        k, n = stats.exit_layer, stats.num_draft_tokens
                                        alpha = stats.accepted / max(1, stats.accepted + stats.rejections)
                                        one, many = chooser_costs[1], chooser_costs[n + 1]
                                        t_round = ((n + 1) * (one["preamble"] + k * one["block"]) + n * one["head"]
                                                   + many["preamble"] + (L - k) * many["block"] + many["head"])
                                        t_plain = one["preamble"] + L * one["block"] + one["head"]
                                        predicted.append(expected_tokens_per_round(alpha, n) / t_round * t_plain)
                                        extra = (n + 1) * stats.calibration.get("overhead_per_position_s", 0.0)
                                        overhead_shares.append(extra / (t_round + extra))
                    except Exception as error:  # noqa: BLE001 - reported in the table (assistant_early_exit fails on some)
                        entry["error"] = f"{type(error).__name__}: {str(error)[:120]}"
                        continue
                    if repeat == 0:
                        continue
                    entry["times"].append(total)
                    if method == "generate":
                        plain_time = total
                    if plain_time is not None:
                        entry["ratios"].append(plain_time / total)
            human = [c for _, _, cs in data for c in cs]
            row = {"batch": batch, "mode": mode, "human_distinct2": distinct(human, 2),
                   "human_distinct4": distinct(human, 4), "methods": {}}
            tokens_total = batch * a.new_tokens * len(data)
            for method, entry in rec.items():
                ratios = entry["ratios"]
                row["methods"][method] = {
                    "error": entry["error"],
                    "tokens_per_s": tokens_total / statistics.median(entry["times"]) if entry["times"] else None,
                    "speedup_median": statistics.median(ratios) if ratios else None,
                    "speedup_min": min(ratios) if ratios else None, "speedup_max": max(ratios) if ratios else None,
                    "identical": entry["identical"] if not gen.get("do_sample") else None,
                    "acceptance": entry["accepted"] / entry["drafted"] if entry["drafted"] else None,
                    "alpha": entry["accepted"] / (entry["accepted"] + entry["rejections"])
                    if entry["accepted"] + entry["rejections"] else None,
                    "exit_layers": sorted(set(entry["k"])), "draft_counts": sorted(set(entry["n"])),
                    "calibration_share": entry["calibration_s"] / sum(entry["times"]) if entry["times"] else None,
                    "distinct2": distinct(entry["tokens"], 2), "distinct4": distinct(entry["tokens"], 4),
                }
            if predicted:
                row["predicted_speedup"] = statistics.median(predicted)
                measured = row["methods"]["speculative"]["speedup_median"]
                row["measured_over_predicted"] = measured / row["predicted_speedup"] if measured else None
                row["round_overhead_share"] = statistics.median(overhead_shares)
            results.append(row)
            print(json.dumps(row, default=str)[:600], flush=True)
    write(results, a, name)


def write(results, a, name):
    os.makedirs(a.out, exist_ok=True)
    command = "python benchmarks/speculative_batched.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(a).items() if k != "out")
    with open(os.path.join(a.out, f"speculative_batched_{name}.json"), "w") as f:
        json.dump({"command": command, "machine": machine_info(), "results": results}, f, indent=1, default=str)
    lines = [f"# Self-speculative decoding through `generate(custom_generate=...)`: {name}", "",
             f"Command: `{command}`", "",
             "Speed-up = median over interleaved repeats of plain-`generate` time / method time at the same batch "
             "(spread: min-max); tokens/s counts every row's new tokens. `static`: `cache_implementation=\"static\"` "
             "for both. Acceptance = accepted / drafted; alpha = accepted / (accepted + rejections) (the i.i.d. "
             "estimate); predicted = the cost model's speed-up at the measured alpha from the timed parts (preamble, "
             "blocks, head), without the rounds' own overhead (its share is given beside).", "",
             "| batch | mode | method | tok/s | speed-up (min-max) | identical | acceptance | alpha | k / n | "
             "calib. share | distinct-2 / 4 |",
             "|---:|---|---|---:|---|---|---:|---:|---|---:|---|"]
    for row in results:
        for method, m in row["methods"].items():
            if m["error"]:
                lines.append(f"| {row['batch']} | {row['mode']} | {method} | | {m['error']} | | | | | | |")
                continue
            fmt = lambda v, f="{:.2f}": "" if v is None else f.format(v)  # noqa: E731
            kn = f"{m['exit_layers']} / {m['draft_counts']}" if m["exit_layers"] else ""
            lines.append(
                f"| {row['batch']} | {row['mode']} | {method} | {fmt(m['tokens_per_s'], '{:.0f}')} | "
                f"{fmt(m['speedup_median'])}x ({fmt(m['speedup_min'])}-{fmt(m['speedup_max'])}) | "
                f"{'' if m['identical'] is None else ('yes' if m['identical'] else 'NO')} | {fmt(m['acceptance'])} | "
                f"{fmt(m['alpha'])} | {kn} | {fmt(m['calibration_share'], '{:.1%}')} | "
                f"{fmt(m['distinct2'])} / {fmt(m['distinct4'])} |")
        lines.append(f"| {row['batch']} | {row['mode']} | human continuation | | | | | | | | "
                     f"{row['human_distinct2']:.2f} / {row['human_distinct4']:.2f} |")
        if "predicted_speedup" in row:
            lines.append(f"| {row['batch']} | {row['mode']} | predicted (speculative) | | "
                         f"{row['predicted_speedup']:.2f}x (measured/predicted "
                         f"{row['measured_over_predicted']:.0%}; measured round overhead "
                         f"{row['round_overhead_share']:.0%} of a round) | | | | | | |")
    lines += ["", f"Machine: {json.dumps(machine_info())}"]
    with open(os.path.join(a.out, f"speculative_batched_{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
