"""Scale benchmark for hf_align.analysis.collapse: all metrics at K >> d, and the projected-gradient reference.

    python benchmarks/collapse_scale.py --K 10000 --d 64 --repeats 3 --baseline-classes 4 \
        --out benchmarks/results/collapse_K10000_d64.json

Synthetic data: classifier W (K x d) Gaussian; class means = W + 0.3 * noise; `--per-class` samples per
class streamed in batches of 8192 into ClassStatistics; network predictions = labels with 10% flipped.
NC4 (an N x K x d nearest-center search) runs on the first `--nc4-samples` samples.
Timings are wall-clock on this machine (2 cores, shared); peak memory is the process's max RSS.
"""

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch

from hf_align.analysis.collapse import (
    ClassStatistics,
    gnc2,
    gnc2_projected_gradient,
    gnc3,
    nc1,
    nc2,
    nc3_papyan,
    nc3_zhu,
    nc4,
)


def run_once(W, K, d, per_class, nc4_samples, seed):
    rng = np.random.default_rng(seed)
    means = W + 0.3 * rng.standard_normal((K, d))
    t = {}
    t0 = time.perf_counter()
    stats = ClassStatistics(K, d)
    y_all = np.repeat(np.arange(K), per_class)
    for s in range(0, y_all.size, 8192):
        y = y_all[s : s + 8192]
        stats.update(means[y] + rng.standard_normal((y.size, d)), y)
    t["statistics"] = time.perf_counter() - t0
    out = {}
    t0 = time.perf_counter()
    out["nc1"] = nc1(stats)
    Mc = stats.centered_means()
    t["nc1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["nc2_means"] = nc2(Mc)
    t["nc2_means"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["nc2_W"] = nc2(W)  # includes the Tammes maximum (max_cosine)
    t["nc2_W_tammes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["nc3_papyan"], out["nc3_zhu"], out["gnc3"] = nc3_papyan(W, Mc), nc3_zhu(W, Mc), gnc3(W, Mc)
    t["nc3_gnc3"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ys = np.repeat(np.arange(K), per_class)[:nc4_samples]
    feats = stats.means()[ys] + rng.standard_normal((ys.size, d))
    pred = np.where(rng.random(ys.size) < 0.1, rng.integers(0, K, ys.size), ys)
    out["nc4"] = nc4(feats, stats.means(), pred)
    t["nc4"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = gnc2(W)
    t["gnc2"] = time.perf_counter() - t0
    out["gnc2_margin"] = res.margin
    out["gnc2_max_certificate_gap"] = float(res.gap.max())
    out["gnc2_rounds"], out["gnc2_solves"] = res.rounds, res.solves
    t["total"] = sum(t.values())
    return out, t, res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--K", type=int, default=10000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--nc4-samples", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-classes", type=int, default=0)
    p.add_argument("--baseline-iterations", type=int, default=10000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    W = np.random.default_rng(0).standard_normal((a.K, a.d))
    runs = [run_once(W, a.K, a.d, a.per_class, a.nc4_samples, seed=r) for r in range(a.repeats)]
    values, _, res = runs[-1]
    times = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": a.threads, "torch": torch.__version__, "numpy": np.__version__},
        "K": a.K, "d": a.d, "per_class": a.per_class, "num_samples": a.K * a.per_class,
        "nc4_samples": min(a.nc4_samples, a.K * a.per_class),
        "repeats": a.repeats, "median_seconds": times, "all_totals": [r[1]["total"] for r in runs],
        "values": values,
    }
    if a.baseline_classes:
        cls = np.arange(a.baseline_classes)
        t0 = time.perf_counter()
        pg = gnc2_projected_gradient(W, cls, iterations=a.baseline_iterations, batch=a.baseline_classes)
        tpg = time.perf_counter() - t0
        exact_per_class = times["gnc2"] / a.K
        result["baseline_projected_gradient"] = {
            "classes": cls.tolist(), "iterations": a.baseline_iterations, "seconds": tpg,
            "seconds_per_class": tpg / cls.size, "exact_seconds_per_class_amortised": exact_per_class,
            "speedup_per_class": (tpg / cls.size) / exact_per_class,
            "extrapolated_seconds_all_classes": tpg / cls.size * a.K,
            "pg_margins": pg["margins"].tolist(), "exact_margins": res.margins[cls].tolist(),
            "max_abs_difference": float(np.max(np.abs(pg["margins"] - res.margins[cls]))),
        }
    result["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
