"""How much of the bicubic error is learnable at all: a linear least-squares 7x7 filter on the bicubic up-sample
(per output channel, 147 inputs + bias), fitted on the training photographs of ``dream_sr.py`` and applied to the
held-out ones, at 2x and 4x. A lower bound on what a trained SR model can gain over bicubic; it chose the CPU
recipe's scale (2x).

Usage: python benchmarks/sr_linear_gain.py   (writes benchmarks/results/sr_linear_gain.md)
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dream_sr import HELD_OUT, PHOTOS, RESULTS, TRAIN, load_photo  # noqa: E402

from hf_align.diffusion.images import bicubic_downsample, bicubic_upsample  # noqa: E402

K = 7


def pair(im: np.ndarray, s: int):
    x = torch.tensor(im).permute(2, 0, 1)[None].double() / 127.5 - 1
    h, w = x.shape[-2:]
    x = x[..., : h // s * s, : w // s * s]
    up = bicubic_upsample(bicubic_downsample(x, s), s)
    return x[0].numpy(), up[0].numpy()


def patches(up: np.ndarray, idx: np.ndarray) -> np.ndarray:
    c, h, w = up.shape
    r = K // 2
    p = np.pad(up, ((0, 0), (r, r), (r, r)), mode="reflect")
    cols = [p[ch, i : i + h, j : j + w].reshape(-1)[idx] for ch in range(c) for i in range(K) for j in range(K)]
    return np.stack(cols + [np.ones(len(idx))], -1)


def main():
    rng = np.random.default_rng(0)
    lines = ["# Learnable gain over bicubic: a linear 7x7 filter on the bicubic up-sample\n",
             "Command: `python benchmarks/sr_linear_gain.py`\n",
             f"Fitted by least squares on 20,000 random pixels of each training photo ({', '.join(TRAIN)}); "
             "evaluated on every pixel of each photo below (PSNR over the whole photo, data range 1).\n",
             "| scale | photo | held out | bicubic PSNR | linear filter PSNR | gain (dB) |", "|---:|---|---|---:|---:|---:|"]
    for s in (2, 4):
        xs, ys = [], []
        for n in TRAIN:
            hr, up = pair(load_photo(n), s)
            idx = rng.choice(hr[0].size, 20000, replace=False)
            xs.append(patches(up, idx))
            ys.append((hr - up).reshape(3, -1).T[idx])
        w = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)[0]
        for n in HELD_OUT + ["chelsea", "china"]:
            hr, up = pair(load_photo(n), s)
            idx = np.arange(hr[0].size)
            out = np.clip(up.reshape(3, -1).T + patches(up, idx) @ w, -1, 1)
            mse_b = np.mean(((hr - up) / 2) ** 2)
            mse_l = np.mean(((hr.reshape(3, -1).T - out) / 2) ** 2)
            lines.append(f"| {s} | {n} ({PHOTOS[n][1]}) | {'yes' if n in HELD_OUT else 'no (training photo)'} | "
                         f"{10 * np.log10(1 / mse_b):.2f} | {10 * np.log10(1 / mse_l):.2f} | "
                         f"{10 * np.log10(mse_b / mse_l):+.2f} |")
    with open(os.path.join(RESULTS, "sr_linear_gain.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
