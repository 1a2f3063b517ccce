"""Benchmark: diffusion super-resolution of textured real photographs with the default recipe, and DREAM vs
standard training measured where both beat bicubic.

Photographs (all ship with scikit-image / scikit-learn, so nothing is downloaded; sources and licences are in
``PHOTOS`` below and in the report). Training: random crops of the training photos. Held-out: fixed random crops
of photos never seen in training, chosen for texture (bicubic PSNR <= 30 dB on them).

What it measures, for each method (DREAM p = 1, the default, vs standard training p = inf; everything else the
same, 3 seeds each):

* PSNR / SSIM over training (EMA weights, the recipe's evaluation sampler) and the training wall-clock;
* steps and wall-clock to reach bicubic and to reach standard's final PSNR and SSIM;
* PSNR / SSIM at equal training wall-clock;
* the final models on all held-out crops by sampler (DDIM, DDPM) and number of sampling steps (the paper's
  "fewer sampling steps" claim), beside the cost per training step.

``--prediction-types`` trains one seed per prediction type (epsilon, v, x0) with standard training: the table that
chose the recipe's default.

Presets: ``cpu`` (default; about 20 minutes per run on one CPU thread) and ``gpu-paper``: the paper's scale (an
SR3-size UNet, epsilon prediction, 4x on 128x128 crops of the full photos, batch 32, SR3's 2000-step linear
schedule), to run when a GPU is at hand; its expected runtime is printed by ``--estimate`` (FLOPs counted on CPU).

Usage:
    python benchmarks/dream_sr.py                                   # DREAM vs standard, 3 seeds (cpu preset)
    python benchmarks/dream_sr.py --prediction-types --seeds 0     # epsilon / v / x0, standard training
    python benchmarks/dream_sr.py --prediction-types sample        # one type (the report covers all saved runs)
    python benchmarks/dream_sr.py --preset gpu-paper --estimate    # the GPU configuration and its expected time
    python benchmarks/dream_sr.py --preset gpu-paper --device cuda # run it on a GPU
    python benchmarks/dream_sr.py --summarize-only                 # rebuild the report from the saved runs
Each CPU run uses one torch thread; ``--workers 2`` runs standard and DREAM of a seed side by side so both see
the same machine load.
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

# name -> (loader, source and licence)
PHOTOS = {
    "china": ("sklearn:china.jpg", "scikit-learn sample image, Flickr user danielbuechele, CC BY 2.0"),
    "astronaut": ("skimage:astronaut", "NASA (Eileen Collins), public domain"),
    "chelsea": ("skimage:chelsea", "Stefan van der Walt, CC0"),
    "camera": ("skimage:camera", "Lav Varshney, CC0"),
    "brick": ("skimage:brick", "CC0Textures Bricks25, CC0"),
    "rocket": ("skimage:rocket", "SpaceX, public domain"),
    "hubble": ("skimage:hubble_deep_field", "NASA/HubbleSite, public domain"),
    "coins": ("skimage:coins", "Brooklyn Museum collection, no known copyright restrictions"),
    "ihc": ("skimage:immunohistochemistry", "CMMI, no known copyright restrictions"),
    "coffee": ("skimage:coffee", "Rachel Michetti (Pikolo Espresso Bar), CC0"),
    "gravel": ("skimage:gravel", "CC0Textures Gravel04, CC0"),
    "grass": ("skimage:grass", "DeviantArt linolafett Grass-01, CC0"),
}
TRAIN = ["china", "astronaut", "chelsea", "camera", "brick", "rocket", "hubble", "coins", "ihc"]
HELD_OUT = ["coffee", "gravel", "grass"]

PRESETS = {
    "cpu": dict(scale=2, crop=48, eval_crop=48, batch=12, steps=500, lr=3e-4, warmup=50, blocks=[32, 64, 64],
                layers_per_block=1, attention=False, timesteps=1000, beta_start=1e-4, beta_end=2e-2,
                eval_every=50, eval_subset=32, n_eval=128, eval_steps=None, final_steps=[1, 2, 5, 10, 20],
                ddpm_steps=[20], ema_decay=0.995, device="cpu", threads=1),
    "gpu-paper": dict(scale=4, crop=128, eval_crop=128, batch=32, steps=100_000, lr=1e-4, warmup=1000,
                      blocks=[64, 128, 256, 512, 512], layers_per_block=2, attention=True, timesteps=2000,
                      beta_start=1e-6, beta_end=1e-2, eval_every=5000, eval_subset=64, n_eval=256, eval_steps=None,
                      final_steps=[10, 20, 50, 100, 200, 1000], ddpm_steps=[100, 1000], ema_decay=0.9999,
                      device="cuda", threads=8, prediction_type="epsilon", bf16=True),
}


def load_photo(name: str) -> np.ndarray:
    """An (H, W, 3) uint8 photograph from the libraries' shipped data (grey images repeated to 3 channels)."""
    src, key = PHOTOS[name][0].split(":")
    if src == "sklearn":
        from sklearn.datasets import load_sample_images

        sk = load_sample_images()
        im = sk.images[[os.path.basename(f) for f in sk.filenames].index(key)]
    else:
        from skimage import data as skdata

        im = getattr(skdata, key)()
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=-1)
    return np.ascontiguousarray(im[..., :3].astype(np.uint8))


