"""Benchmark: the default super-resolution recipe on two disjoint sets of real photographs, against bicubic and
against the least-squares linear filter the trainer now reports, with gradient-energy vs uniform training crops.

Photo sets (both ship offline; sources and licences in the report):

* ``skimage``: scikit-image / scikit-learn's photographs (``dream_sr.py``'s split: 9 training, 3 held out);
* ``plasma``: the photographs among KDE Plasma's wallpapers, Debian package ``plasma-workspace-wallpapers``
  (LGPL-3; 7 training, 3 held out; the two painted ones are left out). Each is down-scaled (anti-aliased) to a
  1,024-pixel long side, which also removes their JPEG blocking. Get them with
  ``apt-get download plasma-workspace-wallpapers && dpkg -x plasma-workspace-wallpapers_*.deb root`` and pass
  ``--plasma-root root/usr/share/wallpapers`` (default ``/usr/share/wallpapers``).

Training rows are the whole photographs (what a user's dataset holds), each repeated ``batch`` times so that a
batch has ``batch`` rows; the trainer draws the crops. Held-out crops
are textured: random 48x48 crops of the held-out photos kept only when bicubic PSNR <= 30 dB, round-robin over
the photos, seeded. Every run: the CPU preset of ``dream_sr.py`` (2x, crop 48, batch 12, DREAM p = 1, EMA) with
the library defaults for everything else, ``--steps`` steps, one torch thread, 2 runs at a time.

Usage:
    python benchmarks/sr_photo_sets.py --steps 900 --plasma-root root/usr/share/wallpapers
    python benchmarks/sr_photo_sets.py --summarize-only      # rebuild the report from the saved runs
    python benchmarks/sr_photo_sets.py --preset gpu-paper --device cuda --plasma-root ...   # the paper's scale
    python benchmarks/sr_photo_sets.py --preset gpu-paper --dry-run --plasma-root ...       # its data, no training
``--preset gpu-paper`` is ``dream_sr.py``'s GPU configuration (SR3-size UNet, 4x on 128x128 crops, 100k steps) on
both photo sets; its report goes to ``sr_photo_sets_gpu-paper.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dream_sr import HELD_OUT, PHOTOS, PRESETS, RESULTS, TRAIN, load_photo, make_args, make_unet, train_with_curve  # noqa: E402

TAG = "sr_photo_sets"
LICENCE = "LGPL-3.0 (KDE Plasma wallpapers, Debian package plasma-workspace-wallpapers)"
PLASMA = {  # name -> (file under the wallpapers folder, photographer)
    "BytheWater": ("BytheWater/contents/images/2560x1600.jpg", "Maciej Wiklo"),
    "ColdRipple": ("ColdRipple/contents/images/2560x1600.jpg", "Risto Saukonpää"),
    "DarkestHour": ("DarkestHour/contents/images/2560x1600.jpg", "Risto Saukonpää"),
    "EveningGlow": ("EveningGlow/contents/images/2560x1600.jpg", "Ian Hex"),
    "Grey": ("Grey/contents/images/2560x1600.jpg", "Sigi Sagi"),
    "Kite": ("Kite/contents/images/2560x1600.jpg", "Risto Saukonpää"),
    "summer_1am": ("summer_1am/contents/images/2560x1600.jpg", "Risto Saukonpää"),
    "FallenLeaf": ("FallenLeaf/contents/images/2560x1600.jpg", "Martin Klapetek"),
    "OneStandsOut": ("OneStandsOut/contents/images/2560x1600.jpg", "Risto Saukonpää"),
    "Path": ("Path/contents/images/2560x1600.jpg", "Risto Saukonpää"),
}
PLASMA_TRAIN = ["BytheWater", "ColdRipple", "DarkestHour", "EveningGlow", "Grey", "Kite", "summer_1am"]
PLASMA_HELD_OUT = ["FallenLeaf", "OneStandsOut", "Path"]
SIDE = 1024


def load_plasma(name: str, root: str) -> np.ndarray:
    import PIL.Image

    path = os.path.join(root, PLASMA[name][0])
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: see this script's docstring for getting plasma-workspace-wallpapers")
    im = PIL.Image.open(path).convert("RGB")
    f = SIDE / max(im.size)
    im = im.resize((round(im.size[0] * f), round(im.size[1] * f)), PIL.Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


@functools.lru_cache(maxsize=4)
def photo_set(name: str, root: str):
    """(training photos, held-out photos), loaded once per process."""
    if name == "skimage":
        return [load_photo(n) for n in TRAIN], [load_photo(n) for n in HELD_OUT]
    return [load_plasma(n, root) for n in PLASMA_TRAIN], [load_plasma(n, root) for n in PLASMA_HELD_OUT]


def bicubic_psnr(crop: np.ndarray, scale: int) -> float:
    import torch

    from hf_align.diffusion.images import bicubic_downsample, bicubic_upsample

    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    up = bicubic_upsample(bicubic_downsample(x, scale), scale)
    return float(10 * np.log10(4.0 / float(((up.double() - x.double()) ** 2).mean())))


def textured_crops(photos, n: int, size: int, scale: int, max_psnr: float = 30.0, seed: int = 1234,
                   per_kept: bool = True):
    """``n`` random crops with bicubic PSNR <= ``max_psnr`` and the number drawn. The photo of each draw goes
    round-robin over the kept crops (``per_kept``: every photo gives the same number, the held-out sets) or over
    the draws (photos with little texture give fewer)."""
    rng = np.random.default_rng(seed)
    out, tries = [], 0
    while len(out) < n:
        im = photos[(len(out) if per_kept else tries) % len(photos)]
        i, j = rng.integers(0, im.shape[0] - size + 1), rng.integers(0, im.shape[1] - size + 1)
        crop = np.ascontiguousarray(im[i : i + size, j : j + size])
        tries += 1
        if bicubic_psnr(crop, scale) <= max_psnr:
            out.append(crop)
        if tries > 200 * n:
            raise SystemExit(f"fewer than {n} textured crops found")
    return out, tries


def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hf_align.trainers.dream_trainer import DREAMTrainer

    train, held = photo_set(cfg["set"], cfg["plasma_root"])
    crops, tries = textured_crops(held, cfg["n_eval"], cfg["eval_crop"], cfg["scale"])
    # each photo repeated so that a batch holds `batch` rows (a dataset shorter than the batch would shrink it);
    # the trainer's shuffled sampler then draws photos, and the crops inside them, independently per row
    train_ds = [{"image": im} for _ in range(cfg["batch"]) for im in train]
    eval_ds = [{"image": c} for c in crops]
    torch.manual_seed(cfg["seed"])
    unet = make_unet(cfg)
    method = cfg.get("method", "dream")
    args = make_args(cfg, method, cfg["seed"],
                     os.path.join(cfg["tmp"], f"{cfg['set']}_{method}_{cfg['sampling']}_{cfg['seed']}"))
    args.crop_sampling = cfg["sampling"]
    tr = DREAMTrainer(model=unet, args=args, train_dataset=train_ds, eval_dataset=eval_ds)
    curve, total = train_with_curve(tr, ("psnr", "ssim", "bicubic_psnr", "linear_psnr"))
    final = []
    for n in cfg["final_steps"]:
        m = tr.evaluate_sr(num_inference_steps=n, scheduler="ddim")
        final.append({"steps": n, **{k: m[k] for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "linear_psnr",
                                                       "linear_ssim", "num_samples")}})
    diagnosis = None
    if cfg.get("diagnose"):  # where a gap comes from: the same model on textured crops of its own training photos,
        # and the linear filter fitted on the held-out photos themselves (what a linear map could do there)
        k = cfg["final_steps"].index(args.eval_num_inference_steps) if args.eval_num_inference_steps in \
            cfg["final_steps"] else 0
        own, own_tries = textured_crops(train, cfg["n_eval"], cfg["eval_crop"], cfg["scale"], seed=4321,
                                         per_kept=False)
        m = tr.evaluate_sr(eval_dataset=[{"image": c} for c in own], num_inference_steps=final[k]["steps"])
        tr.fit_linear_baseline([{"image": im} for _ in range(cfg["batch"]) for im in held])
        o = tr.evaluate_sr(num_inference_steps=final[k]["steps"])
        diagnosis = {"train_crops": {x: m[x] for x in ("psnr", "ssim", "bicubic_psnr", "linear_psnr")},
                     "train_textured_share": cfg["n_eval"] / own_tries, "held_textured_share": cfg["n_eval"] / tries,
                     "oracle_linear_psnr": o["linear_psnr"], "held_psnr": o["psnr"], "held_bicubic_psnr":
                     o["bicubic_psnr"], "steps": final[k]["steps"]}
    out = {"set": cfg["set"], "sampling": cfg["sampling"], "method": method, "seed": cfg["seed"], "config": cfg,
           "curve": curve,
           "diagnosis": diagnosis,
           "final": final, "eval_tries": tries, "eval_num_inference_steps": args.eval_num_inference_steps,
           "train_wall_s": tr.train_wall_time, "sec_per_step": tr.train_wall_time / cfg["steps"], "total_wall_s": total}
    runs = os.path.join(cfg["out_dir"], f"{tag_of(cfg['preset'])}_runs")
    os.makedirs(runs, exist_ok=True)
    name = (f"{cfg['set']}_{cfg['sampling']}_seed{cfg['seed']}" + ("_standard" if method == "standard" else "")
            + ("_diagnosis" if cfg.get("diagnose") else ""))
    with open(os.path.join(runs, name + ".json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"[done] {cfg['set']} {method} {cfg['sampling']} seed {cfg['seed']}: psnr {final[1]['psnr']:.2f} "
          f"(bicubic {final[1]['bicubic_psnr']:.2f}, linear {final[1]['linear_psnr']:.2f}), "
          f"{tr.train_wall_time:.0f} s train, {total:.0f} s total", flush=True)
    return out


def linear_reference(set_name: str, root: str, cfg: dict, crops: int = 1024, seeds=(0, 1, 2, 3)):
    """The linear baseline fitted as the trainer does (uniform random crops of the training rows) on ``crops``
    crops, for each seed, evaluated on the held-out crops: per seed (PSNR, SSIM)."""
    import torch

    from hf_align.diffusion import LinearSRFilter
    from hf_align.trainers.dream_trainer import SRPairCollator, sr_metrics

    train, held = photo_set(set_name, root)
    held_crops, _ = textured_crops(held, cfg["n_eval"], cfg["eval_crop"], cfg["scale"])
    pairs = SRPairCollator(cfg["eval_crop"], cfg["scale"], random_crop=False).pairs(held_crops)
    hr = ((pairs["hr"] + 1) / 2).permute(0, 2, 3, 1).numpy()
    rows = [im for _ in range(cfg["batch"]) for im in train]
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        uniform = SRPairCollator(cfg["crop"], cfg["scale"], crop_sampling="uniform")
        idx = torch.randint(0, len(rows), (crops,), generator=gen).tolist()
        fit = LinearSRFilter.fit((uniform.pairs([rows[i] for i in idx[s : s + 32]], gen)["hr"]
                                  for s in range(0, crops, 32)), cfg["scale"], 7)
        sr = ((fit(pairs["up"]) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        out.append(sr_metrics(sr, hr))
    return out


def _ms(xs, fmt="{:.2f}"):
    xs = np.asarray(xs, dtype=np.float64)
    return f"{fmt.format(xs.mean())} ± {fmt.format(xs.std(ddof=1) if xs.size > 1 else 0.0)}"


def tag_of(preset: str) -> str:
    return TAG if preset == "cpu" else f"{TAG}_{preset}"


def summarize(cmd: str, out_dir: str = RESULTS, preset: str = "cpu", plasma_root: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_dir = os.path.join(out_dir, f"{tag_of(preset)}_runs")
    every = [json.load(open(os.path.join(runs_dir, f))) for f in sorted(os.listdir(runs_dir)) if f.endswith(".json")]
    runs = [r for r in every if not r.get("diagnosis") and r.get("method", "dream") == "dream"]
    standard = [r for r in every if r.get("method") == "standard"]
    diagnoses = [r for r in every if r.get("diagnosis")]
    cfg = runs[0]["config"]
    tag = tag_of(preset)
    L = ["# Super-resolution on two photo sets: the default recipe vs bicubic and vs a learned linear filter\n",
         f"Command: `{cmd}`\n",
         f"Machine: {platform.platform()}, {os.cpu_count()} logical CPUs (shared), Python {sys.version.split()[0]}; "
         f"{cfg['threads']} torch thread per run, 2 runs at a time.\n",
         f"Recipe: the `{cfg.get('preset', 'cpu')}` preset of `dream_sr.py` with the library defaults (DREAM p = 1, EMA, residual scale 8, "
         f"sample prediction, gradient-energy crops from 8 candidates): {cfg['scale']}x, HR crops {cfg['crop']}, "
         f"batch {cfg['batch']}, {cfg['steps']} steps, lr {cfg['lr']:g}, EMA decay {cfg['ema_decay']}, UNet blocks "
         f"{cfg['blocks']}. Evaluation: DDIM {runs[0]['eval_num_inference_steps']} steps, EMA weights, "
         f"{cfg['n_eval']} textured held-out 48x48 crops (bicubic PSNR <= 30 dB), PSNR/SSIM from scikit-image. "
         "Linear filter: the trainer's baseline (least squares, 7x7 x 3 channels + bias per sub-pixel phase, on "
         "the bicubic up-sample), fitted on uniform random crops of the training photos: in each run by the trainer "
         "(`linear_baseline_crops` of that run, seeded by the run's seed), and as the reference the targets use, on "
         "1,024 crops for each of 4 seeds (mean; its spread is given).\n"]
    sets = [s for s in ("skimage", "plasma") if any(r["set"] == s for r in runs)]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.2 * len(sets), 4.2), squeeze=False)
    verdicts = []
    for ax, s in zip(axes[0], sets):
        train, held = _provenance(s)
        L.append(f"\n## Photo set `{s}`\n")
        L.append(f"Training photographs: {', '.join(train)}.\n")
        L.append(f"Held-out photographs: {', '.join(held)}.\n")
        by = {m: sorted([r for r in runs if r["set"] == s and r["sampling"] == m], key=lambda r: r["seed"])
              for m in ("gradient", "uniform")}
        ref = (by["gradient"] or by["uniform"])[0]
        k = next(i for i, e in enumerate(ref["final"]) if e["steps"] == ref["eval_num_inference_steps"])
        e0 = ref["final"][k]
        L.append(f"Held-out crops: {e0['num_samples']} textured of {ref['eval_tries']} drawn.\n")
        L.append("| | seeds | PSNR (dB) | SSIM | gain over bicubic (dB) | gain over linear (dB) |")
        L.append("|---|---|---:|---:|---:|---:|")
        ref_lin = np.array(linear_reference(s, plasma_root or cfg["plasma_root"], cfg))
        lin_p = float(ref_lin[:, 0].mean())
        L.append(f"| bicubic | | {e0['bicubic_psnr']:.2f} | {e0['bicubic_ssim']:.4f} | | |")
        L.append(f"| linear filter, reference (1,024 crops) | 0-3 | {_ms(ref_lin[:, 0])} | {_ms(ref_lin[:, 1], '{:.4f}')} | "
                 f"{lin_p - e0['bicubic_psnr']:+.2f} | |")
        in_run = [r["final"][k]["linear_psnr"] for r in by["gradient"] + by["uniform"]]
        in_run_s = [r["final"][k]["linear_ssim"] for r in by["gradient"] + by["uniform"]]
        L.append(f"| linear filter, in the runs ({by['gradient'][0]['config'].get('linear_baseline_crops', 256)} "
                 f"crops) | every run | {_ms(in_run)} | {_ms(in_run_s, '{:.4f}')} | "
                 f"{np.mean(in_run) - e0['bicubic_psnr']:+.2f} | |")
        for m, label in (("gradient", "default recipe (gradient crops)"), ("uniform", "uniform crops")):
            if not by[m]:
                continue
            ps = [r["final"][k]["psnr"] for r in by[m]]
            ss = [r["final"][k]["ssim"] for r in by[m]]
            L.append(f"| {label} | {[r['seed'] for r in by[m]]} | {_ms(ps)} | {_ms(ss, '{:.4f}')} | "
                     f"{np.mean(ps) - e0['bicubic_psnr']:+.2f} | {np.mean(ps) - lin_p:+.2f} |")
            if m == "gradient":
                gb, gl = np.mean(ps) - e0["bicubic_psnr"], np.mean(ps) - lin_p
                ds_ = np.mean(ss) - e0["bicubic_ssim"]
                verdicts.append((s, gb, gl, ds_))
        std = sorted([r for r in standard if r["set"] == s], key=lambda r: r["seed"])
        if std:
            ps = [r["final"][k]["psnr"] for r in std]
            ss = [r["final"][k]["ssim"] for r in std]
            L.append(f"| standard training (p = inf), gradient crops | {[r['seed'] for r in std]} | {_ms(ps)} | "
                     f"{_ms(ss, '{:.4f}')} | {np.mean(ps) - e0['bicubic_psnr']:+.2f} | {np.mean(ps) - lin_p:+.2f} |")
        L.append("\nBy sampling steps (DDIM, mean of the seeds):\n")
        L.append("| training (crops) | " + " | ".join(f"{e['steps']} steps" for e in ref["final"]) + " |")
        L.append("|---|" + "---:|" * len(ref["final"]))
        if std:
            L.append("| standard (gradient) | " + " | ".join(f"{np.mean([r['final'][i]['psnr'] for r in std]):.2f}"
                                                         for i in range(len(ref["final"]))) + " |")
        for m in ("gradient", "uniform"):
            if by[m]:
                L.append(f"| DREAM ({m}) | " + " | ".join(f"{np.mean([r['final'][i]['psnr'] for r in by[m]]):.2f}"
                                                for i in range(len(ref["final"]))) + " |")
        # training curves and the plateau
        steps = [c["step"] for c in ref["curve"]]
        for m, style in (("gradient", "-"), ("uniform", "--")):
            if not by[m]:
                continue
            curves = np.array([[c["psnr"] for c in r["curve"]] for r in by[m]])
            mean = curves.mean(0)
            ax.plot(steps, mean, style, label=f"{m} crops ({len(by[m])} seed{'s' if len(by[m]) > 1 else ''})")
            if len(by[m]) > 1:
                ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
            plateau = next(st for st, v in zip(steps, mean) if v >= mean[-1] - 0.05)
            gain_last = mean[-1] - mean[max(0, len(mean) - 3)]
            L.append(f"\n{m} crops: PSNR on the first {cfg['eval_subset']} crops reaches within 0.05 dB of its final "
                     f"value at step {plateau} of {steps[-1]}; the last 100 steps add {gain_last:+.3f} dB.")
        ax.axhline(ref["curve"][0]["bicubic_psnr"], color="grey", lw=1, label="bicubic")
        ax.axhline(ref["curve"][0]["linear_psnr"], color="k", lw=1, ls=":", label="linear filter (seed 0's)")
        ax.set_title(f"photo set {s}")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"PSNR (dB), {cfg['eval_subset']} held-out crops")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{tag}.png"), dpi=110)
    L.append(f"\n![PSNR over training]({tag}.png)\n")
    L.append("## Targets (mean of 3 seeds): >= 0.3 dB over the linear filter, >= 1 dB over bicubic, SSIM above "
             "bicubic\n")
    for s, gb, gl, dss in verdicts:
        ok = gl >= 0.3 and gb >= 1.0 and dss > 0
        L.append(f"- `{s}`: {gb:+.2f} dB over bicubic, {gl:+.2f} dB over the linear filter, SSIM {dss:+.4f}: "
                 f"{'MET' if ok else 'MISSED'}")
    if diagnoses:
        L.append("\n## Where the gap comes from\n")
        L.append("One more run per set (default recipe, its own seed) evaluated twice more: on textured crops of its "
                 "own training photos, and against the linear filter fitted on the held-out photos themselves (these runs' "
                 "own linear filters: the trainer's default of 1,024 crops). "
                 f"DDIM {diagnoses[0]['diagnosis']['steps']} steps.\n")
        L.append("| set | seed | textured share of random crops: training / held-out photos | model - linear on "
                 "held-out crops (dB) | model - linear on training crops (dB) | linear fitted on held-out - "
                 "linear fitted on training, on held-out crops (dB) |")
        L.append("|---|---|---|---:|---:|---:|")
        for r in diagnoses:
            d = r["diagnosis"]
            # the held-out share drawn as the training one (round-robin over draws, not over kept crops)
            _, held = photo_set(r["set"], plasma_root or cfg["plasma_root"])
            d["held_textured_share"] = cfg["n_eval"] / textured_crops(held, cfg["n_eval"], cfg["eval_crop"],
                                                                      cfg["scale"], seed=4321, per_kept=False)[1]
            lin_held = r["final"][0]["linear_psnr"]  # this run's own fit on its training photos
            L.append(f"| {r['set']} | {r['seed']} | {d['train_textured_share']:.0%} / {d['held_textured_share']:.0%} | "
                     f"{d['held_psnr'] - lin_held:+.2f} | {d['train_crops']['psnr'] - d['train_crops']['linear_psnr']:+.2f}"
                     f" | {d['oracle_linear_psnr'] - lin_held:+.2f} |")
        L.append("\nReading: when the model's lead over the linear filter on its own training photos is far above its lead "
                 "on the held-out photos, it has learned detail of the training photos that does not carry over (the "
                 "data); a small last column says that a linear map fitted on the held-out photos themselves would not "
                 "do much better than the baseline (the baseline is not what is special about them). A PSNR plateau "
                 "well before the last step (the sections above) rules out the budget.")
    mean_wall = np.mean([r["total_wall_s"] for r in runs])
    L.append(f"\nCPU budget: {np.mean([r['sec_per_step'] for r in runs]):.2f} s per training step, "
             f"{mean_wall / 60:.1f} min per run including evaluation on average, at most "
             f"{max(r['total_wall_s'] for r in every) / 60:.1f} (limit 30).\n")
    with open(os.path.join(out_dir, f"{tag}.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
        json.dump([{k: r[k] for k in ("set", "sampling", "seed", "final", "sec_per_step", "total_wall_s")}
                   for r in runs], f, indent=1)
    print("\n".join(L))


def _provenance(s):
    if s == "skimage":
        return [f"{n} ({PHOTOS[n][1]})" for n in TRAIN], [f"{n} ({PHOTOS[n][1]})" for n in HELD_OUT]
    return ([f"{n} ({PLASMA[n][1]}, {LICENCE})" for n in PLASMA_TRAIN],
            [f"{n} ({PLASMA[n][1]}, {LICENCE})" for n in PLASMA_HELD_OUT])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["skimage", "plasma"], choices=["skimage", "plasma"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--uniform-seeds", type=int, nargs="*", default=[0], help="seeds of the uniform-crop runs")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 900 for cpu, the preset's)")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--device", default=None, help="override the preset's device")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plasma-root", default="/usr/share/wallpapers")
    ap.add_argument("--tmp", default="/tmp/sr_photo_sets")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--diagnose", action="store_true",
                    help="one default run per set and seed, also evaluated on textured crops of its training photos "
                         "and against a linear filter fitted on the held-out photos (the report's gap section)")
    ap.add_argument("--method", default="dream", choices=["dream", "standard"],
                    help="standard: p = inf (DREAM vs standard on the same crops, seeds and budget)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build each run's data and arguments (photo sets, textured held-out crops) and stop")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--command", default=None)
    a = ap.parse_args()
    cmd = a.command or "python benchmarks/sr_photo_sets.py " + " ".join(sys.argv[1:])
    if not a.summarize_only:
        preset = PRESETS[a.preset]
        steps = a.steps or (900 if a.preset == "cpu" else preset["steps"])
        final = [1, 2, 5, 10] if a.preset == "cpu" else preset["final_steps"]
        base = dict(preset, steps=steps, final_steps=final, tmp=a.tmp, out_dir=a.out_dir, preset=a.preset,
                    plasma_root=os.path.abspath(a.plasma_root), workers=a.workers, tag=tag_of(a.preset))
        if a.device:
            base["device"] = a.device
        if a.method == "standard":
            jobs = [dict(base, set=s, sampling="gradient", seed=seed, method="standard") for seed in a.seeds
                    for s in a.sets]
        elif a.diagnose:
            jobs = [dict(base, set=s, sampling="gradient", seed=seed, diagnose=True) for seed in a.seeds for s in a.sets]
        else:
            jobs = [dict(base, set=s, sampling="gradient", seed=seed) for seed in a.seeds for s in a.sets]
            jobs += [dict(base, set=s, sampling="uniform", seed=seed) for seed in a.uniform_seeds for s in a.sets]
        if a.dry_run:
            for job in jobs:
                train, held = photo_set(job["set"], job["plasma_root"])
                crops, tries = textured_crops(held, job["n_eval"], job["eval_crop"], job["scale"])
                try:
                    make_args(job, job.get("method", "dream"), job["seed"], os.path.join(a.tmp, "dry"))
                    note = ""
                except ValueError as error:  # bf16 / CUDA settings cannot be built without the device
                    note = f" (arguments need the device: {str(error)[:60]})"
                print(f"{job['set']} {job.get('method', 'dream')} {job['sampling']} seed {job['seed']}: "
                      f"{len(train)} training photos, {len(crops)} held-out {job['eval_crop']}px crops of {tries} "
                      f"drawn, {job['scale']}x, {job['steps']} steps of batch {job['batch']} on {job['device']}{note}")
            return
        with mp.get_context("spawn").Pool(a.workers) as pool:
            for _ in pool.imap_unordered(run_one, jobs):
                pass
    summarize(cmd, a.out_dir, a.preset, os.path.abspath(a.plasma_root))


if __name__ == "__main__":
    main()
