"""All-pairs layer similarity of a 6-layer BERT-like model: hf_align vs the CKA libraries on PyPI.

(a) on the same cached features (CLS token of the 7 hidden states), n = 4,096 and 16,384 inputs:
    hf_align's exact streamed linear CKA vs each library and vs the arithmetic floor (one matrix product
    Z^T Z over the concatenated layer features Z = [X_0 ... X_6]); peak memory in a fresh process.
(b) end to end from model and data: hf_align.layer_similarity vs a bare forward pass over the same batches
    (and the libraries' own model-level entry points, as users call them).
Values: every library's matrix is compared with the exact values (float64 reference computed here from the
centred features, and hf_align's minibatch CKA with the libraries' batch size).

Model: BertForSequenceClassification, random init (seed 0), 6 layers, hidden 384, 12 heads, FFN 1536
(the shape of all-MiniLM-L6 / MiniLM-L6-H384), vocab 30522. Inputs start with [CLS]=101, so the embedding
output at CLS is the same vector for every input (a constant layer, as on any real BERT).

    python benchmarks/similarity_bench.py --out benchmarks/results/similarity.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

LIB_BATCH = 256


def build_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, num_labels=2, pad_token_id=0,
    )
    return BertForSequenceClassification(cfg).eval()


def make_batches(n, seq, batch_size, seed):
    """Padded batches of random sentences: [CLS] w_1 .. w_k [SEP], k uniform in [seq/2, seq-2]."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        lens = rng.integers(seq // 2, seq - 1, size=b)
        T = int(lens.max()) + 2
        ids = np.zeros((b, T), dtype=np.int64)
        mask = np.zeros((b, T), dtype=np.int64)
        for i, k in enumerate(lens):
            ids[i, : k + 2] = [101, *rng.integers(1000, 30000, size=k), 102]
            mask[i, : k + 2] = 1
        out.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    return out


# ------------------------------------------------------------------------------------------- references


def exact_linear_cka(F: torch.Tensor) -> np.ndarray:
    """F (n, K, d) -> exact linear CKA (float64, centred first); NaN for constant layers."""
    X = F.double()
    X = X - X.mean(0, keepdim=True)
    K = X.shape[1]
    Z = X.reshape(X.shape[0], -1)
    C = Z.T @ Z
    d = X.shape[2]
    H = C.reshape(K, d, K, d).square().sum((1, 3))
    diag = torch.diagonal(H)
    out = H / torch.sqrt(torch.outer(diag, diag))
    const = X.square().sum((0, 2)) <= (32 * torch.finfo(torch.float32).eps) ** 2 * F.double().square().sum((0, 2))
    out[const, :] = float("nan")
    out[:, const] = float("nan")
    return out.numpy()


# ------------------------------------------------------------------------------------------- runners (a)


class CachedLayers(nn.Module):
    """A stand-in 'model' whose K submodules output the cached features of one layer each, so the libraries'
    hook-based APIs see exactly the cached features (x: (B, K, d))."""

    def __init__(self, K, wrap3d=False):
        super().__init__()
        self.layers = nn.ModuleList([_Pick(k, wrap3d) for k in range(K)])

    def forward(self, x, *args, **kwargs):
        for m in self.layers:
            m(x)
        return x


class _Pick(nn.Module):
    def __init__(self, k, wrap3d):
        super().__init__()
        self.k, self.wrap3d = k, wrap3d

    def forward(self, x):
        y = x[:, self.k]
        return y[None] if self.wrap3d else y


def run_ours(F, update_rows=1024):
    from hf_align.analysis.streaming import StreamingCKA

    acc = StreamingCKA()
    K = F.shape[1]
    for s in range(0, F.shape[0], update_rows):
        acc.update([F[s : s + update_rows, k] for k in range(K)])
    return acc.linear_cka().values


def run_floor(F, dtype):
    Z = F.reshape(F.shape[0], -1).to(dtype)
    t = time.perf_counter()
    torch.mm(Z.T, Z)
    return time.perf_counter() - t


def _loader(F, with_label=False):
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(F, torch.zeros(len(F))) if with_label else TensorDataset(F)
    return DataLoader(ds, batch_size=LIB_BATCH, shuffle=False)


def run_pytorch_cka(F):
    import cka

    m = CachedLayers(F.shape[1])
    names = [f"layers.{k}" for k in range(F.shape[1])]
    return cka.compute_cka(m, m, _loader(F), layers=names, device="cpu", progress=False)[0].numpy()