def build_datasets(crop: int, eval_crop: int, n_eval: int, seed: int = 1234):
    """Training tiles (1.5 x crop, stride crop / 2: the trainer random-crops inside them) and fixed held-out crops."""
    import datasets

    tile, stride = crop + crop // 2, max(crop // 2, 1)
    tiles = []
    for name in TRAIN:
        im = load_photo(name)
        for i in range(0, im.shape[0] - tile + 1, stride):
            for j in range(0, im.shape[1] - tile + 1, stride):
                tiles.append(np.ascontiguousarray(im[i : i + tile, j : j + tile]))
    rng = np.random.default_rng(seed)
    held = [load_photo(n) for n in HELD_OUT]
    crops = []
    for k in range(n_eval):
        im = held[k % len(held)]
        i = rng.integers(0, im.shape[0] - eval_crop + 1)
        j = rng.integers(0, im.shape[1] - eval_crop + 1)
        crops.append(np.ascontiguousarray(im[i : i + eval_crop, j : j + eval_crop]))
    feats = datasets.Features({"image": datasets.Image()})
    return (datasets.Dataset.from_dict({"image": tiles}, features=feats),
            datasets.Dataset.from_dict({"image": crops}, features=feats))


def make_args(cfg: dict, method: str, seed: int, output_dir: str):
    """DREAMTrainingArguments of one run: the library defaults, plus what the preset sets (scale, sizes, budget)."""
    from hf_align.trainers.dream_config import DREAMTrainingArguments

    kw = dict(
        output_dir=output_dir, max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
        per_device_eval_batch_size=32, learning_rate=cfg["lr"], warmup_steps=cfg["warmup"], report_to=[],
        logging_steps=50, save_strategy="no", eval_strategy="steps", eval_steps=cfg["eval_every"],
        eval_on_start=True, eval_max_samples=cfg["eval_subset"], crop_size=cfg["crop"], scale_factor=cfg["scale"],
        ema_decay=cfg["ema_decay"], num_train_timesteps=cfg["timesteps"], beta_start=cfg["beta_start"],
        beta_end=cfg["beta_end"], use_cpu=cfg["device"] == "cpu", seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0,
        dream_detail_preservation=1.0 if method == "dream" else math.inf, bf16=bool(cfg.get("bf16", False)),
    )
    if cfg.get("prediction_type"):
        kw["prediction_type"] = cfg["prediction_type"]
    if cfg.get("residual_scale"):
        kw["residual_scale"] = cfg["residual_scale"]
    if cfg.get("eval_steps"):
        kw["eval_num_inference_steps"] = cfg["eval_steps"]
    return DREAMTrainingArguments(**kw)


def make_unet(cfg: dict):
    from hf_align.diffusion import sr_unet

    return sr_unet(block_out_channels=tuple(cfg["blocks"]), layers_per_block=cfg["layers_per_block"],
                   attention=cfg["attention"], norm_num_groups=8 if cfg["blocks"][0] < 64 else 32)


