"""Certified GNC2 (hf_align.analysis.collapse.gnc2) at LM-head scale, full and under a time budget.

    python benchmarks/gnc2_scale.py --threads 2 --budget 60 \
        --out benchmarks/results/gnc2_scale.json --md benchmarks/results/gnc2_scale.md

Matrices (each run in a fresh subprocess so that the max RSS is per matrix):

* ``gauss-50257x768`` and ``gauss-128256x1024``: Gaussian W (numpy default_rng(seed), float64), the shapes of
  GPT-2's and Llama-3's LM heads;
* ``w2v-debdocs``: word2vec vectors (gensim 4, skip-gram, vector_size 300, window 5, min_count 3, 5 epochs,
  seed 0, 1 worker) trained here on the Debian python3.11-doc reST sources
  (/work/debtext/root/usr/share/doc/python3.11/html/_sources/**/*.rst.txt, PSF licence), cached under
  benchmarks/.cache/; skipped with a message when gensim is absent (it is not a dependency);
* every ``/work/heads/*.safetensors`` (key "weight"), if any; all-zero rows (padding tokens) are dropped.

For each matrix: wall time, max RSS, rounds, solves, rho, max / median certificate gap, classes certified; then
the same matrix with ``time_budget=--budget`` and its bounds. ``--full-max-K`` skips the unbudgeted run above
that K (``--skip-full`` names to skip it for). Timings are wall-clock on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
DOCS = "/work/debtext/root/usr/share/doc/python3.11/html/_sources"


def w2v_matrix(seed: int = 0) -> np.ndarray | None:
    path = os.path.join(CACHE, "w2v_debdocs_300.npy")
    if os.path.exists(path):
        return np.load(path)
    try:
        from gensim.models import Word2Vec
    except ImportError:
        print("gensim is not installed: skipping the word2vec matrix", file=sys.stderr)
        return None
    files = sorted(glob.glob(os.path.join(DOCS, "**", "*.rst.txt"), recursive=True))
    if not files:
        print(f"no text under {DOCS}: skipping the word2vec matrix", file=sys.stderr)
        return None
    tok = re.compile(r"[a-z_][a-z0-9_]+")
    sents = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                t = tok.findall(line.lower())
                if t:
                    sents.append(t)
    model = Word2Vec(sents, vector_size=300, window=5, min_count=2, sg=1, epochs=5, seed=seed, workers=1)
    V = model.wv.vectors.astype(np.float64)
    os.makedirs(CACHE, exist_ok=True)
    np.save(path, V)
    return V


def load(name: str, seed: int) -> np.ndarray | None:
    if name.startswith("gauss-"):
        K, d = map(int, name[len("gauss-"):].split("x"))
        return np.random.default_rng(seed).standard_normal((K, d))
    if name == "w2v-debdocs":
        return w2v_matrix(seed)
    from safetensors.numpy import load_file

    W = load_file(name)["weight"].astype(np.float64)
    zero = ~np.any(W != 0, axis=1)
    if zero.any():  # e.g. a padding token's embedding row: no direction, gnc2 rejects it
        print(f"{name}: dropping {int(zero.sum())} all-zero row(s)", file=sys.stderr)
        W = W[~zero]
    return W


def _workers(K: int) -> int:
    from hf_align.analysis.collapse.gnc2 import _default_workers

    return _default_workers(K)


def run_one(name: str, seed: int, budget: float | None, progress: bool) -> dict:
    import torch

    from hf_align.analysis.collapse import gnc2

    W = load(name, seed)
    if W is None:
        return {"matrix": name, "skipped": True}
    t = time.perf_counter()
    res = gnc2(W, time_budget=budget, progress=progress)
    wall = time.perf_counter() - t
    gap = res.gap
    return {
        "matrix": name,
        "K": int(W.shape[0]),
        "d": int(W.shape[1]),
        "time_budget": budget,
        "seconds": wall,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        # forked solve workers share W copy-on-write: their RSS counts the shared pages again
        "max_rss_worker_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "workers": _workers(W.shape[0]),
        "threads": torch.get_num_threads(),
        "screened": res.screened,
        "rounds": res.rounds,
        "solves": res.solves,
        "rho": res.margin,
        "rho_lower": res.margin_lower,
        "rho_upper": res.margin_upper,
        "complete": res.complete,
        "certified": int(res.certified.sum()),
        "max_gap": float(gap.max()),
        "median_gap": float(np.median(gap)),
        "max_gap_certified": float(gap[res.certified].max()) if res.certified.any() else None,
        "mean_support": float(np.mean([len(s) for s in res.support])),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrices", nargs="*", default=["gauss-50257x768", "gauss-128256x1024", "w2v-debdocs"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", nargs="*", default=[], help="matrices to run only with the time budget")
    ap.add_argument("--extra-budget", nargs="*", default=[], help="NAME=SECONDS: one more budgeted run")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gnc2_scale.json"))
    ap.add_argument("--md", default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("NAME", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        name, b = args.child
        print(json.dumps(run_one(name, args.seed, None if b == "none" else float(b), args.progress)))
        return
    names = list(args.matrices) + sorted(glob.glob("/work/heads/*.safetensors"))
    jobs = []
    for n in names:
        if n not in args.skip_full:
            jobs.append((n, "none"))
        jobs.append((n, str(args.budget)))
    for spec in args.extra_budget:
        n, b = spec.rsplit("=", 1)
        jobs.append((n, b))
    results = []
    for n, b in jobs:
        cmd = [sys.executable, __file__, "--child", n, b, "--threads", str(args.threads), "--seed", str(args.seed)]
        if args.progress:
            cmd.append("--progress")
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            results.append({"matrix": n, "time_budget": b, "error": f"exit {p.returncode}"})
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        results.append(r)
        out = {"command": " ".join(["python", "benchmarks/gnc2_scale.py"] + sys.argv[1:]),
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "numpy": np.__version__, "threads": args.threads,
                           "load_average_at_end": os.getloadavg()},
               "results": results}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
