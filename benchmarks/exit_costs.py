"""Benchmark: cost per exit depth (blocks, FLOPs counted vs analytic, latency, peak memory, throughput).

    python benchmarks/exit_costs.py [--repeats 7] [--threads 1]

One classifier and one causal LM, each measured by ``hf_align.exit_costs``:

* classifier: the architecture of the scipy-docs BERT of ``benchmarks/aligned_training.py`` (6 blocks, hidden
  128, 4 heads, intermediate 256, vocabulary 4,000, 8 labels); one forward of 32 x 64 tokens;
* LM: the Llama of ``benchmarks/lm_aligned_training.py`` (8 blocks, hidden 256, 4 heads, intermediate 1,024,
  vocabulary 4,096): one decoding step of batch 1 with a KV cache of 128 tokens, and one prompt forward of
  8 x 128 tokens. The trained model benchmarks/.cache/lm/llama-aligned is used when it is there (DONE file);
  otherwise the same architecture with random weights - costs do not depend on the weight values.

Writes benchmarks/results/exit_costs.md, exit_costs_classifier.png, exit_costs_lm_decode.png and
exit_costs_lm_forward.png. Latency: median of ``--repeats`` runs, the depths interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import CACHE, RESULTS, machine_info  # noqa: E402

# saved by benchmarks/lm_aligned_training.py (the committed results used its --export copy in /work/lmcache)
LM_DIR = os.path.join(os.environ.get("HF_ALIGN_LM_ROOT", os.path.join(CACHE, "lm")), "llama-aligned")


def classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=4000, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, pad_token_id=0, num_labels=8)
    return BertForSequenceClassification(config).eval(), "random weights (scipy-docs BERT architecture)"


def language_model():
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if any(os.path.exists(os.path.join(LM_DIR, f)) for f in ("DONE", "hf_align_benchmark.json")):  # export / cache
        model = AutoModelForCausalLM.from_pretrained(LM_DIR, use_safetensors=True, trust_remote_code=False)
        return model.eval(), f"trained weights from {LM_DIR}"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), "random weights (architecture of benchmarks/lm_aligned_training.py)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import hf_align

    os.makedirs(args.out, exist_ok=True)
    sections = []
    clf, clf_source = classifier()
    lm, lm_source = language_model()
    runs = [
        ("classifier", clf, clf_source, dict(batch_size=32, seq_len=64)),
        ("lm_decode", lm, lm_source, dict(mode="decode", batch_size=1, kv_length=128, seq_len=128)),
        ("lm_forward", lm, lm_source, dict(mode="forward", batch_size=8, seq_len=128)),
    ]
    worst = 0.0
    for name, model, source, kwargs in runs:
        table = hf_align.exit_costs(model, repeats=args.repeats, **kwargs)
        worst = max(worst, max(table.column("flops_rel_err")))
        fig = table.plot(os.path.join(args.out, f"exit_costs_{name}.png"))
        plt.close(fig)
        sections.append(f"## {name.replace('_', ' ')}: {source}\n\n{table.to_markdown()}\n\n![](exit_costs_{name}.png)\n")
        print(table.to_markdown(), flush=True)
    info = machine_info()
    header = [
        "# Cost per exit depth",
        "",
        f"Command: `python benchmarks/exit_costs.py --repeats {args.repeats} --threads {args.threads}` "
        f"(git {info['git']}, torch {info['torch']}, {info['cores']} cores, {args.threads} thread(s), shared machine).",
        "",
        "Made by `hf_align.exit_costs` (docs/generation.md, \"Cost per exit\"). FLOPs: counted by "
        "`torch.utils.flop_counter.FlopCounterMode` during the exit-at-l call vs the shape-analytic count "
        f"(embeddings included, head once at the exit); largest relative difference over all rows: {worst:.3%}. "
        "Latency: median of the repeats, depths interleaved. Peak memory: tensors created during the call "
        "(weights, inputs and the pre-filled KV cache excluded). Speed-up = latency at full depth / latency at l.",
        "",
    ]
    with open(os.path.join(args.out, "exit_costs.md"), "w") as f:
        f.write("\n".join(header) + "\n" + "\n".join(sections))


if __name__ == "__main__":
    main()