def train_with_curve(tr, keys=("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")):
    """Train ``tr``, noting the training wall-clock (``tr.train_wall_time``) at every evaluation. Returns the curve
    (per evaluation: step, train_s and ``eval_<key>`` of ``keys``) and the total wall seconds."""
    from transformers import TrainerCallback

    clock = {}

    class Clock(TrainerCallback):
        def on_evaluate(self, a, state, control, **kw):
            clock[state.global_step] = tr.train_wall_time

    tr.add_callback(Clock())
    t0 = time.perf_counter()
    tr.train()
    total = time.perf_counter() - t0
    curve = [{"step": h["step"], "train_s": clock.get(h["step"], float("nan")), **{k: h[f"eval_{k}"] for k in keys}}
             for h in tr.state.log_history if "eval_psnr" in h]
    return curve, total


def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from hf_align.trainers.dream_trainer import DREAMTrainer

    method, seed = cfg["method"], cfg["seed"]
    train_ds, eval_ds = build_datasets(cfg["crop"], cfg["eval_crop"], cfg["n_eval"])
    torch.manual_seed(seed)
    unet = make_unet(cfg)
    args = make_args(cfg, method, seed, os.path.join(cfg["tmp"], f"{cfg['tag']}_{method}_{seed}"))
    tr = DREAMTrainer(model=unet, args=args, train_dataset=train_ds, eval_dataset=eval_ds)
    curve, total = train_with_curve(tr)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in tr.state.log_history if "loss" in h]
    final = []
    for sampler, steps in (("ddim", cfg["final_steps"]), ("ddpm", cfg["ddpm_steps"])):
        for n in steps:
            m = tr.evaluate_sr(num_inference_steps=n, scheduler=sampler)
            final.append({"sampler": sampler, "steps": n, **{k: m[k] for k in ("psnr", "ssim", "bicubic_psnr",
                                                                                 "bicubic_ssim", "num_samples")}})
    out = {"method": method, "seed": seed, "prediction_type": tr.noise_scheduler.config.prediction_type,
           "residual_scale": args.residual_scale, "eval_num_inference_steps": args.eval_num_inference_steps,
           "config": cfg, "curve": curve, "losses": losses, "final": final, "train_wall_s": tr.train_wall_time,
           "sec_per_step": tr.train_wall_time / cfg["steps"], "total_wall_s": total}
    runs_dir = os.path.join(cfg["out_dir"], f"{cfg['tag']}_runs")
    os.makedirs(runs_dir, exist_ok=True)
    with open(os.path.join(runs_dir, f"{out['prediction_type']}_{method}_seed{seed}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"[done] {out['prediction_type']} {method} seed {seed}: psnr {curve[-1]['psnr']:.2f} "
          f"(bicubic {curve[-1]['bicubic_psnr']:.2f}), {tr.train_wall_time:.0f}s train", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- summary
def _first(curve, key, thr, x="step"):
    for c in curve:
        if c[key] >= thr:
            return c[x]
    return None


def _ms(xs, fmt="{:.0f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "never"
    sd = np.std(xs, ddof=1) if len(xs) > 1 else 0.0
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(sd)}"


def _mean_sd(a, fmt="{:.2f}"):
    a = np.asarray(a, dtype=np.float64)
    return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1) if a.size > 1 else 0.0)}"


def _load_runs(out_dir, tag):
    runs_dir = os.path.join(out_dir, f"{tag}_runs")
    return [json.load(open(os.path.join(runs_dir, f))) for f in sorted(os.listdir(runs_dir)) if f.endswith(".json")]