def run_torch_cka(F):
    import warnings

    from torch_cka import CKA

    m = CachedLayers(F.shape[1])
    names = [f"layers.{k}" for k in range(F.shape[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = CKA(m, m, model1_name="a", model2_name="b", model1_layers=names, model2_layers=names, device="cpu")
        c.compare(_loader(F))
    return c.hsic_matrix.numpy()


def run_ckatorch(F):
    import warnings

    from ckatorch import CKA

    m = CachedLayers(F.shape[1], wrap3d=True)  # its cka_batch needs (bsz, n, d): one "bsz" of LIB_BATCH rows
    names = [f"layers.{k}" for k in range(F.shape[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = CKA(m, m, layers=names, device="cpu")
        return c(_loader(F), epochs=1).numpy()


def run_cka_pytorch(F):
    from cka_pytorch.cka import CKACalculator

    m = CachedLayers(F.shape[1])
    names = [f"layers.{k}" for k in range(F.shape[1])]
    c = CKACalculator(m, m, model1_layers=names, model2_layers=names, verbose=False, device=torch.device("cpu"))
    return c.calculate_cka_matrix(_loader(F, with_label=True), num_epochs=1).numpy()


LIBS = {
    "pytorch-cka 1.1.3": run_pytorch_cka,
    "torch-cka 0.21": run_torch_cka,
    "ckatorch 1.0.3": run_ckatorch,
    "cka-pytorch 1.1.3": run_cka_pytorch,
}


def timed(fn, *args):
    t = time.perf_counter()
    try:
        out = fn(*args)
        err = None
    except Exception as exc:  # libraries may fail on the constant layer
        out, err = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    return time.perf_counter() - t, out, err


# ------------------------------------------------------------------------------------------- memory


_MEM_CHILD = r"""
import os, sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
import similarity_bench as sb
mode, n = sys.argv[1], int(sys.argv[2])
K, d, B = 7, 384, 1024
g = torch.Generator().manual_seed(0)
def batches():
    for s in range(0, n, B):
        yield torch.randn(min(B, n - s), K, d, generator=g) + 3.0
if mode == "hf_align":
    from hf_align.analysis.streaming import StreamingCKA
    import hf_align.analysis.similarity
def rss():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmRSS"):
            return int(ln.split()[1])
base = rss()
if mode == "hf_align":
    acc = StreamingCKA()
    for f in batches():
        acc.update([f[:, k] for k in range(K)])
    acc.linear_cka()
elif mode == "floor":
    Z = torch.cat([f.reshape(f.shape[0], -1) for f in batches()]).double()
    Z.T @ Z
elif mode == "pytorch-cka":
    F = torch.cat(list(batches()))  # its DataLoader API needs the data set; pass the features as a dataset
    sb.run_pytorch_cka(F[:256]); base = rss()  # warm-up, then the data set is excluded
    sb.run_pytorch_cka(F)
def hwm():  # peak RSS of this process image (ru_maxrss would carry the parent's peak across exec)
    for ln in open("/proc/self/status"):
        if ln.startswith("VmHWM"):
            return int(ln.split()[1])
print((hwm() - base) / 1024.0)
"""


def peak_memory_mb(mode, n, threads):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEM_CHILD.format(root=root, bench=os.path.dirname(os.path.abspath(__file__)), threads=threads)
    r = subprocess.run([sys.executable, "-c", code, mode, str(n)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return f"failed ({r.stderr.strip().splitlines()[-1][:80]})"
    return float(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- end to end


def e2e_bare(model, batches):
    with torch.no_grad():
        for b in batches:
            model(**b)


def e2e_ours(model, batches):
    import warnings

    from hf_align.analysis.collect import layer_similarity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer_similarity(model, batches, metric="cka", pooling="cls", progress=False).matrix


def e2e_pytorch_cka(model, batches):
    import cka

    names = ["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(6)]
    from torch.utils.data import DataLoader

    dl = DataLoader(batches, batch_size=None)  # yields the same dict batches
    return cka.compute_cka(model, model, dl, layers=names, device="cpu", progress=False)[0].numpy()


# ------------------------------------------------------------------------------------------- main


def e2e_section(args, model, log):
    """Part (b): the all-pairs CKA matrix end to end from model and data vs a bare forward, interleaved."""
    log(f"## (b) End to end: {args.e2e_n} inputs of <= {args.e2e_seq} tokens, batches of 256")
    log("")
    batches = make_batches(args.e2e_n, args.e2e_seq, 256, seed=2)
    e2e_bare(model, batches[:1])  # warm-up
    tb, to = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        t = time.perf_counter()
        e2e_bare(model, batches)
        tb.append(time.perf_counter() - t)
        t = time.perf_counter()
        e2e_ours(model, batches)
        to.append(time.perf_counter() - t)
    mb_, mo = statistics.median(tb), statistics.median(to)
    log("| contender | time (s) | vs bare forward |")
    log("|---|---|---|")
    log(f"| bare forward pass (model(**batch), no_grad) | {mb_:.2f} | 1.000 |")
    log(f"| hf_align.layer_similarity(metric='cka', pooling='cls') | {mo:.2f} | {mo / mb_:.3f} |")
    if not args.skip_libs:
        for name, fn in [("pytorch-cka compute_cka (its hooks: flattened token features; uses input_ids only, drops the attention mask)", e2e_pytorch_cka)]:
            runs = [timed(fn, model, batches) for _ in range(args.e2e_lib_repeats)]
            tl = statistics.median(r[0] for r in runs)
            log(f"| {name} | {tl:.2f} | {tl / mb_:.3f} | ")
            if runs[0][2]:
                log(f"|  error: {runs[0][2]} | | |")
    log("")
    log(f"Individual runs (s): bare {[round(x, 2) for x in tb]}, hf_align {[round(x, 2) for x in to]}.")
    ratios = [o / b for o, b in zip(to, tb)]
    log(f"Per-repeat ratio hf_align / bare: {[round(r, 3) for r in ratios]}; median **{statistics.median(ratios):.3f}** "
        "(target <= 1.05).")


def memory_table(args, log):
    log("## Peak memory (fresh process, RSS growth during the computation, MiB)")
    log("")
    log("| contender | " + " | ".join(f"n = {n}" for n in sorted(args.sizes)) + " |")
    log("|---|" + "---|" * len(args.sizes))
    for mode in ["hf_align", "floor", "pytorch-cka"]:
        if mode == "pytorch-cka" and args.skip_libs:
            continue
        row = [peak_memory_mb(mode, n, args.threads) for n in sorted(args.sizes)]
        label = {"hf_align": "hf_align StreamingCKA (features streamed in batches of 1024)",
                 "floor": "floor (whole Z in float64, then Z^T Z)", "pytorch-cka": "pytorch-cka (DataLoader over the feature set; data set excluded)"}[mode]
        log(f"| {label} | " + " | ".join(fmt(x, 0) for x in row) + " |")
    log("")


def fmt(x, nd=2):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lib-repeats", type=int, default=3, help="repeats for the libraries in (a)")
    p.add_argument("--cache-seq", type=int, default=8, help="max tokens per input for the cached features of (a)")
    p.add_argument("--e2e-n", type=int, default=4096)
    p.add_argument("--e2e-seq", type=int, default=32)
    p.add_argument("--e2e-lib-repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-libs", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory table")
    p.add_argument("--e2e-only", action="store_true", help="only part (b), end to end against a bare forward")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    if args.e2e_only:
        log("# Layer similarity end to end vs a bare forward (benchmarks/similarity_bench.py --e2e-only)")
        log("")
        log(f"Command: `python benchmarks/similarity_bench.py {' '.join(sys.argv[1:])}`")
        log("")
        log(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), {os.cpu_count()} cores; model as in similarity.md.")
        log("")
        e2e_section(args, build_model(), log)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    if args.memory_only:
        log(f"Command: `python benchmarks/similarity_bench.py {' '.join(sys.argv[1:])}`")
        log("")
        memory_table(args, log)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    t_start = time.perf_counter()
    for mod in ("cka", "torch_cka", "ckatorch", "cka_pytorch.cka", "hf_align.analysis.collect"):  # imports out of the timings
        try:
            __import__(mod)
        except Exception as exc:
            print(f"cannot import {mod}: {exc}")
    model = build_model()
    from hf_align.analysis.pooling import pool
    from hf_align.layers import LayerView

    view = LayerView(model)
    nmax = max(args.sizes)
    t = time.perf_counter()
    feats = []
    with torch.no_grad():
        for b in make_batches(nmax, args.cache_seq, 256, seed=1):
            hs = view.hidden_states(**b)
            feats.append(torch.stack([pool(h, b["attention_mask"], "cls") for h in hs], dim=1))
    F = torch.cat(feats).contiguous()  # (n, 7, 384) float32
    t_cache = time.perf_counter() - t
    K, d = F.shape[1], F.shape[2]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    log("# Layer similarity benchmark (all-pairs matrix, 6-layer BERT-like model)")
    log("")
    log(f"Command: `python benchmarks/similarity_bench.py {' '.join(sys.argv[1:])}`")
    log("")
    log(f"Machine: {cpu}, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
        f"torch.set_num_threads({args.threads}) for every contender, Python {platform.python_version()}.")
    log(f"Model: random-init BertForSequenceClassification, 6 layers, hidden {d}, 12 heads, FFN 1536 (MiniLM-L6-H384 shape); "
        f"{K} hidden states (embedding output + 6 blocks), CLS token, so Z = [X_0..X_6] is n x {K * d}.")
    log(f"Inputs: random token ids, [CLS]=101 first, lengths uniform; cached features from {nmax} inputs of <= {args.cache_seq} tokens "
        f"(forward took {t_cache:.1f} s). Libraries run with minibatches of {LIB_BATCH} (their DataLoader API), epochs=1. "
        f"Times are medians of {args.repeats} repeats (libraries: {args.lib_repeats}).")
    log("")
    std = F.double().std(0).mean(-1)
    log("Per-layer spread at CLS (mean column std): " + ", ".join(f"L{k}: {float(s):.2e}" for k, s in enumerate(std))
        + f"; mean |offset|/spread of layers 1-6: {float((F.double().mean(0).abs().mean(-1)[1:] / std[1:]).mean()):.1f}")
    log("")

    # ---------------- (a)
    log("## (a) On the same cached features")
    log("")
    log("| n | contender | time (s) | vs hf_align | note |")
    log("|---|---|---|---|---|")
    results = {}
    for n in sorted(args.sizes):
        Fn = F[:n].contiguous()
        ours_t = [timed(run_ours, Fn) for _ in range(args.repeats)]
        floor64 = [run_floor(Fn, torch.float64) for _ in range(args.repeats)]
        floor32 = [run_floor(Fn, torch.float32) for _ in range(args.repeats)]
        t_ours = statistics.median(x[0] for x in ours_t)
        results[(n, "hf_align")] = ours_t[0][1]
        log(f"| {n} | **hf_align StreamingCKA (exact linear CKA, float64 sums, updates of 1024 rows)** | {t_ours:.3f} | 1.00 | "
            f"{t_ours / statistics.median(floor64):.2f}x the float64 floor, {t_ours / statistics.median(floor32):.2f}x the float32 floor |")
        log(f"| {n} | floor: one float64 Z^T Z ({n} x {K * d}) | {statistics.median(floor64):.3f} | {statistics.median(floor64) / t_ours:.2f} | arithmetic floor of an exact result |")
        log(f"| {n} | floor: one float32 Z^T Z | {statistics.median(floor32):.3f} | {statistics.median(floor32) / t_ours:.2f} | |")
        if args.skip_libs:
            continue
        for name, fn in LIBS.items():
            runs = [timed(fn, Fn) for _ in range(args.lib_repeats)]
            tl = statistics.median(r[0] for r in runs)
            results[(n, name)] = runs[0][1]
            rel = f"{tl / t_ours:.1f}x slower" if tl >= t_ours else f"{t_ours / tl:.1f}x faster"
            log(f"| {n} | {name} | {tl:.3f} | {rel} | {runs[0][2] or 'ran (values: see below)'} |")
        log(f"| {n} | elapsed so far | {time.perf_counter() - t_start:.0f} | | |")
    log("")

    # ---------------- values
    n = max(args.sizes)
    exact = exact_linear_cka(F[:n])
    from hf_align.analysis.streaming import StreamingMinibatchCKA

    mb = StreamingMinibatchCKA()
    for s in range(0, n, LIB_BATCH):
        mb.update([F[s : s + LIB_BATCH, k] for k in range(K)])
    mbv = mb.minibatch_cka()
    log(f"## Values at n = {n} (layer 0 = embedding output at CLS: constant, CKA undefined)")
    log("")
    log("| contender | max abs diff vs exact linear CKA (layers 1-6) | max abs diff vs exact minibatch CKA (batch 256, layers 1-6) | what it returns for the constant layer 0 (row 0) | range of its values |")
    log("|---|---|---|---|---|")
    log(f"| hf_align | {np.nanmax(np.abs(results[(n, 'hf_align')] - exact)):.1e} | (exact linear CKA is its target) | NaN + `undefined` mask + warning naming layer 0 | [{np.nanmin(results[(n, 'hf_align')]):.3f}, {np.nanmax(results[(n, 'hf_align')]):.3f}] |")
    for name in LIBS:
        v = results.get((n, name))
        if v is None:
            log(f"| {name} | — (failed, see above) | — | — | — |")
            continue
        v = np.asarray(v, dtype=np.float64)
        d1 = np.abs(v[1:, 1:] - exact[1:, 1:]).max()
        d2 = np.abs(v[1:, 1:] - mbv.values[1:, 1:]).max()
        log(f"| {name} | {d1:.1e} | {d2:.1e} | {np.array2string(v[0], precision=3, separator=', ')} | [{np.nanmin(v):.3f}, {np.nanmax(v):.3f}] |")
    log(f"| hf_align StreamingMinibatchCKA (batch 256) | {np.abs(mbv.values[1:, 1:] - exact[1:, 1:]).max():.1e} | 0 | NaN + mask | |")
    log("")
    log("Exact linear CKA (float64 reference, centred features):")
    log("")
    log("```")
    log(np.array2string(exact, precision=4, max_line_width=200))
    log("```")
    log("")

    memory_table(args, log)

    e2e_section(args, model, log)
    log("")
    log(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
