"""Streaming accumulators: exact whole-dataset similarity between every pair of feature blocks, one pass,
memory independent of the number of samples, reducible across processes.

A *block* is the feature matrix of one layer, ``X_k`` (n x d_k). Each ``update(blocks)`` gets the rows of
one batch for every block (same rows, same order).

Exact linear and debiased linear CKA (:class:`StreamingCKA`)
------------------------------------------------------------
Per sample i, with the concatenation ``z_i = [x_i^0, ..., x_i^{K-1}]`` (width D) and a fixed shift ``s``
(the first batch's mean, so no catastrophic cancellation when features carry a large common offset):

    u_i = z_i - s                          (D)
    a_i^k = ||u_i^k||^2                    (K: per-block squared norms)
    w_i = [u_i, a_i, 1]                    (D + K + 1)
    E  = sum_i w_i w_i^T                   (float64, one matrix product per batch: E += W^T W)

``E`` holds every sum needed: n, sum u, sum a, S = sum u u^T, sum a u^T, sum a a^T. Changing the shift is a
linear map of w (u' = u + delta, a'^k = a^k + 2 <delta^k, u^k> + ||delta^k||^2), so E' = T E T^T is exact;
:func:`_reshift` applies it in O(K D (D + K)). Re-shifting to the data mean gives the centred moments

    C = sum_i x~_i x~_i^T                  (x~ = x - mean; block (k, l) = X~_k^T X~_l)
    P_kl = sum_i ||x~_i^k||^2 ||x~_i^l||^2
    t_k = sum_i ||x~_i^k||^2 = tr(C_kk)

and then, for blocks k, l (Kornblith et al. 2019, U-centring written in feature space):

    linear:    H_kl = ||C_kl||_F^2,      CKA_kl = H_kl / sqrt(H_kk H_ll)
    debiased:  H_kl = ||C_kl||_F^2 - n/(n-2) P_kl + t_k t_l / ((n-1)(n-2)),  dCKA_kl = H_kl / sqrt(H_kk H_ll)

The debiased form is the unbiased HSIC estimator of Song et al. (2012),
HSIC_1 = [tr(K^L^) + 1^T K^ 1 1^T L^ 1/((n-1)(n-2)) - 2/(n-2) 1^T K^ L^ 1]/(n(n-3)), for linear kernels
K = X~X~^T: with r_i = ||x~_i||^2, centred rows give K 1 = 0, so K^ 1 = -r, 1^T K^ 1 = -t_k,
1^T K^ L^ 1 = sum_i r_i^k r_i^l = P_kl and tr(K^ L^) = ||C_kl||_F^2 - P_kl; collecting terms,
H_kl = n (n-3) HSIC_1(K^k, K^l) exactly. The test checks it against n x n U-centred Grams.

Multi-process: :meth:`StreamingCKA.reduce` re-shifts every process's E to rank 0's shift and all-reduces
it (``torch.distributed``, any backend that supports float64 sums, e.g. gloo), so the result is the one of
a single process over all the data.

Undefined entries: a block none of whose features (columns) varies beyond its own rounding
(:func:`hf_align.analysis.similarity.feature_varies`, from the diagonal of C and the raw per-column sums) makes
its row and column undefined; results come as a
:class:`SimilarityMatrix` with the values (NaN there), the boolean ``undefined`` mask and the indices of
the ``constant_blocks`` -- never a silent NaN, 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .similarity import _check_sequence, default_constant_rtol, feature_varies

__all__ = ["SimilarityMatrix", "StreamingCKA", "StreamingCosine", "StreamingMinibatchCKA", "StreamingMean"]


@dataclass
class SimilarityMatrix:
    """A (K x K) block-by-block similarity matrix from an accumulator.

    ``values``: float64, NaN exactly where ``undefined`` is True; ``undefined_blocks``: indices of blocks
    (layers) for which the metric is undefined (constant features / zero-norm samples); ``n``: sample count.
    """

    values: np.ndarray
    undefined: np.ndarray
    undefined_blocks: list[int] = field(default_factory=list)
    n: int = 0


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return torch.distributed
    return None


def _validate_blocks(blocks, dims: list[int] | None) -> list[torch.Tensor]:
    blocks = _check_sequence(blocks, "blocks")
    out = []
    b = None
    for i, x in enumerate(blocks):
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        x = x.detach()
        if x.ndim != 2:
            raise ValueError(f"block {i}: expected a 2-D (batch, features) matrix, got shape {tuple(x.shape)}")
        if b is None:
            b = x.shape[0]
        elif x.shape[0] != b:
            raise ValueError(f"all blocks of one update must hold the same samples: block 0 has {b} rows, block {i} has {x.shape[0]}")
        if not (x.dtype.is_floating_point or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"block {i}: expected real numeric features, got dtype {x.dtype}")
        out.append(x)
    if dims is not None and [x.shape[1] for x in out] != dims:
        raise ValueError(f"block widths changed between updates: first {dims}, now {[x.shape[1] for x in out]}")
    if b == 0:
        raise ValueError("empty batch (0 samples)")
    return out


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or inf; similarity needs finite features")


def _block_sq_norm(m: torch.Tensor, offs: list[int]) -> torch.Tensor:
    """(K x K) squared Frobenius norms of the blocks of a (D x D) matrix, without a D x D temporary."""
    K = len(offs) - 1
    widths = {offs[i + 1] - offs[i] for i in range(K)}
    if len(widths) == 1:
        d = widths.pop()
        return torch.linalg.vector_norm(m.reshape(K, d, K, d), dim=(1, 3)).square()
    return torch.stack(
        [torch.stack([torch.linalg.vector_norm(m[offs[k] : offs[k + 1], offs[l] : offs[l + 1]]).square() for l in range(K)]) for k in range(K)]  # noqa: E741
    )


def _reshift(E: torch.Tensor, delta: torch.Tensor, offs: list[int]) -> torch.Tensor:
    """Moments E = sum w w^T of w = [u, a, 1] -> moments of w' = [u + delta, a', 1] with
    a'^k = a^k + 2 <delta^k, u^k> + ||delta^k||^2, i.e. E' = T E T^T with T = I + R (R sparse)."""
    D = offs[-1]
    K = len(offs) - 1
    W = E.shape[0]
    c = torch.stack([delta[offs[k] : offs[k + 1]].square().sum() for k in range(K)])  # (K,)
    dmat = torch.zeros(K, D, dtype=E.dtype, device=E.device)  # row k = 2 delta^k placed in block k
    for k in range(K):
        dmat[k, offs[k] : offs[k + 1]] = 2.0 * delta[offs[k] : offs[k + 1]]
    e_last = E[-1]  # (W,)
    RE = torch.zeros_like(E)
    RE[:D] = delta[:, None] * e_last[None, :]
    RE[D : D + K] = dmat @ E[:D] + c[:, None] * e_last[None, :]
    RER = torch.zeros_like(E)
    RER[:, :D] = RE[:, -1:] * delta[None, :]
    RER[:, D : D + K] = RE[:, :D] @ dmat.T + RE[:, -1:] * c[None, :]
    assert RER.shape == (W, W)
    return E + RE + RE.T + RER


class StreamingCKA:
    """Exact streamed linear CKA and debiased linear CKA between every pair of K feature blocks.

    Memory: one float64 (D+K+1)^2 matrix (D = sum of block widths), independent of n. Cost per batch of b
    rows: one (b x (D+K+1))^T (b x (D+K+1)) float64 matrix product. See the module docstring for formulas.

    >>> acc = StreamingCKA()
    >>> for batch in batches: acc.update([h0, h1, h2])      # (b, d_k) each
    >>> acc.reduce()                                        # only under torch.distributed
    >>> acc.linear_cka().values                             # (3, 3)
    """

    def __init__(self, constant_rtol: float | None = None, device: str | torch.device = "cpu"):
        self.constant_rtol = constant_rtol
        self.device = torch.device(device)
        self.dims: list[int] | None = None
        self.offs: list[int] | None = None
        self.shift: torch.Tensor | None = None
        self.E: torch.Tensor | None = None
        self.rtol_dtypes: list[torch.dtype] | None = None

    @property
    def n(self) -> int:
        return 0 if self.E is None else int(round(float(self.E[-1, -1])))

    def _allocate(self, dims: list[int]) -> None:
        self.dims = list(dims)
        self.offs = [0]
        for d in dims:
            self.offs.append(self.offs[-1] + d)
        W = self.offs[-1] + len(dims) + 1
        self.E = torch.zeros(W, W, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, blocks) -> None:
        """Add one batch: ``blocks`` = list of K tensors (b, d_k) holding the same b samples."""
        blocks = _validate_blocks(blocks, self.dims)
        z = torch.cat([x.to(device=self.device, dtype=torch.float64) for x in blocks], dim=1)  # (b, D)
        _check_finite(z, "batch")
        if self.E is None:
            self._allocate([x.shape[1] for x in blocks])
            self.shift = z.mean(dim=0)
            self.rtol_dtypes = [x.dtype for x in blocks]
        else:
            self.rtol_dtypes = [_less_precise(a, x.dtype) for a, x in zip(self.rtol_dtypes, blocks)]
        u = z - self.shift
        K = len(self.dims)
        if len(set(self.dims)) == 1:
            a = u.view(u.shape[0], K, self.dims[0]).square().sum(-1)
        else:
            a = torch.stack([u[:, self.offs[k] : self.offs[k + 1]].square().sum(1) for k in range(K)], dim=1)
        w = torch.cat([u, a, torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)], dim=1)
        self.E.addmm_(w.T, w)

    @torch.no_grad()
    def reduce(self) -> StreamingCKA:
        """Sum the statistics of all processes (no-op without an initialised multi-process group).
        Every process must call it; processes that saw no data contribute nothing."""
        dist = _dist()
        if dist is None:
            return self
        info = [None] * dist.get_world_size()
        mine = None if self.E is None else (self.dims, [str(d) for d in self.rtol_dtypes])
        dist.all_gather_object(info, mine)
        have = [i for i, v in enumerate(info) if v is not None]
        if not have:
            raise ValueError("StreamingCKA.reduce: no process has seen any data")
        src = have[0]
        dims = info[src][0]
        if any(info[i][0] != dims for i in have):
            raise ValueError(f"StreamingCKA.reduce: processes saw different block widths: {[info[i] for i in have]}")
        dtypes = [getattr(torch, s.split(".")[-1]) for s in info[src][1]]
        for i in have:
            dtypes = [_less_precise(a, getattr(torch, s.split(".")[-1])) for a, s in zip(dtypes, info[i][1])]
        if self.E is None:
            self._allocate(dims)
            self.shift = torch.zeros(self.offs[-1], dtype=torch.float64, device=self.device)
        shift0 = self.shift.clone()
        dist.broadcast(shift0, src=src)
        # u' = z - shift0 = u + (shift - shift0)
        if self.n > 0:
            self.E = _reshift(self.E, self.shift - shift0, self.offs)
        self.shift = shift0
        self.rtol_dtypes = dtypes
        dist.all_reduce(self.E)
        return self

    def _centered(self, need_p: bool):
        if self.E is None:
            raise ValueError("no data: call update() first")
        n = float(self.E[-1, -1])
        D, K = self.offs[-1], len(self.dims)
        su = self.E[:D, -1]
        S = self.E[:D, :D]  # sum u u^T with u = z - shift
        # ||C_kl||_F^2 with C = S - su su^T / n (the centred cross-products), without forming C:
        # ||S_kl||^2 - 2/n su_k^T S_kl su_l + ||su_k||^2 ||su_l||^2 / n^2. Every term is at the spread scale
        # (the shift is a data mean), so nothing cancels catastrophically.
        sig = torch.zeros(K, D, dtype=S.dtype, device=S.device)  # row k = su placed in block k
        for k in range(K):
            sig[k, self.offs[k] : self.offs[k + 1]] = su[self.offs[k] : self.offs[k + 1]]
        q = sig.square().sum(1)  # ||su_k||^2
        H = _block_sq_norm(S, self.offs) - 2.0 / n * (sig @ S @ sig.T) + torch.outer(q, q) / n**2
        P = None
        if need_p:
            Ec = _reshift(self.E, -su / n, self.offs)
            P = Ec[D : D + K, D : D + K]
        t = torch.stack([torch.diagonal(S[self.offs[k] : self.offs[k + 1], self.offs[k] : self.offs[k + 1]]).sum() for k in range(K)]) - q / n
        # per column j: centred sum of squares sum_i x~_ij^2 and raw sum_i x_ij^2 = sum (u_ij + s_j)^2
        s = self.shift
        diag = torch.diagonal(S)
        col_c = (diag - su.square() / n).clamp_min(0.0)
        col_r = diag + 2 * s * su + n * s.square()
        rtol = [default_constant_rtol(d) if self.constant_rtol is None else self.constant_rtol for d in self.rtol_dtypes]
        const = torch.stack(
            [~feature_varies(col_c[self.offs[k] : self.offs[k + 1]], col_r[self.offs[k] : self.offs[k + 1]], rtol[k]) for k in range(K)]
        )
        return n, H, P, t, const

    def _finish(self, H: torch.Tensor, const: torch.Tensor, n: float) -> SimilarityMatrix:
        d = torch.diagonal(H).clone()
        bad = const | (d <= 0)
        d = torch.where(bad, torch.ones_like(d), d)
        vals = H / torch.sqrt(torch.outer(d, d))
        undef = bad[:, None] | bad[None, :]
        vals = torch.where(undef, torch.full_like(vals, float("nan")), vals)
        return SimilarityMatrix(
            values=vals.cpu().numpy(),
            undefined=undef.cpu().numpy(),
            undefined_blocks=[int(i) for i in torch.nonzero(bad).flatten()],
            n=int(round(n)),
        )

    def linear_cka(self) -> SimilarityMatrix:
        """(K x K) exact linear CKA, CKA_kl = ||C_kl||_F^2 / sqrt(||C_kk||_F^2 ||C_ll||_F^2)."""
        n, H, _, _, const = self._centered(need_p=False)
        if n < 2:
            raise ValueError(f"linear CKA needs at least 2 samples, got {int(n)}")
        return self._finish(H, const, n)

    def debiased_cka(self) -> SimilarityMatrix:
        """(K x K) exact debiased linear CKA,
        H_kl = ||C_kl||_F^2 - n/(n-2) P_kl + t_k t_l/((n-1)(n-2)), dCKA_kl = H_kl / sqrt(H_kk H_ll)."""
        n, H, P, t, const = self._centered(need_p=True)
        if n < 4:
            raise ValueError(f"debiased CKA needs at least 4 samples, got {int(n)}")
        terms = (H, -n / (n - 2) * P, torch.outer(t, t) / ((n - 1) * (n - 2)))
        H = terms[0] + terms[1] + terms[2]
        # H_kk is a difference of terms: below 64 eps of their size it is rounding noise, i.e. 0 (undefined)
        size = torch.diagonal(terms[0].abs() + terms[1].abs() + terms[2].abs())
        const = const | (torch.diagonal(H) <= 64 * torch.finfo(torch.float64).eps * size)
        return self._finish(H, const, n)

    def mean(self) -> list[torch.Tensor]:
        """Per-block column means (float64)."""
        if self.E is None:
            raise ValueError("no data: call update() first")
        m = self.shift + self.E[: self.offs[-1], -1] / self.E[-1, -1]
        return [m[self.offs[k] : self.offs[k + 1]] for k in range(len(self.dims))]


def _less_precise(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    fa = torch.finfo(a).eps if a.is_floating_point else torch.finfo(torch.float64).eps
    fb = torch.finfo(b).eps if b.is_floating_point else torch.finfo(torch.float64).eps
    return a if fa >= fb else b


class StreamingMean:
    """Float64 per-block column means over a stream (first pass of centred cosine)."""

    def __init__(self):
        self.sums: list[torch.Tensor] | None = None
        self.n = 0

    @torch.no_grad()
    def update(self, blocks) -> None:
        blocks = _validate_blocks(blocks, None if self.sums is None else [s.shape[0] for s in self.sums])
        for i, x in enumerate(blocks):
            _check_finite(x, f"block {i}")
        s = [x.to(torch.float64).sum(0).cpu() for x in blocks]
        self.sums = s if self.sums is None else [a + b for a, b in zip(self.sums, s)]
        self.n += blocks[0].shape[0]

    def reduce(self) -> StreamingMean:
        dist = _dist()
        if dist is not None:
            flat = torch.cat(self.sums + [torch.tensor([float(self.n)], dtype=torch.float64)])
            dist.all_reduce(flat)
            self.n = int(round(float(flat[-1])))
            out, o = [], 0
            for s in self.sums:
                out.append(flat[o : o + s.shape[0]])
                o += s.shape[0]
            self.sums = out
        return self

    def means(self) -> list[torch.Tensor]:
        return [s / self.n for s in self.sums]


class StreamingCosine:
    """Exact streamed sample-wise cosine between every pair of K equally wide blocks:

        COS_kl = (1/n) sum_i <x_i^k, x_i^l> / (||x_i^k|| ||x_i^l||)

    ``center``: optional list of K per-block mean vectors subtracted from every sample first (the exact
    whole-dataset means come from a first pass, e.g. :class:`StreamingMean`). A block with a zero-norm
    sample (``||x_i|| == 0``, or with centring: no entry of ``x_i - mean`` beyond the rounding of the raw
    value, :func:`~hf_align.analysis.similarity.feature_varies` applied to the sample) is undefined.
    """

    def __init__(self, center: list[torch.Tensor] | None = None, constant_rtol: float | None = None):
        self.center = None if center is None else [torch.as_tensor(c, dtype=torch.float64) for c in center]
        self.constant_rtol = constant_rtol
        self.sums: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.n = 0
        self.width: int | None = None

    @torch.no_grad()
    def update(self, blocks) -> None:
        blocks = _validate_blocks(blocks, None if self.width is None else [self.width] * self.sums.shape[0])
        widths = {x.shape[1] for x in blocks}
        if len(widths) != 1:
            raise ValueError(f"sample-wise cosine needs all layers to have the same width, got {sorted(widths)}")
        x = torch.stack([b.to(torch.float64) for b in blocks], dim=1)  # (b, K, d)
        _check_finite(x, "batch")
        raw_x = x
        if self.center is not None:
            if len(self.center) != x.shape[1]:
                raise ValueError(f"center has {len(self.center)} mean vectors, but the batch has {x.shape[1]} blocks")
            c = torch.stack(self.center).to(x.device)[None]
            raw_x = (x.square() + c.square()).sqrt()  # the operands of the subtraction set its rounding
            x = x - c
        norms = torch.linalg.vector_norm(x, dim=-1)  # (b, K)
        rtols = torch.tensor(
            [default_constant_rtol(b.dtype) if self.constant_rtol is None else self.constant_rtol for b in blocks],
            dtype=torch.float64,
        )
        zero = ~feature_varies(x.square(), raw_x.square(), rtols[None]) if self.center is not None else (norms == 0)
        xn = x / torch.where(zero, torch.ones_like(norms), norms)[..., None]
        s = torch.einsum("bkd,bld->kl", xn, xn).cpu()
        z = zero.sum(0).cpu()
        if self.sums is None:
            self.sums, self.zero, self.width = s, z, x.shape[-1]
        else:
            self.sums += s
            self.zero += z
        self.n += x.shape[0]

    def reduce(self) -> StreamingCosine:
        dist = _dist()
        if dist is not None:
            flat = torch.cat([self.sums.flatten(), self.zero.to(torch.float64), torch.tensor([float(self.n)], dtype=torch.float64)])
            dist.all_reduce(flat)
            K = self.sums.shape[0]
            self.sums = flat[: K * K].reshape(K, K)
            self.zero = flat[K * K : K * K + K].round().long()
            self.n = int(round(float(flat[-1])))
        return self

    def cosine(self) -> SimilarityMatrix:
        if self.sums is None:
            raise ValueError("no data: call update() first")
        bad = self.zero > 0
        vals = self.sums / self.n
        undef = bad[:, None] | bad[None, :]
        vals = torch.where(undef, torch.full_like(vals, float("nan")), vals)
        return SimilarityMatrix(vals.numpy(), undef.numpy(), [int(i) for i in torch.nonzero(bad).flatten()], self.n)


class StreamingMinibatchCKA:
    """Minibatch CKA (Nguyen et al. 2021) between every pair of K blocks, each update being one minibatch:

        CKA_kl = sum_b HSIC_1(K_b^k, K_b^l) / sqrt(sum_b HSIC_1(K_b^k, K_b^k) sum_b HSIC_1(K_b^l, K_b^l))

    (the means' 1/B factors cancel). Linear kernels on per-batch-centred features (HSIC_1 is translation
    invariant). Every update needs >= 4 rows (ValueError otherwise). A block whose per-batch centred
    features vanish in every batch (constant features) is undefined.
    """

    def __init__(self, constant_rtol: float | None = None):
        self.constant_rtol = constant_rtol
        self.sums: torch.Tensor | None = None
        self.cen = None  # per block: per-column sums of squares of the per-batch centred features
        self.raw = None  # per block: per-column sums of squares of the raw features
        self.size = None  # per block: sizes of the terms of HSIC_1(K, K) (bounds its rounding noise)
        self.batches = 0
        self.n = 0
        self.dims = None
        self.dtypes = None

    @torch.no_grad()
    def update(self, blocks) -> None:
        from .similarity import _hsic1_grams, _hsic1_size

        blocks = _validate_blocks(blocks, self.dims)
        b = blocks[0].shape[0]
        if b < 4:
            raise ValueError(f"minibatch CKA needs >= 4 samples per minibatch (HSIC_1), got a batch of {b}")
        xs = [x.to(torch.float64) for x in blocks]
        for i, x in enumerate(xs):
            _check_finite(x, f"block {i}")
        xc = [x - x.mean(0, keepdim=True) for x in xs]
        if len({x.shape[1] for x in xs}) == 1:
            st = torch.stack(xc)
            grams = torch.bmm(st, st.transpose(1, 2))
        else:
            grams = torch.stack([x @ x.T for x in xc])
        h = _hsic1_grams(grams, grams).cpu()
        size = _hsic1_size(grams).cpu()
        cen = [x.square().sum(0).cpu() for x in xc]  # per block, per column
        raw = [x.square().sum(0).cpu() for x in xs]
        if self.sums is None:
            self.sums, self.cen, self.raw, self.size = h, cen, raw, size
            self.dims = [x.shape[1] for x in xs]
            self.dtypes = [x.dtype for x in blocks]
        else:
            self.sums += h
            self.size = self.size + size
            self.cen = [a + b for a, b in zip(self.cen, cen)]
            self.raw = [a + b for a, b in zip(self.raw, raw)]
            self.dtypes = [_less_precise(a, x.dtype) for a, x in zip(self.dtypes, blocks)]
        self.batches += 1
        self.n += b

    def reduce(self) -> StreamingMinibatchCKA:
        dist = _dist()
        if dist is not None:
            K = self.sums.shape[0]
            flat = torch.cat([self.sums.flatten(), *self.cen, *self.raw, self.size, torch.tensor([float(self.batches), float(self.n)], dtype=torch.float64)])
            dist.all_reduce(flat)
            self.sums = flat[: K * K].reshape(K, K)
            o = K * K
            for part in (self.cen, self.raw):
                for k in range(K):
                    part[k] = flat[o : o + self.dims[k]]
                    o += self.dims[k]
            self.size = flat[o : o + K]
            self.batches, self.n = int(round(float(flat[-2]))), int(round(float(flat[-1])))
        return self

    def minibatch_cka(self) -> SimilarityMatrix:
        if self.sums is None:
            raise ValueError("no data: call update() first")
        rtol = [default_constant_rtol(d) if self.constant_rtol is None else self.constant_rtol for d in self.dtypes]
        d = torch.diagonal(self.sums).clone()
        const = torch.stack([~feature_varies(c, r, t) for c, r, t in zip(self.cen, self.raw, rtol)])
        bad = const | (d <= 64 * torch.finfo(torch.float64).eps * self.size)  # HSIC_1(K, K) of rounding noise
        d = torch.where(bad, torch.ones_like(d), d)
        vals = self.sums / torch.sqrt(torch.outer(d, d))
        undef = bad[:, None] | bad[None, :]
        vals = torch.where(undef, torch.full_like(vals, float("nan")), vals)
        return SimilarityMatrix(vals.numpy(), undef.numpy(), [int(i) for i in torch.nonzero(bad).flatten()], self.n)