def _header(cmd, runs):
    cfg = runs[0]["config"]
    held = ", ".join(f"{n} ({PHOTOS[n][1]})" for n in HELD_OUT)
    train = ", ".join(f"{n} ({PHOTOS[n][1]})" for n in TRAIN)
    return [
        f"Command: `{cmd}`\n",
        f"Machine: {platform.platform()}, {os.cpu_count()} logical CPUs (shared), Python {sys.version.split()[0]}; "
        f"{cfg['threads']} torch thread(s) per run, {cfg['workers']} run(s) at a time.\n",
        f"Config: {json.dumps({k: v for k, v in cfg.items() if k not in ('tmp', 'out_dir', 'method', 'seed')})}\n",
        f"Task: {cfg['scale']}x super-resolution; HR crops {cfg['crop']}x{cfg['crop']} (LR = anti-aliased bicubic "
        f"down-sample); residual over the bicubic up-sample (residual_scale {runs[0]['residual_scale']:g}); "
        f"prediction type {runs[0]['prediction_type']}; evaluation sampler DDIM {runs[0]['eval_num_inference_steps']} "
        "steps with the EMA weights. Everything not in the config is the `DREAMTrainingArguments` default.\n",
        f"Training photographs: {train}.\n",
        f"Held-out photographs (never trained on): {held}; {cfg['n_eval']} fixed random "
        f"{cfg['eval_crop']}x{cfg['eval_crop']} crops; during training the first {cfg['eval_subset']} of them.\n",
        "PSNR and SSIM from scikit-image (data range 1; SSIM with a Gaussian window, sigma 1.5, as the paper).\n",
    ]


