"""One command for a GPU: train what it needs from scratch on the device, then measure the claims that depend on it.

    python benchmarks/gpu_suite.py              # on one large GPU: about 5-8 minutes; writes benchmarks/results/gpu_suite.md
    python benchmarks/gpu_suite.py --smoke      # tiny sizes on CPU in seconds (run by the tests)

Sections (each a ratio against a baseline measured in the same run, median of interleaved repeats, with the spread):

1. **Self-speculative decoding** of an aligned Llama trained here (the Python Language Reference shipped with CPython,
   PSF License; byte-level BPE): ``generate(custom_generate=hf_align.self_speculative)`` vs plain ``generate`` with
   the dynamic cache, vs plain ``generate`` with ``cache_implementation="static"`` (which transformers compiles on a
   GPU; so does hf-align, at the (k, n) the automatic choice settles on), vs ``assistant_early_exit`` (batch 1 only: transformers' assisted decoding is batch-1). Batch 1 and 8,
   bf16, greedy; outputs compared token for token with plain ``generate``.
2. **Early-exit classification throughput**: an aligned ViT on scikit-learn's digits, ``EarlyExitModel`` at
   threshold 0.9 vs the full forward (images/s).
3. **Streamed CKA throughput**: ``hf_align.layer_similarity(metric="cka")`` over the digits (samples/s).
4. **Step costs**: an aligned training step vs a standard one (the LM), and a DREAM step vs a standard one (SR3 UNet).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine_info  # noqa: E402

FULL = dict(lm_layers=8, lm_hidden=512, lm_steps=1500, lm_batch=32, block=128, vit_steps=600, vit_hidden=128,
            vit_layers=6, repeats=5, new_tokens=64, dream_blocks=(64, 128, 256), dream_batch=32, step_repeats=5,
            dream_steps=5, aligned_steps=6)
SMOKE = dict(lm_layers=2, lm_hidden=32, lm_steps=2, lm_batch=4, block=32, vit_steps=1, vit_hidden=32, vit_layers=2,
             repeats=1, new_tokens=4, dream_blocks=(8, 16, 16), dream_batch=1, step_repeats=1, dream_steps=1,
             aligned_steps=1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def train_lm(cfg, device, dtype, tmp, log):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_align import AlignedTrainer, AlignedTrainingArguments
    from hf_align.data import lm_blocks, load_python_docs_texts, train_bpe_tokenizer

    texts = load_python_docs_texts()
    tokenizer = train_bpe_tokenizer(texts["train"], vocab_size=4096, model_max_length=cfg["block"])
    train = lm_blocks(texts["train"], tokenizer, cfg["block"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg["lm_hidden"], intermediate_size=4 * cfg["lm_hidden"],
                         num_hidden_layers=cfg["lm_layers"], num_attention_heads=8 if cfg["lm_hidden"] >= 64 else 2,
                         max_position_embeddings=4 * cfg["block"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    args = AlignedTrainingArguments(
        output_dir=os.path.join(tmp, "lm"), report_to=[], save_strategy="no", max_steps=cfg["lm_steps"],
        per_device_train_batch_size=cfg["lm_batch"], learning_rate=2e-3, warmup_steps=max(1, cfg["lm_steps"] // 20),
        lr_scheduler_type="cosine", weight_decay=0.1, early_exit_curriculum="gradual", disable_tqdm=True,
        bf16=device.type == "cuda", use_cpu=device.type == "cpu", dataloader_num_workers=0, logging_steps=50)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    seconds, _ = timed(trainer.train, device)
    log(f"LM trained: {cfg['lm_steps']} steps in {seconds:.0f} s")
    step_cost = aligned_step_cost(model, train, cfg, device, tmp)
    return model.to(device, dtype).eval(), tokenizer, texts, seconds, step_cost


def aligned_step_cost(model, train, cfg, device, tmp):
    """Seconds per optimizer step, aligned (linear weights) vs standard (last layer only), alternating."""
    from hf_align import AlignedTrainer, AlignedTrainingArguments

    times = {"aligned": [], "standard": []}
    for repeat in range(cfg["step_repeats"]):
        for scheme in (("aligned", "linear"), ("standard", "last"))[:: 1 if repeat % 2 == 0 else -1]:
            args = AlignedTrainingArguments(
                output_dir=os.path.join(tmp, "step"), report_to=[], save_strategy="no", max_steps=cfg["aligned_steps"],
                per_device_train_batch_size=cfg["lm_batch"], layer_weights=scheme[1], disable_tqdm=True,
                bf16=device.type == "cuda", use_cpu=device.type == "cpu", dataloader_num_workers=0)
            trainer = AlignedTrainer(model=model, args=args, train_dataset=train)
            seconds, _ = timed(trainer.train, device)
            times[scheme[0]].append(seconds / cfg["aligned_steps"])
    ratios = [a / s for a, s in zip(times["aligned"], times["standard"])]
    return {"aligned_s": statistics.median(times["aligned"]), "standard_s": statistics.median(times["standard"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def decoding(model, tokenizer, texts, cfg, device, log):
    import hf_align

    rows = []
    ids_all = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts["test"]]
    prompts = [ids[i:i + 32] for ids in ids_all for i in range(0, max(0, len(ids) - 32), 200)]
    L = model.config.num_hidden_layers
    for batch in (1, 8):
        chunk = prompts[:batch]
        ids = torch.tensor(chunk, device=device)
        mask = torch.ones_like(ids)
        gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=cfg["new_tokens"], do_sample=False,
                   min_new_tokens=cfg["new_tokens"], pad_token_id=tokenizer.pad_token_id)
        reference = model.generate(**gen)
        # the compiled path gets the (k, n) the automatic choice settles on with the dynamic cache, so it compiles
        # one draft and one verify graph (an automatic choice would compile a pair for every (k, n) it tries)
        chosen = hf_align.SpeculativeStats(exit_layer=0, num_draft_tokens=0, num_layers=L)
        model.generate(**gen, custom_generate=hf_align.self_speculative, exit_layer="auto", speculative_stats=chosen)
        k_fixed, n_fixed = max(1, chosen.exit_layer), max(1, chosen.num_draft_tokens)
        log(f"decoding batch {batch}: the automatic choice settles on k={k_fixed}, n={n_fixed}")
        methods = {
            "generate (dynamic)": lambda gen=gen: model.generate(**gen),
            "generate (static, compiled on GPU)": lambda gen=gen: model.generate(**gen, cache_implementation="static"),
            "speculative (dynamic)": lambda gen=gen: model.generate(**gen, custom_generate=hf_align.self_speculative,
                                                            exit_layer="auto"),
            "speculative (static)": lambda gen=gen: model.generate(**gen, custom_generate=hf_align.self_speculative,
                                                           exit_layer="auto", cache_implementation="static",
                                                           disable_compile=True),
            "speculative (static, compiled on GPU)": lambda gen=gen, k=k_fixed, n=n_fixed: model.generate(
                **gen, custom_generate=hf_align.self_speculative, exit_layer=k, num_draft_tokens=n,
                cache_implementation="static"),
        }
        if batch == 1:
            methods["assistant_early_exit"] = lambda gen=gen: model.generate(**gen, assistant_early_exit=max(1, L // 4))
        times = {m: [] for m in methods}
        identical = {m: True for m in methods}
        errors = {}
        for repeat in range(cfg["repeats"] + 1):  # repeat 0: warm-up and compilation
            for name, fn in methods.items():
                if name in errors:
                    continue
                try:
                    seconds, out = timed(fn, device)
                except Exception as error:  # noqa: BLE001 - reported
                    errors[name] = f"{type(error).__name__}: {str(error)[:100]}"
                    continue
                if repeat:
                    times[name].append(seconds)
                    identical[name] &= bool(torch.equal(out, reference))
        base = times["generate (dynamic)"]
        static = times["generate (static, compiled on GPU)"]
        for name in methods:
            if name in errors:
                rows.append({"batch": batch, "method": name, "error": errors[name]})
                continue
            ratios = [b / t for b, t in zip(base, times[name])]
            vs_static = [s / t for s, t in zip(static, times[name])] if static else []
            rows.append({"batch": batch, "method": name, "tokens_per_s": batch * cfg["new_tokens"] /
                         statistics.median(times[name]), "vs_dynamic": statistics.median(ratios),
                         "vs_dynamic_min": min(ratios), "vs_dynamic_max": max(ratios),
                         "vs_static": statistics.median(vs_static) if vs_static else None,
                         "identical": identical[name]})
        log(f"decoding batch {batch}: " + ", ".join(f"{r['method']} {r.get('vs_dynamic', float('nan')):.2f}x"
                                                    for r in rows if r["batch"] == batch))
    return rows


def classification_and_cka(cfg, device, tmp, log):
    from transformers import ViTConfig, ViTForImageClassification

    import hf_align
    from hf_align import AlignedTrainer, AlignedTrainingArguments, EarlyExitModel
    from hf_align.data import load_digits_dataset

    data = load_digits_dataset(image_size=16)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1,
                                                hidden_size=cfg["vit_hidden"], num_hidden_layers=cfg["vit_layers"],
                                                num_attention_heads=4, intermediate_size=2 * cfg["vit_hidden"],
                                                num_labels=10))
    args = AlignedTrainingArguments(output_dir=os.path.join(tmp, "vit"), report_to=[], save_strategy="no",
                                    max_steps=cfg["vit_steps"], per_device_train_batch_size=64, learning_rate=1e-3,
                                    disable_tqdm=True, use_cpu=device.type == "cpu", dataloader_num_workers=0)
    AlignedTrainer(model=model, args=args, train_dataset=data["train"]).train()
    model = model.to(device).eval()
    pixels = torch.stack([torch.as_tensor(x) for x in data["test"]["pixel_values"]]).to(device)
    exit_model = EarlyExitModel(model, threshold=0.9)
    times = {"full forward": [], "early exit (threshold 0.9)": []}
    layers = []
    for repeat in range(cfg["repeats"] + 1):
        with torch.no_grad():
            t_full, _ = timed(lambda: model(pixel_values=pixels), device)
            t_exit, out = timed(lambda: exit_model(pixel_values=pixels), device)
        if repeat:
            times["full forward"].append(t_full)
            times["early exit (threshold 0.9)"].append(t_exit)
            layers.append(float(out.exit_layers.float().mean()) if hasattr(out, "exit_layers") else float("nan"))
    ratios = [f / e for f, e in zip(times["full forward"], times["early exit (threshold 0.9)"])]
    classification = {"images": len(pixels), "full_images_per_s": len(pixels) / statistics.median(times["full forward"]),
                      "exit_images_per_s": len(pixels) / statistics.median(times["early exit (threshold 0.9)"]),
                      "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                      "mean_exit_layer": statistics.median(layers) if layers else None}
    cka_times = []
    warnings.filterwarnings("ignore", message=".*constant.*")  # the embedding layer's CLS row is constant
    for _ in range(cfg["repeats"]):
        seconds, _ = timed(lambda: hf_align.layer_similarity(model, data["test"], metric="cka", batch_size=256,
                                                             progress=False), device)
        cka_times.append(seconds)
    cka = {"samples": len(data["test"]), "samples_per_s": len(data["test"]) / statistics.median(cka_times),
           "seconds_min": min(cka_times), "seconds_max": max(cka_times)}
    log(f"early exit {classification['speedup']:.2f}x, CKA {cka['samples_per_s']:.0f} samples/s")
    return classification, cka


def dream_step_cost(cfg, device, log):
    import math

    import datasets
    from skimage import data as skdata

    from hf_align.diffusion import sr_unet
    from hf_align.trainers.dream_config import DREAMTrainingArguments
    from hf_align.trainers.dream_trainer import DREAMTrainer, SRPairCollator

    img = skdata.astronaut()
    batch = SRPairCollator(32, 4)([{"image": img[100 + 3 * i: 164 + 3 * i, 200:264]} for i in range(cfg["dream_batch"])])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    times = {}
    runs = {}
    for method, p in (("standard", math.inf), ("dream", 1.0)):
        torch.manual_seed(0)
        unet = sr_unet(block_out_channels=cfg["dream_blocks"], norm_num_groups=8).to(device)
        args = DREAMTrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=device.type == "cpu",
                                      dream_detail_preservation=p, use_ema=False, disable_tqdm=True)
        trainer = DREAMTrainer(model=unet, args=args, train_dataset=datasets.Dataset.from_dict({"image": [img[:64, :64]]}))
        runs[method] = (trainer, unet, torch.optim.AdamW(unet.parameters(), lr=1e-4))
        times[method] = []

    def step(method):
        trainer, unet, opt = runs[method]
        unet.train()
        loss = trainer.compute_loss(unet, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for method in runs:
        step(method)
    for repeat in range(cfg["step_repeats"]):
        for method in (("standard", "dream") if repeat % 2 == 0 else ("dream", "standard")):
            seconds, _ = timed(lambda m=method: [step(m) for _ in range(cfg["dream_steps"])], device)
            times[method].append(seconds / cfg["dream_steps"])
    ratios = [d / s for d, s in zip(times["dream"], times["standard"])]
    out = {"standard_s": statistics.median(times["standard"]), "dream_s": statistics.median(times["dream"]),
           "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    log(f"DREAM step {out['ratio']:.2f}x standard")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CPU, seconds)")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = SMOKE if a.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, texts, train_s, aligned_cost = train_lm(cfg, device, dtype, tmp, log)
        decode = decoding(model, tokenizer, texts, cfg, device, log)
        classification, cka = classification_and_cka(cfg, device, tmp, log)
        dream = dream_step_cost(cfg, device, log)
    info = machine_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    result = {"smoke": a.smoke, "device": str(device), "dtype": str(dtype), "config": {k: v for k, v in cfg.items()},
              "lm_train_seconds": train_s, "decoding": decode, "classification": classification, "cka": cka,
              "aligned_step": aligned_cost, "dream_step": dream, "total_seconds": time.perf_counter() - start,
              "machine": info}
    name = "gpu_suite_smoke" if a.smoke else "gpu_suite"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    lines = [f"# GPU suite{' (smoke run on CPU: sizes are tiny, numbers mean nothing)' if a.smoke else ''}", "",
             f"Command: `python benchmarks/gpu_suite.py{' --smoke' if a.smoke else ''}`; device {info.get('gpu', device)}, "
             f"{dtype}; total {result['total_seconds']:.0f} s (LM training {train_s:.0f} s).", "",
             "## Decoding (aligned Llama, greedy, 64 new tokens)", "",
             "| batch | method | tok/s | vs generate (dynamic) (min-max) | vs generate (static) | identical |",
             "|---:|---|---:|---|---:|---|"]
    for row in decode:
        if "error" in row:
            lines.append(f"| {row['batch']} | {row['method']} | | {row['error']} | | |")
            continue
        vs_static = f"{row['vs_static']:.2f}x" if row["vs_static"] is not None else ""
        lines.append(f"| {row['batch']} | {row['method']} | {row['tokens_per_s']:.0f} | {row['vs_dynamic']:.2f}x "
                     f"({row['vs_dynamic_min']:.2f}-{row['vs_dynamic_max']:.2f}) | {vs_static} | "
                     f"{'yes' if row['identical'] else 'NO'} |")
    c = classification
    lines += ["", "## Early-exit classification (aligned ViT, digits test split)", "",
              f"full forward {c['full_images_per_s']:.0f} images/s, early exit {c['exit_images_per_s']:.0f} images/s: "
              f"**{c['speedup']:.2f}x** ({c['speedup_min']:.2f}-{c['speedup_max']:.2f}).", "",
              "## Streamed CKA", "", f"{cka['samples_per_s']:.0f} samples/s over {cka['samples']} samples "
              f"(all layer pairs, float64 accumulation).", "",
              "## Step costs", "",
              f"- aligned LM step / standard step: **{aligned_cost['ratio']:.2f}x** "
              f"({aligned_cost['ratio_min']:.2f}-{aligned_cost['ratio_max']:.2f})",
              f"- DREAM step / standard step: **{dream['ratio']:.2f}x** ({dream['ratio_min']:.2f}-{dream['ratio_max']:.2f})",
              "", f"Machine: {json.dumps(info)}"]
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {os.path.join(a.out, name)}.md")
    return result


if __name__ == "__main__":
    main()
