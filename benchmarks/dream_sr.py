"""Benchmark: DREAM vs standard diffusion training for 4x super-resolution of real photos, on CPU.

Claims tested (DREAM paper, CVPR 2024): (a) DREAM reaches standard training's final PSNR in at most half the
training steps; (b) DREAM sampled with 10x fewer steps is at least as good as standard with the full count.

Setup (identical for both methods; only the DREAM exponent p differs: p = 1 vs p = inf = standard):
photos shipped with scikit-learn / scikit-image; train on china.jpg, astronaut, coffee, rocket; evaluate on
256 fixed 32x32 crops of the held-out flower.jpg and chelsea photos. HR 32x32 random crops, LR 8x8 by
antialiased bicubic down-sampling; tiny SR3 UNet (concat conditioning); the model diffuses the residual over the
bicubic up-sample (scaled by --residual-scale); L1 loss; AdamW with warm-up + cosine decay; EMA of weights;
several seeds per method. Intermediate evaluations (EMA weights, DDIM with --eval-steps steps) on the first
--eval-subset crops; final evaluation on all 256 crops for several sampler step counts (DDPM and DDIM).

Usage:
    python benchmarks/dream_sr.py                  # full run (writes benchmarks/results/dream_sr.{md,json,png})
    python benchmarks/dream_sr.py --summarize-only # rebuild the report from benchmarks/results/dream_sr_runs/
Each training run uses one thread (torch.set_num_threads(1)); --workers runs pair standard/DREAM of a seed
concurrently so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def build_datasets(tile: int = 64, stride: int = 48, n_eval: int = 256, crop: int = 32, seed: int = 1234):
    import datasets
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    names = [os.path.basename(f) for f in sk.filenames]
    china, flower = sk.images[names.index("china.jpg")], sk.images[names.index("flower.jpg")]
    train_imgs = [china, skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    eval_imgs = [flower, skdata.chelsea()]
    tiles = []
    for im in train_imgs:
        h, w = im.shape[:2]
        for i in range(0, h - tile + 1, stride):
            for j in range(0, w - tile + 1, stride):
                tiles.append(np.ascontiguousarray(im[i : i + tile, j : j + tile]))
    rng = np.random.default_rng(seed)
    crops = []
    for k in range(n_eval):
        im = eval_imgs[k % len(eval_imgs)]
        i = rng.integers(0, im.shape[0] - crop + 1)
        j = rng.integers(0, im.shape[1] - crop + 1)
        crops.append(np.ascontiguousarray(im[i : i + crop, j : j + crop]))
    feats = datasets.Features({"image": datasets.Image()})
    return (datasets.Dataset.from_dict({"image": tiles}, features=feats),
            datasets.Dataset.from_dict({"image": crops}, features=feats))


def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DDPMScheduler

    from hf_align.diffusion import sr_unet
    from hf_align.trainers.dream_config import DREAMTrainingArguments
    from hf_align.trainers.dream_trainer import DREAMTrainer

    method, seed = cfg["method"], cfg["seed"]
    p = 1.0 if method == "dream" else math.inf
    train_ds, eval_ds = build_datasets()
    torch.manual_seed(seed)
    unet = sr_unet(block_out_channels=tuple(cfg["blocks"]), norm_num_groups=8, layers_per_block=1)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg["beta_schedule"], prediction_type=cfg["prediction_type"],
                          clip_sample=cfg["clip"] > 0, clip_sample_range=cfg["clip"] if cfg["clip"] > 0 else 1.0)
    args = DREAMTrainingArguments(
        output_dir=os.path.join(cfg["tmp"], f"{method}_{seed}"), max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch"], per_device_eval_batch_size=128, learning_rate=cfg["lr"],
        lr_scheduler_type="cosine", warmup_steps=cfg["warmup"], weight_decay=0.0, report_to=[],
        logging_steps=50, save_strategy="no", eval_strategy="steps", eval_steps=cfg["eval_every"],
        eval_on_start=True, eval_max_samples=cfg["eval_subset"], eval_num_inference_steps=cfg["eval_steps"],
        eval_scheduler="ddim", dream_detail_preservation=p, loss_type="l1", crop_size=32, scale_factor=4,
        residual=True, residual_scale=cfg["residual_scale"], use_ema=True, ema_decay=cfg["ema_decay"],
        use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    tr = DREAMTrainer(model=unet, args=args, train_dataset=train_ds, eval_dataset=eval_ds, noise_scheduler=sched)
    t0 = time.perf_counter()
    tr.train()
    total = time.perf_counter() - t0
    curve = [{"step": h["step"], "psnr": h["eval_psnr"], "ssim": h["eval_ssim"], "bicubic_psnr": h["eval_bicubic_psnr"],
              "bicubic_ssim": h["eval_bicubic_ssim"]} for h in tr.state.log_history if "eval_psnr" in h]
    losses = [{"step": h["step"], "loss": h["loss"]} for h in tr.state.log_history if "loss" in h]
    final = []
    for sampler in ("ddpm", "ddim"):
        for n in cfg["final_steps"]:
            m = tr.evaluate_sr(num_inference_steps=n, scheduler=sampler)
            final.append({"sampler": sampler, "steps": n, **{k: m[k] for k in ("psnr", "ssim", "bicubic_psnr",
                                                                                 "bicubic_ssim", "num_samples")}})
    out = {"method": method, "seed": seed, "p": None if math.isinf(p) else p, "config": cfg, "curve": curve,
           "losses": losses, "final": final, "train_wall_s": tr.train_wall_time,
           "sec_per_step": tr.train_wall_time / cfg["steps"], "total_wall_s": total}
    runs_dir = os.path.join(cfg["out_dir"], "dream_sr_runs")
    os.makedirs(runs_dir, exist_ok=True)
    with open(os.path.join(runs_dir, f"{method}_seed{seed}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"[done] {method} seed {seed}: final curve psnr {curve[-1]['psnr']:.2f} "
          f"(bicubic {curve[-1]['bicubic_psnr']:.2f}), {tr.train_wall_time:.0f}s train", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- summary
def _first_step(curve, thr):
    for c in curve:
        if c["psnr"] >= thr:
            return c["step"]
    return None


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "never"
    return f"{np.mean(xs):.0f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.0f}"


def summarize(cmd: str, out_dir: str = RESULTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_dir = os.path.join(out_dir, "dream_sr_runs")
    runs = [json.load(open(os.path.join(runs_dir, f))) for f in sorted(os.listdir(runs_dir)) if f.endswith(".json")]
    by = {m: sorted([r for r in runs if r["method"] == m], key=lambda r: r["seed"]) for m in ("standard", "dream")}
    if not by["standard"] or not by["dream"]:
        raise SystemExit("need runs of both methods in " + runs_dir)
    steps = [c["step"] for c in by["standard"][0]["curve"]]
    bic = by["standard"][0]["curve"][0]["bicubic_psnr"]
    bic_ssim = by["standard"][0]["curve"][0]["bicubic_ssim"]

    def curve_arr(m, key):
        return np.array([[c[key] for c in r["curve"]] for r in by[m]], dtype=np.float64)

    L = []
    L.append("# DREAM vs standard training: 4x diffusion super-resolution on CPU\n")
    L.append(f"Command: `{cmd}`\n")
    cfg = by["standard"][0]["config"]
    L.append(f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} logical CPUs (shared with other jobs), Python {sys.version.split()[0]}; one torch "
             f"thread per run, {cfg['workers']} runs at a time (standard and DREAM of a seed side by side).\n")
    L.append(f"Config: {json.dumps({k: v for k, v in cfg.items() if k not in ('tmp', 'out_dir')})}\n")
    L.append(f"Seeds per method: standard {[r['seed'] for r in by['standard']]}, DREAM {[r['seed'] for r in by['dream']]}. "
             f"Eval: first {cfg['eval_subset']} of 256 held-out crops during training (DDIM {cfg['eval_steps']} steps, "
             "EMA weights), all 256 at the end. PSNR/SSIM from scikit-image (data range 1, Gaussian SSIM sigma 1.5).\n")

    L.append("\n## PSNR / SSIM over training steps (mean ± std over seeds; eval subset, DDIM, EMA)\n")
    L.append(f"Bicubic on the same crops: PSNR {bic:.2f} dB, SSIM {bic_ssim:.4f}.\n")
    L.append("| step | standard PSNR | DREAM PSNR | standard SSIM | DREAM SSIM |")
    L.append("|---:|---:|---:|---:|---:|")
    sp, dp = curve_arr("standard", "psnr"), curve_arr("dream", "psnr")
    ss, ds_ = curve_arr("standard", "ssim"), curve_arr("dream", "ssim")
    for k, s in enumerate(steps):
        L.append(f"| {s} | {sp[:, k].mean():.2f} ± {sp[:, k].std(ddof=1):.2f} | {dp[:, k].mean():.2f} ± "
                 f"{dp[:, k].std(ddof=1):.2f} | {ss[:, k].mean():.4f} | {ds_[:, k].mean():.4f} |")

    # steps-to-threshold
    std_final = float(sp[:, -1].mean())
    L.append("\n## Steps to threshold (mean ± std over seeds; 'never' = not reached within the run)\n")
    sec = {m: [r["sec_per_step"] for r in by[m]] for m in by}
    L.append(f"Training seconds per step (median over seeds): standard {np.median(sec['standard']):.3f}, "
             f"DREAM {np.median(sec['dream']):.3f} (ratio {np.median(sec['dream']) / np.median(sec['standard']):.2f}x).\n")
    L.append("| threshold | method | steps | wall-clock s (training only) | reached by |")
    L.append("|---|---|---:|---:|---:|")
    thr_rows = {}
    for name, thr in ((f"above bicubic ({bic:.2f} dB)", bic), (f"standard's final PSNR ({std_final:.2f} dB)", std_final)):
        for m in ("standard", "dream"):
            st = [_first_step(r["curve"], thr) for r in by[m]]
            wc = [None if s is None else s * r["sec_per_step"] for s, r in zip(st, by[m])]
            thr_rows[(name, m)] = st
            L.append(f"| {name} | {m} | {_ms(st)} | {_ms(wc)} | {sum(s is not None for s in st)}/{len(st)} |")

    # equal wall-clock
    L.append("\n## Equal wall-clock\n")
    s_rate, d_rate = float(np.median(sec["standard"])), float(np.median(sec["dream"]))
    t_std_total = cfg["steps"] * s_rate
    d_steps_in_std_time = t_std_total / d_rate
    d_interp = float(np.interp(d_steps_in_std_time, steps, dp.mean(0)))
    L.append(f"Standard training's {cfg['steps']} steps take {t_std_total:.0f} s (median rate). In that time DREAM "
             f"does ~{d_steps_in_std_time:.0f} steps and reaches {d_interp:.2f} dB (its mean curve, interpolated) vs "
             f"standard's final {std_final:.2f} dB. The wall-clock column of the threshold table above gives the "
             "time each method needs to reach each threshold.\n")

    # final sampling-step grid
    L.append("\n## Final evaluation on all 256 held-out crops, by sampler and number of sampling steps\n")
    L.append(f"Bicubic: PSNR {by['standard'][0]['final'][0]['bicubic_psnr']:.2f} dB, SSIM "
             f"{by['standard'][0]['final'][0]['bicubic_ssim']:.4f}.\n")
    L.append("| sampler | steps | standard PSNR | DREAM PSNR | standard SSIM | DREAM SSIM |")
    L.append("|---|---:|---:|---:|---:|---:|")
    grid = {}
    for k, e in enumerate(by["standard"][0]["final"]):
        vals = {m: np.array([[r["final"][k]["psnr"], r["final"][k]["ssim"]] for r in by[m]]) for m in by}
        grid[(e["sampler"], e["steps"])] = vals
        L.append(f"| {e['sampler']} | {e['steps']} | {vals['standard'][:, 0].mean():.2f} ± {vals['standard'][:, 0].std(ddof=1):.2f}"
                 f" | {vals['dream'][:, 0].mean():.2f} ± {vals['dream'][:, 0].std(ddof=1):.2f} | "
                 f"{vals['standard'][:, 1].mean():.4f} | {vals['dream'][:, 1].mean():.4f} |")

    spread = max(float(np.ptp([v[m][:, 0].mean() for v in grid.values()])) for m in ("standard", "dream"))
    L.append(f"\nLargest PSNR difference across samplers and step counts (per method, seed means): {spread:.3f} dB.\n")

    # verdicts
    L.append("\n## The paper's claims here\n")
    half = cfg["steps"] / 2
    d_reach = thr_rows[(f"standard's final PSNR ({std_final:.2f} dB)", "dream")]
    ok_a = all(s is not None and s <= half for s in d_reach)
    L.append(f"- (a) DREAM reaches standard's final PSNR ({std_final:.2f} dB) within half the steps ({half:.0f}): "
             f"{'REPRODUCED' if ok_a else 'NOT reproduced'} (DREAM first reaches it at steps {d_reach}).")
    full, few = max(cfg["final_steps"]), max(cfg["final_steps"]) // 10
    verdict_b = []
    for sampler in ("ddpm", "ddim"):
        if (sampler, few) in grid and (sampler, full) in grid:
            d_few = grid[(sampler, few)]["dream"][:, 0].mean()
            s_full = grid[(sampler, full)]["standard"][:, 0].mean()
            verdict_b.append(f"{sampler}: DREAM@{few} {d_few:.2f} dB vs standard@{full} {s_full:.2f} dB -> "
                             f"{'holds' if d_few >= s_full else 'does not hold'}")
    if spread < 0.05:
        verdict_b.append(f"DEGENERATE here: PSNR varies by only {spread:.3f} dB across samplers and step counts, so "
                         "the models' outputs do not depend on the sampling path and this is no evidence for or "
                         "against the claim")
    L.append("- (b) DREAM with 10x fewer sampling steps >= standard with the full count: " + "; ".join(verdict_b) + ".")
    L.append("\nSee docs/dream.md for the discussion of why.\n")

    # plot
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, col in (("standard", "C0"), ("dream", "C3")):
        a = curve_arr(m, "psnr")
        ax[0].plot(steps, a.mean(0), color=col, label=m)
        ax[0].fill_between(steps, a.mean(0) - a.std(0, ddof=1), a.mean(0) + a.std(0, ddof=1), color=col, alpha=0.2)
        a2 = curve_arr(m, "ssim")
        ax[1].plot(steps, a2.mean(0), color=col, label=m)
        ax[1].fill_between(steps, a2.mean(0) - a2.std(0, ddof=1), a2.mean(0) + a2.std(0, ddof=1), color=col, alpha=0.2)
        for sampler, ls in (("ddpm", "-"), ("ddim", "--")):
            ks = sorted(n for (s_, n) in grid if s_ == sampler)
            ax[2].plot(ks, [grid[(sampler, n)][m][:, 0].mean() for n in ks], ls, marker="o", color=col,
                       label=f"{m} {sampler}")
    for a_, val in ((ax[0], bic), (ax[1], bic_ssim), (ax[2], by["standard"][0]["final"][0]["bicubic_psnr"])):
        a_.axhline(val, color="k", ls=":", label="bicubic")
    ax[0].set(xlabel="training step", ylabel="PSNR (dB)", title="PSNR over training (DDIM, EMA)")
    ax[1].set(xlabel="training step", ylabel="SSIM", title="SSIM over training")
    ax[2].set(xlabel="sampling steps", ylabel="PSNR (dB)", xscale="log", title="final model, 256 crops")
    later = [k for k, st in enumerate(steps) if st >= steps[-1] * 0.1] or list(range(len(steps)))
    lo = min(curve_arr(m, "psnr")[:, later].min() for m in by)
    ax[0].set_ylim(lo - 0.2, max(bic, sp.max(), dp.max()) + 0.2)
    lo_s = min(curve_arr(m, "ssim")[:, later].min() for m in by)
    ax[1].set_ylim(lo_s - 0.002, max(bic_ssim, ss.max(), ds_.max()) + 0.002)
    ax[0].set_title("PSNR over training (DDIM, EMA; step 0 off-scale)")
    ax[2].set_xticks(sorted({n for (_, n) in grid}), [str(n) for n in sorted({n for (_, n) in grid})])
    ax[2].minorticks_off()
    for a_ in ax:
        a_.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "dream_sr.png"), dpi=110)
    with open(os.path.join(out_dir, "dream_sr.md"), "w") as f:
        f.write("\n".join(L) + "\n\n![curves](dream_sr.png)\n")
    with open(os.path.join(out_dir, "dream_sr.json"), "w") as f:
        json.dump({"command": cmd, "runs": runs}, f)
    print("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 32])
    ap.add_argument("--residual-scale", type=float, default=4.0)
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--eval-subset", type=int, default=128)
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--final-steps", type=int, nargs="+", default=[5, 10, 50])
    ap.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    ap.add_argument("--beta-schedule", default="linear")
    ap.add_argument("--clip", type=float, default=1.0,
                    help="clip the predicted x0 (the scaled residual) to [-clip, clip] in sampling, as SR3; 0 = off")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tmp", default="/tmp/dream_sr_bench")
    ap.add_argument("--out-dir", default=RESULTS, help="where dream_sr.{md,json,png} and dream_sr_runs/ go")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--command", default=None, help="with --summarize-only: the command that produced the runs")
    a = ap.parse_args()
    cmd = " ".join(["python benchmarks/dream_sr.py", *sys.argv[1:]])
    if a.summarize_only:
        summarize(a.command or cmd, a.out_dir)
        return
    cfg = dict(steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup, blocks=a.blocks, residual_scale=a.residual_scale,
               ema_decay=a.ema_decay, eval_every=a.eval_every, eval_subset=a.eval_subset, eval_steps=a.eval_steps,
               final_steps=a.final_steps, workers=a.workers, prediction_type=a.prediction_type,
               beta_schedule=a.beta_schedule, clip=a.clip, tmp=a.tmp, out_dir=a.out_dir)
    jobs = [dict(cfg, method=m, seed=s) for s in a.seeds for m in ("standard", "dream")]
    t0 = time.time()
    if a.workers > 1:
        with mp.get_context("spawn").Pool(a.workers) as pool:
            pool.map(run_one, jobs, chunksize=1)
    else:
        for j in jobs:
            run_one(j)
    print(f"total wall {time.time() - t0:.0f}s", flush=True)
    summarize(cmd, a.out_dir)


if __name__ == "__main__":
    main()