def summarize_prediction_types(cmd, out_dir=RESULTS, tag="sr_prediction_types"):
    runs = _load_runs(out_dir, tag)
    L = ["# Prediction type for the super-resolution recipe (standard training, one seed each)\n", *_header(cmd, runs)]
    f0 = runs[0]["final"]
    L.append(f"Bicubic on all held-out crops: PSNR {f0[0]['bicubic_psnr']:.2f} dB, SSIM {f0[0]['bicubic_ssim']:.4f}.\n")
    cols = [(e["sampler"], e["steps"]) for e in f0]
    L.append("| prediction type | " + " | ".join(f"{s} {n} PSNR / SSIM" for s, n in cols) + " |")
    L.append("|---|" + "---:|" * len(cols))
    for r in sorted(runs, key=lambda r: r["prediction_type"]):
        L.append(f"| {r['prediction_type']} | " + " | ".join(f"{e['psnr']:.2f} / {e['ssim']:.4f}" for e in r["final"])
                 + " |")
    best = max(runs, key=lambda r: max(e["psnr"] for e in r["final"]))
    L.append(f"\nBest PSNR: {best['prediction_type']} ({max(e['psnr'] for e in best['final']):.2f} dB).\n")
    with open(os.path.join(out_dir, f"{tag}.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


def summarize(cmd: str, out_dir: str = RESULTS, tag: str = "dream_sr") -> None:
    import matplotlib.pyplot as plt

    runs = _load_runs(out_dir, tag)
    by = {m: sorted([r for r in runs if r["method"] == m], key=lambda r: r["seed"]) for m in ("standard", "dream")}
    if not by["standard"] or not by["dream"]:
        raise SystemExit(f"need runs of both methods in {out_dir}/{tag}_runs")
    cfg = by["standard"][0]["config"]
    steps = [c["step"] for c in by["standard"][0]["curve"]]
    bic = by["standard"][0]["curve"][0]["bicubic_psnr"]
    bic_ssim = by["standard"][0]["curve"][0]["bicubic_ssim"]

    def arr(m, key):
        return np.array([[c[key] for c in r["curve"]] for r in by[m]], dtype=np.float64)

    L = ["# Diffusion super-resolution of textured photographs: the default recipe, DREAM vs standard\n",
         *_header(cmd, runs)]
    L.append(f"Seeds: standard {[r['seed'] for r in by['standard']]}, DREAM {[r['seed'] for r in by['dream']]}. "
             "The DREAM runs (p = 1) are the library's default recipe; standard is p = inf.\n")

    # final: the acceptance table
    fb = by["standard"][0]["final"]
    eval_n = by["standard"][0]["eval_num_inference_steps"]
    k_def = next(k for k, e in enumerate(fb) if e["sampler"] == "ddim" and e["steps"] == eval_n)
    L.append(f"\n## The default recipe vs bicubic: all {fb[0]['num_samples']} held-out crops, DDIM {eval_n} steps\n")
    L.append("| | PSNR (dB) | SSIM | PSNR gain over bicubic |")
    L.append("|---|---:|---:|---:|")
    L.append(f"| bicubic | {fb[k_def]['bicubic_psnr']:.2f} | {fb[k_def]['bicubic_ssim']:.4f} | |")
    verdict = {}
    for m in ("dream", "standard"):
        ps = [r["final"][k_def]["psnr"] for r in by[m]]
        ss = [r["final"][k_def]["ssim"] for r in by[m]]
        gain = np.array(ps) - fb[k_def]["bicubic_psnr"]
        verdict[m] = (float(gain.mean()), float(np.mean(ss)) - fb[k_def]["bicubic_ssim"])
        name = "DREAM (default recipe)" if m == "dream" else "standard"
        L.append(f"| {name}, mean ± sd of {len(ps)} seeds | {_mean_sd(ps)} | {_mean_sd(ss, '{:.4f}')} | "
                 f"{_mean_sd(gain)} |")
    g, gs = verdict["dream"]
    L.append(f"\nTarget (>= 0.5 dB PSNR and higher SSIM than bicubic, mean of 3 seeds): "
             f"{'MET' if g >= 0.5 and gs > 0 else 'MISSED'} (+{g:.2f} dB, SSIM {gs:+.4f}).\n")

    L.append(f"\n## PSNR / SSIM over training (first {cfg['eval_subset']} held-out crops; mean ± sd over seeds)\n")
    L.append(f"Bicubic on these crops: PSNR {bic:.2f} dB, SSIM {bic_ssim:.4f}.\n")
    L.append("| step | standard PSNR | DREAM PSNR | standard SSIM | DREAM SSIM |")
    L.append("|---:|---:|---:|---:|---:|")
    sp, dp, ss, ds_ = arr("standard", "psnr"), arr("dream", "psnr"), arr("standard", "ssim"), arr("dream", "ssim")
    for k, s in enumerate(steps):
        L.append(f"| {s} | {_mean_sd(sp[:, k])} | {_mean_sd(dp[:, k])} | {_mean_sd(ss[:, k], '{:.4f}')} | "
                 f"{_mean_sd(ds_[:, k], '{:.4f}')} |")

    sec = {m: [r["sec_per_step"] for r in by[m]] for m in by}
    ratio = np.median(sec["dream"]) / np.median(sec["standard"])
    L.append("\n## Steps and wall-clock to a threshold (mean ± sd over seeds; 'never' = not within the run)\n")
    L.append(f"Training seconds per step (median over seeds): standard {np.median(sec['standard']):.3f}, DREAM "
             f"{np.median(sec['dream']):.3f}: **step-cost ratio {ratio:.2f}x** (one extra no-grad forward).\n")
    std_final_p, std_final_s = float(sp[:, -1].mean()), float(ss[:, -1].mean())
    L.append("| threshold | method | steps | training wall-clock (s) | reached by |")
    L.append("|---|---|---:|---:|---:|")
    reach = {}
    for name, key, thr in ((f"bicubic PSNR {bic:.2f} dB", "psnr", bic), (f"bicubic SSIM {bic_ssim:.4f}", "ssim", bic_ssim),
                           (f"standard's final PSNR {std_final_p:.2f} dB", "psnr", std_final_p),
                           (f"standard's final SSIM {std_final_s:.4f}", "ssim", std_final_s)):
        for m in ("standard", "dream"):
            st = [_first(r["curve"], key, thr) for r in by[m]]
            wc = [_first(r["curve"], key, thr, "train_s") for r in by[m]]
            reach[(key, name, m)] = st
            L.append(f"| {name} | {m} | {_ms(st)} | {_ms(wc)} | {sum(s is not None for s in st)}/{len(st)} |")

    L.append("\n## Equal training wall-clock\n")
    L.append("Each run's curve interpolated at the same training seconds (evaluation time excluded).\n")
    L.append("| training seconds | standard PSNR | DREAM PSNR | standard SSIM | DREAM SSIM |")
    L.append("|---:|---:|---:|---:|---:|")
    t_end = min(r["curve"][-1]["train_s"] for m in by for r in by[m])
    for frac in (0.25, 0.5, 0.75, 1.0):
        t = frac * t_end
        vals = {}
        for m in by:
            for key in ("psnr", "ssim"):
                vals[(m, key)] = [float(np.interp(t, [c["train_s"] for c in r["curve"]], [c[key] for c in r["curve"]]))
                                  for r in by[m]]
        L.append(f"| {t:.0f} | {_mean_sd(vals[('standard', 'psnr')])} | {_mean_sd(vals[('dream', 'psnr')])} | "
                 f"{_mean_sd(vals[('standard', 'ssim')], '{:.4f}')} | {_mean_sd(vals[('dream', 'ssim')], '{:.4f}')} |")

    L.append(f"\n## Final models by sampler and number of sampling steps (all {fb[0]['num_samples']} held-out crops)\n")
    L.append(f"Bicubic: PSNR {fb[0]['bicubic_psnr']:.2f} dB, SSIM {fb[0]['bicubic_ssim']:.4f}. "
             f"Step-cost ratio of training: {ratio:.2f}x.\n")
    L.append("| sampler | steps | standard PSNR | DREAM PSNR | standard SSIM | DREAM SSIM |")
    L.append("|---|---:|---:|---:|---:|---:|")
    grid = {}
    for k, e in enumerate(fb):
        v = {m: np.array([[r["final"][k]["psnr"], r["final"][k]["ssim"]] for r in by[m]]) for m in by}
        grid[(e["sampler"], e["steps"])] = v
        L.append(f"| {e['sampler']} | {e['steps']} | {_mean_sd(v['standard'][:, 0])} | {_mean_sd(v['dream'][:, 0])} | "
                 f"{_mean_sd(v['standard'][:, 1], '{:.4f}')} | {_mean_sd(v['dream'][:, 1], '{:.4f}')} |")
    L.append("\nFewer sampling steps: for each DREAM step count, the standard step counts (same sampler) whose mean "
             "PSNR it matches or beats:\n")
    for sampler in ("ddim", "ddpm"):
        ks = sorted(n for (s_, n) in grid if s_ == sampler)
        for n in ks:
            d = grid[(sampler, n)]["dream"][:, 0].mean()
            beaten = [m for m in ks if grid[(sampler, m)]["standard"][:, 0].mean() <= d]
            L.append(f"- {sampler} {n} step(s): DREAM {d:.2f} dB >= standard at "
                     f"{', '.join(str(b) for b in beaten) + ' steps' if beaten else 'no step count'}")

    L.append("\nSee docs/dream.md for the discussion.\n")

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, col in (("standard", "C0"), ("dream", "C3")):
        for j, key in enumerate(("psnr", "ssim")):
            a = arr(m, key)
            ax[j].plot(steps, a.mean(0), color=col, label=m)
            ax[j].fill_between(steps, a.mean(0) - a.std(0, ddof=1), a.mean(0) + a.std(0, ddof=1), color=col, alpha=0.2)
        for sampler, ls in (("ddim", "-"), ("ddpm", "--")):
            ks = sorted(n for (s_, n) in grid if s_ == sampler)
            ax[2].plot(ks, [grid[(sampler, n)][m][:, 0].mean() for n in ks], ls, marker="o", color=col,
                       label=f"{m} {sampler}")
    for a_, val in ((ax[0], bic), (ax[1], bic_ssim), (ax[2], fb[0]["bicubic_psnr"])):
        a_.axhline(val, color="k", ls=":", label="bicubic")
    later = [k for k, s in enumerate(steps) if s >= steps[-1] * 0.1] or list(range(len(steps)))
    for j, (key, pad) in enumerate((("psnr", 0.2), ("ssim", 0.003))):
        lo = min(arr(m, key)[:, later].min() for m in by)
        hi = max(arr(m, key).max() for m in by)
        ax[j].set_ylim(min(lo, (bic, bic_ssim)[j]) - pad, hi + pad)
    ax[0].set(xlabel="training step", ylabel="PSNR (dB)", title="PSNR over training (held-out subset)")
    ax[1].set(xlabel="training step", ylabel="SSIM", title="SSIM over training")
    ax[2].set(xlabel="sampling steps", ylabel="PSNR (dB)", xscale="log", title="final models, all held-out crops")
    ticks = sorted({n for (_, n) in grid})
    ax[2].set_xticks(ticks, [str(n) for n in ticks])
    ax[2].minorticks_off()
    for a_ in ax:
        a_.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{tag}.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(out_dir, f"{tag}.md"), "w") as f:
        f.write("\n".join(L) + f"\n\n![curves]({tag}.png)\n")
    print("\n".join(L))


def estimate(cfg: dict) -> None:
    """Count the FLOPs of one training step of the preset (standard and DREAM) on CPU at batch 1 and turn them into
    an expected GPU runtime at an assumed sustained throughput."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = make_unet(cfg)
    n_params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(1, 6, cfg["crop"], cfg["crop"])
    t = torch.tensor([10])
    with FlopCounterMode(display=False) as fc:
        unet(x, t).sample.sum().backward()
    train_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc2, torch.no_grad():
        unet(x, t)
    fwd = fc2.get_total_flops()
    per_step = {"standard": train_flops * cfg["batch"], "dream": (train_flops + fwd) * cfg["batch"]}
    sustained = 150e12  # FLOP/s: ~40% of an H100/H200's dense bf16 peak, a typical UNet training utilisation
    print(f"preset: {json.dumps(cfg)}")
    print(f"UNet parameters: {n_params / 1e6:.1f}M; FLOPs per sample: train step {train_flops / 1e9:.1f} G, "
          f"no-grad forward {fwd / 1e9:.1f} G")
    for m, f in per_step.items():
        hours = f * cfg["steps"] / sustained / 3600
        print(f"{m}: {f / 1e12:.2f} TFLOP per step; {cfg['steps']} steps at {sustained / 1e12:.0f} TFLOP/s sustained "
              f"-> about {hours:.1f} h on one GPU")
    samp = fwd * cfg["n_eval"] * sum(cfg["final_steps"] + cfg["ddpm_steps"]) / sustained / 3600
    print(f"final evaluation grid ({cfg['n_eval']} crops x {sum(cfg['final_steps'] + cfg['ddpm_steps'])} sampling "
          f"steps): about {samp:.2f} h per model")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, help="override the preset's training steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["standard", "dream"], choices=["standard", "dream"])
    ap.add_argument("--prediction-types", nargs="*", choices=["epsilon", "v_prediction", "sample"], default=None,
                    help="compare prediction types with standard training (all three if none named); writes "
                         "sr_prediction_types.md from every run saved in sr_prediction_types_runs/")
    ap.add_argument("--device", help="override the preset's device (cpu, cuda)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--estimate", action="store_true", help="print the preset's FLOPs and expected GPU runtime")
    ap.add_argument("--tmp", default="/tmp/dream_sr_bench")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--command", default=None, help="with --summarize-only: the command that produced the runs")
    a = ap.parse_args()
    cmd = " ".join(["python benchmarks/dream_sr.py", *sys.argv[1:]])
    cfg = dict(PRESETS[a.preset], preset=a.preset, workers=a.workers, tmp=a.tmp, out_dir=a.out_dir)
    if a.steps:
        cfg["steps"] = a.steps
    if a.device:
        cfg["device"] = a.device
    if a.estimate:
        estimate(cfg)
        return
    ptypes = None if a.prediction_types is None else (a.prediction_types or ["epsilon", "v_prediction", "sample"])
    tag = "sr_prediction_types" if ptypes else ("dream_sr" if a.preset == "cpu" else f"dream_sr_{a.preset}")
    cfg["tag"] = tag
    if not a.summarize_only:
        if ptypes:
            jobs = [dict(cfg, method="standard", seed=s, prediction_type=p) for s in a.seeds for p in ptypes]
        else:
            jobs = [dict(cfg, method=m, seed=s) for s in a.seeds for m in a.methods]
        t0 = time.time()
        if a.workers > 1:
            with mp.get_context("spawn").Pool(a.workers) as pool:
                pool.map(run_one, jobs, chunksize=1)
        else:
            for j in jobs:
                run_one(j)
        print(f"total wall {time.time() - t0:.0f}s", flush=True)
    if ptypes:
        summarize_prediction_types(a.command or cmd, a.out_dir, tag)
    else:
        summarize(a.command or cmd, a.out_dir, tag)


if __name__ == "__main__":
    main()
