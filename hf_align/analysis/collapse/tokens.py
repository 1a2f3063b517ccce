"""Token-level collapse of a causal LM: the vocabulary as the classes (K >> d), through depth.

A causal LM is a classifier with K = vocabulary classes applied at every position (the generalized-collapse
paper's first example of K >> d; Wu & Papyan, "Linguistic Collapse", NeurIPS 2024). For layer l
(0 = embeddings) and every *predicted* position t of a sequence:

* feature h_t^l = the LM head's input when the model's own head runs on layer l's hidden state (the final
  norm applied: :meth:`hf_align.LayerView.head_features`); at l = L it is exactly what ``lm_head`` receives;
* class y_t = the next token: ``labels[t + 1]`` when the batch holds ``labels`` (the transformers causal-LM
  convention, shifted inside the model), else ``input_ids[t + 1]``;
* excluded: positions whose own or next token is padding (``attention_mask`` 0), and targets ``-100``;
* W = the LM head's weight (K x d, one row per token).

Counts, class means and the pooled within-class scatter are streamed in float64 (:class:`ClassStatistics`,
memory O(K d + d^2) per layer, never O(N d)), summed over processes. A vocabulary is Zipfian: most classes are
rare or absent in any finite text, so every metric averages over the classes S with at least ``min_count``
tokens (the classes left out are counted in the report). Two weightings of the classes in S:

* ``balanced`` (the paper's definitions, every class alike): pi_k = 1 / |S|;
* ``frequency`` (the frequency-aware variants of the linguistic-collapse literature; keys end in ``_freq``):
  pi_k = n_k / N, N = sum_{k in S} n_k.

With mu_k the class means, mu_G = sum_k pi_k mu_k and mu~_k = mu_k - mu_G, per layer:

* ``nc1`` (GNC1, variability) = tr(Sigma_W Sigma_B^+) / |S|, Sigma_B = sum_k pi_k mu~_k mu~_k^T and
  Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T (the pooled scatter, frequency-weighted by nature:
  a per-class balanced Sigma_W would need O(K d^2) memory);
* ``cdnv`` (class-distance normalised variance, Galanti et al. 2022; Wu & Papyan's variability measure):
  sum_{k != k'} pi_k pi_k' CDNV_kk' / sum_{k != k'} pi_k pi_k', CDNV_kk' = (sigma_k^2 + sigma_k'^2) /
  (2 ||mu_k - mu_k'||^2), sigma_k^2 = (1/n_k) sum_{y_i = k} ||h_i - mu_k||^2 (0 for a class of one token),
  over the pairs whose means differ (``coincident_mean_pairs``: the fraction left out, see :func:`cdnv`);
* ``mean_norm`` = sum_k pi_k ||mu~_k|| and ``equinorm`` = its pi-weighted coefficient of variation
  sqrt(sum_k pi_k (||mu~_k|| - mean_norm)^2) / mean_norm;
* ``gnc2_means_margin`` = min_{k in S} dist(m_k, conv{m_j : j in S, j != k}) for the unit centered means
  m_k = mu~_k / ||mu~_k|| (centred on the mean of the means, whatever the weighting) (the GNC2 one-vs-rest margin of the means, exact, :func:`gnc2`), with
  ``gnc2_means_margin_mean`` = sum_k pi_k margin_k and ``gnc2_means_margin_median``;
* ``gnc3`` = sum_k pi_k [1 - cos(w_k, mu~_k)] (GNC3, alignment of W with the means; 0 = aligned), over the
  classes whose head row is not zero (pi renormalised).

The head (``TokenCollapseReport.classifier``, one value per model): ``gnc2_W_margin`` (min over the whole
vocabulary), ``gnc2_W_margin_mean`` / ``_median`` over all K, the same restricted to S
(``gnc2_W_seen_margin``, ``..._mean``, ``..._mean_freq``: the margins of w_k within the seen rows, the
comparison for the means' margin), and ``tammes_max_cosine`` (largest pairwise cosine of the rows). Rows that
are exactly zero (a pad token's row with ``padding_idx``) have no direction: they are left out (``zero_rows``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...data import (
    IGNORE_INDEX,
    iter_batches,
    pad_token_id,
    rank_and_world,
    require_reiterable,
    to_device,
)
from ...layers import eval_mode
from ..similarity import default_constant_rtol
from ._checks import _normalize_rows
from .gnc2 import gnc2
from .nc import tammes
from .results import CollapseReport, UndefinedCollapseWarning, _undefined_reason
from .statistics import ClassStatistics

__all__ = ["TokenCollapseReport", "token_collapse_report", "token_collapse_metrics", "token_targets", "cdnv", "WEIGHTINGS"]

WEIGHTINGS = ("balanced", "frequency")
_SUFFIX = {"balanced": "", "frequency": "_freq"}


@dataclass
class TokenCollapseReport(CollapseReport):
    """:class:`CollapseReport` of a causal LM with the vocabulary as the classes (see the module docstring).

    ``num_classes`` is the vocabulary size K (rows of the LM head); ``seen_classes`` the token ids in S (at
    least ``min_count`` target tokens), in increasing order; ``class_counts`` the target count of every token
    (K,); ``num_samples`` the number of target tokens in S. ``num_unseen`` tokens never occur as a target;
    ``num_rare`` occur but fewer than ``min_count`` times (their tokens are left out of every metric)."""

    min_count: int = 1
    weightings: tuple[str, ...] = WEIGHTINGS
    seen_classes: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    class_counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    num_tokens: int = 0  # every target token, including those of classes left out

    @property
    def num_seen(self) -> int:
        return int(self.seen_classes.size)

    @property
    def num_unseen(self) -> int:
        return int(np.count_nonzero(self.class_counts == 0))

    @property
    def num_rare(self) -> int:
        return int(np.count_nonzero((self.class_counts > 0) & (self.class_counts < self.min_count)))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            level="token", min_count=self.min_count, weightings=list(self.weightings), num_tokens=self.num_tokens,
            num_seen=self.num_seen, num_unseen=self.num_unseen, num_rare=self.num_rare,
        )
        return out


def token_targets(inputs: dict[str, Any], labels: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, valid)`` for the predicted positions t = 0..T-2 of a (B, T) batch: targets[b, t] is the
    class of the feature at position t (``labels[b, t+1]`` if ``labels`` is given, else ``input_ids[b, t+1]``)
    and ``valid`` is False where position t or t+1 is padding or the target is -100."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("token-level collapse needs 2-D input_ids (batch x positions)")
    source = ids if labels is None else torch.as_tensor(labels)
    if source.shape != ids.shape:
        raise ValueError(f"labels of shape {tuple(source.shape)} do not match input_ids {tuple(ids.shape)} (one label per token)")
    mask = inputs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to(ids.device).bool()
    targets = source[:, 1:].to(ids.device)
    valid = real[:, :-1] & real[:, 1:] & (targets != IGNORE_INDEX)
    return targets, valid


def cdnv(stats: ClassStatistics, weights: np.ndarray | None = None, *, block: int = 2048) -> tuple[float, float]:
    """Weighted mean class-distance normalised variance over the pairs k != k' (Galanti et al. 2022), and the
    fraction of pairs left out because their means coincide:

        CDNV = sum' pi_k pi_k' (sigma_k^2 + sigma_k'^2) / (2 ||mu_k - mu_k'||^2) / sum' pi_k pi_k',

    sum' over the ordered pairs k != k' whose means differ (``||mu_k - mu_k'||^2 > 1e-12 (||mu_k||^2 +
    ||mu_k'||^2)``; coinciding means -- e.g. two tokens that only ever follow the same token, at the embedding
    layer -- make the ratio infinite or 0/0). ``weights`` = pi, default uniform. Exact: blocked float64 passes
    over the K x K pairs (memory O(block K)); near-coincident pairs are recomputed as ||mu_k - mu_k'||^2."""
    K = stats.num_classes
    pi = np.full(K, 1.0 / K) if weights is None else np.asarray(weights, dtype=np.float64)
    values, dropped = _cdnv_many(stats, [pi], block)
    return values[0], dropped


def _cdnv_many(stats: ClassStatistics, weights: Sequence[np.ndarray], block: int = 2048) -> tuple[list[float], float]:
    """:func:`cdnv` for several weight vectors in one pass over the pairs (the ratios are computed once)."""
    M = stats.means()
    var = stats.class_variances()
    K = M.shape[0]
    if K < 2:
        raise ValueError("cdnv needs at least 2 classes")
    Mt = torch.from_numpy(M)
    sq = torch.from_numpy(np.einsum("kd,kd->k", M, M))
    v = torch.from_numpy(var)
    ps = [torch.from_numpy(np.asarray(w, dtype=np.float64)) for w in weights]
    num, den = [0.0] * len(ps), [0.0] * len(ps)
    dropped = 0.0
    for s in range(0, K, block):
        e = min(K, s + block)
        scale = sq[s:e, None] + sq[None, :]
        d2 = scale - 2.0 * (Mt[s:e] @ Mt.T)  # ||mu_k - mu_k'||^2 (expanded; cancels for close means)
        close = d2 < 1e-6 * scale
        if close.any():
            rows, cols = close.nonzero(as_tuple=True)
            d2[rows, cols] = (Mt[s + rows] - Mt[cols]).pow(2).sum(-1)
        r = torch.arange(e - s)
        ok = d2 > 1e-12 * scale
        ok[r, r + s] = False  # k = k' excluded
        ratio = torch.where(ok, (v[s:e, None] + v[None, :]) / (2.0 * torch.where(ok, d2, torch.ones_like(d2))), 0.0)
        for i, p in enumerate(ps):
            w = torch.where(ok, p[s:e, None] * p[None, :], 0.0)
            num[i] += float((w * ratio).sum())
            den[i] += float(w.sum())
        dropped += float(ok.numel() - ok.sum() - (e - s))
    if den[0] == 0:
        raise ValueError("all class means coincide: CDNV is undefined")
    return [n / d for n, d in zip(num, den)], dropped / (K * (K - 1))


def _weights(stats: ClassStatistics, weighting: str) -> np.ndarray:
    K = stats.num_classes
    if weighting == "balanced":
        return np.full(K, 1.0 / K)
    n = stats.counts.astype(np.float64)
    return n / n.sum()


def _layer_metrics(stats: ClassStatistics, Ws: np.ndarray | None, weightings: Sequence[str],
                   gnc2_options: dict[str, Any], gnc2_margin: bool = True) -> dict[str, float]:
    """Every per-layer metric of the module docstring for the statistics of the classes in S."""
    out: dict[str, float] = {}
    K = stats.num_classes
    means = stats.means()
    sw = stats.within_class_covariance()
    margins = None
    if gnc2_margin:  # the margins of the unit centered means, centred on the mean of the means (the paper's mu_G)
        res = gnc2(_normalize_rows(means - means.mean(0), "centered class means"), **gnc2_options)
        margins = res.margins
        out["gnc2_means_margin"] = float(res.margin)
        out["gnc2_means_margin_median"] = float(np.median(margins))
    pis = {weighting: _weights(stats, weighting) for weighting in weightings}
    values, out["coincident_mean_pairs"] = _cdnv_many(stats, list(pis.values()))
    for weighting, value in zip(pis, values):
        out["cdnv" + _SUFFIX[weighting]] = value
    for weighting, pi in pis.items():
        sfx = _SUFFIX[weighting]
        Mc = means - pi @ means
        sb = (Mc * pi[:, None]).T @ Mc
        if not np.any(sb):
            raise ValueError("all class means are equal (Sigma_B = 0)")
        out["nc1" + sfx] = float(np.trace(sw @ np.linalg.pinv(sb, hermitian=True))) / K
        norms = np.linalg.norm(Mc, axis=1)
        mean_norm = float(pi @ norms)
        out["mean_norm" + sfx] = mean_norm
        out["equinorm" + sfx] = float(math.sqrt(max(pi @ (norms - mean_norm) ** 2, 0.0)) / mean_norm)
        if margins is not None:
            out["gnc2_means_margin_mean" + sfx] = float(pi @ margins)
        if Ws is not None:  # classes whose head row is zero (no direction) are left out
            rows = np.any(Ws != 0, axis=1)
            if rows.sum() >= 1:
                cos = np.einsum("kd,kd->k", _normalize_rows(Ws[rows], "W"), _normalize_rows(Mc[rows], "centered class means"))
                out["gnc3" + sfx] = float(pi[rows] @ (1.0 - cos) / pi[rows].sum())
    return out


def _classifier_metrics(W: np.ndarray, seen: np.ndarray, counts: np.ndarray, gnc2_margin: bool,
                        gnc2_options: dict[str, Any]) -> dict[str, float]:
    """Metrics of the LM head W alone. Rows that are exactly zero (the pad token's row of a tied head with a
    ``padding_idx``) have no direction: they are left out and counted (``zero_rows``)."""
    nz = np.flatnonzero(np.any(W != 0, axis=1))
    out: dict[str, float] = {"zero_rows": float(W.shape[0] - nz.size)}
    if nz.size < 2:
        return out
    out["tammes_max_cosine"] = float(tammes(W[nz])["max_cosine"])
    if not gnc2_margin:
        return out
    full = gnc2(W[nz], **gnc2_options)
    out.update(gnc2_W_margin=float(full.margin), gnc2_W_margin_mean=float(full.margins.mean()),
               gnc2_W_margin_median=float(np.median(full.margins)))
    seen = seen[np.any(W[seen] != 0, axis=1)]
    if seen.size >= 2:
        sub = gnc2(W[seen], **gnc2_options)
        n = counts[seen].astype(np.float64)
        out.update(gnc2_W_seen_margin=float(sub.margin), gnc2_W_seen_margin_mean=float(sub.margins.mean()),
                   gnc2_W_seen_margin_mean_freq=float(n @ sub.margins / n.sum()))
    return out


def _check_options(min_count: Any, weightings: Sequence[str]) -> tuple[str, ...]:
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    weightings = tuple(weightings)
    if not weightings or any(w not in WEIGHTINGS for w in weightings):
        raise ValueError(f"weightings must be a non-empty subset of {WEIGHTINGS}, got {weightings!r}")
    return weightings


def token_collapse_metrics(
    features: Any,
    targets: Any,
    W: Any = None,
    *,
    num_classes: int | None = None,
    min_count: int = 1,
    weightings: Sequence[str] = WEIGHTINGS,
    gnc2_margin: bool = True,
    gnc2_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The token-level metrics of one layer (module docstring) from features already in hand: ``features``
    (n, d), ``targets`` (n,) token ids (-100 = no target), optional head ``W`` (K x d). Classes with fewer than
    ``min_count`` targets are left out; ``num_seen`` / ``num_rare`` / ``num_unseen`` count them (K =
    ``num_classes``, default W's rows or max(targets) + 1). What :func:`token_collapse_report` computes per layer,
    for the ``evaluate`` module."""
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64).reshape(-1)
    if X.ndim != 2 or X.shape[0] != y.size:
        raise ValueError(f"features must be (n, d) with one target per row; got {X.shape} and {y.size} targets")
    weightings = _check_options(min_count, weightings)
    Wm = None if W is None else np.asarray(W, dtype=np.float64)
    keep = y != IGNORE_INDEX
    X, y = X[keep], y[keep]
    K = int(num_classes if num_classes is not None else (Wm.shape[0] if Wm is not None else (y.max() + 1 if y.size else 0)))
    if y.size and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"targets must lie in [0, {K}) or be -100; got {int(y.min())}..{int(y.max())}")
    counts = np.bincount(y, minlength=K)
    seen = np.flatnonzero(counts >= min_count)
    if seen.size < 2:
        raise ValueError(f"only {seen.size} token(s) occur at least min_count={min_count} times as targets: need 2 classes")
    remap = np.full(K, -1, dtype=np.int64)
    remap[seen] = np.arange(seen.size)
    inside = remap[y] >= 0
    stats = ClassStatistics(int(seen.size), X.shape[1]).update(X[inside], remap[y[inside]])
    Ws = None
    if Wm is not None:
        if Wm.shape != (K, X.shape[1]):
            raise ValueError(f"W must be (num_classes, d) = ({K}, {X.shape[1]}), got {Wm.shape}")
        Ws = Wm[seen]
    gnc2_options = dict(gnc2_options or {})
    out = _layer_metrics(stats, Ws, weightings, gnc2_options, gnc2_margin)
    if Wm is not None:
        out.update(_classifier_metrics(Wm, seen, counts, gnc2_margin, gnc2_options))
    out.update(num_tokens=float(y.size), num_samples=float(inside.sum()), num_seen=float(seen.size),
               num_rare=float(np.count_nonzero((counts > 0) & (counts < min_count))),
               num_unseen=float(np.count_nonzero(counts == 0)))
    return out


@torch.no_grad()
def token_collapse_report(
    model: Any,
    data: Any,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    min_count: int = 1,
    weightings: Sequence[str] = WEIGHTINGS,
    gnc2_margin: bool = True,
    gnc2_options: dict[str, Any] | None = None,
    collate_fn=None,
    constant_rtol: float | None = None,
    on_undefined: str = "warn",
    progress: bool = False,
) -> TokenCollapseReport:
    """Token-level neural collapse of a causal LM through depth (definitions in the module docstring).

    Args:
        model: a causal LM (``...ForCausalLM``, PEFT-wrapped or not) or its :class:`hf_align.LayerView`; eval
            mode while running, every module's mode restored after.
        data: token batches as :func:`hf_align.data.iter_batches` takes them (a tokenized ``datasets.Dataset``,
            a list of ``{"input_ids": ...}`` examples, a DataLoader, an iterable of batch dicts), with
            ``attention_mask`` where there is padding and optionally ``labels`` (-100 = no target).
        layers: which layers (0 = embeddings .. L); default all.
        min_count: classes with fewer target tokens are left out of every metric (counted in the report). The
            targets are counted in a first pass over ``data`` (labels only, no forward) so that the statistics
            are allocated for the kept classes only; with ``min_count > 1`` ``data`` must therefore be
            re-iterable (a one-shot iterator with ``min_count=1`` is read once, with O(K d) statistics).
        weightings: ``"balanced"`` (the paper's: every class alike) and/or ``"frequency"`` (keys ``*_freq``).
        gnc2_margin: also the certified GNC2 margins (:func:`gnc2`) of the class means at every layer (|S|
            one-vs-rest problems each) and of W (the whole vocabulary, and the seen rows).
        gnc2_options: keyword arguments for every :func:`gnc2` call (e.g. ``tol``, ``progress``).

    Multi-process (``torch.distributed`` initialised): batch i runs on rank ``i % world_size``; counts and
    statistics are summed over ranks, so every rank returns the single-process report.
    """
    from ...layers import LayerView

    view = model if isinstance(model, LayerView) else LayerView(model)
    if view.task != "causal-lm":
        raise ValueError(f"token_collapse_report needs a causal LM; {type(view.hf_model).__name__} is a {view.task} model")
    weightings = _check_options(min_count, weightings)
    if on_undefined not in ("warn", "raise"):
        raise ValueError(f"on_undefined must be 'warn' or 'raise', got {on_undefined!r}")
    gnc2_options = dict(gnc2_options or {})
    L = view.num_layers
    chosen = list(range(L + 1)) if layers is None else [int(x) for x in layers]
    if not chosen:
        raise ValueError("layers is empty")
    for x in chosen:
        if not 0 <= x <= L:
            raise ValueError(f"layers must lie in [0, {L}] (0 = embeddings), got {x}")
    W = view.classifier.weight.detach().double().cpu().numpy()
    K = int(W.shape[0])
    rank, world = rank_and_world()
    dev = view.device
    pad = pad_token_id(view.hf_model)

    def checked_targets(batch) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"each batch must hold input_ids (token-level collapse of a causal LM); got {keys}")
        inputs = {k: torch.as_tensor(v) if k in ("input_ids", "attention_mask") and not isinstance(v, torch.Tensor) else v
                  for k, v in batch.items() if k not in ("labels", "label", "label_ids")}
        targets, valid = token_targets(inputs, batch.get("labels"))
        t = targets[valid]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= K):
            raise ValueError(f"target token ids must lie in [0, {K}) (the LM head's rows) or be -100; got "
                             f"{int(t.min())}..{int(t.max())}")
        return inputs, targets.cpu(), valid.cpu()

    def batches(desc: str):
        it, total = iter_batches(data, batch_size, collate_fn=collate_fn, pad_token_id=pad)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=total, desc=desc, disable=rank != 0)
        for batch in it:
            inputs, targets, valid = checked_targets(batch)
            yield to_device(inputs, dev), targets, valid

    def all_sum(a: np.ndarray) -> np.ndarray:
        if world == 1:
            return a
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).clone()
        torch.distributed.all_reduce(t)
        return t.numpy()

    # S known up front: one labels-only pass (cheap: no forward), so that the statistics are allocated for S only
    # (O(|S| d) per layer instead of O(K d)); needed for min_count > 1, skipped for a one-shot iterator otherwise
    remap = None
    if min_count > 1 or not isinstance(data, Iterator):
        require_reiterable(data, "min_count > 1 (the targets are counted first)")
        counts = np.zeros(K, dtype=np.int64)
        it, _ = iter_batches(data, batch_size, collate_fn=collate_fn, pad_token_id=pad)
        for batch in it:
            _, targets, valid = checked_targets(batch)
            counts += np.bincount(targets[valid].reshape(-1).numpy(), minlength=K)
        counts = all_sum(counts.astype(np.float64)).round().astype(np.int64)
        keep = np.flatnonzero(counts >= min_count)
        if counts.sum() == 0:
            raise ValueError("no target tokens: every position is padding or -100 (or data is empty)")
        if keep.size < 2:
            raise ValueError(f"only {keep.size} token(s) occur at least min_count={min_count} times as targets: need 2 classes")
        remap = np.full(K, -1, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
    Kacc = K if remap is None else int(remap.max()) + 1
    stats = [ClassStatistics(Kacc) for _ in chosen]
    sumsq: list = [0.0] * len(chosen)
    all_counts = np.zeros(K, dtype=np.int64)
    rtol = default_constant_rtol(view.dtype) if constant_rtol is None else float(constant_rtol)
    with eval_mode(view.model):
        for inputs, targets, valid in batches("token collapse"):
            y_all = targets[valid].reshape(-1)
            all_counts += np.bincount(y_all.numpy(), minlength=K)
            if remap is not None:
                y = torch.from_numpy(remap[y_all.numpy()])
                keep = y >= 0
            else:
                y, keep = y_all, torch.ones_like(y_all, dtype=torch.bool)
            if not bool(valid.any()):
                continue
            raw = view.hidden_states(**inputs)
            context = view.context(**inputs)
            sel = valid.to(dev)
            for i, layer in enumerate(chosen):
                f = view.head_features(raw[layer], context)[:, :-1][sel].to(torch.float64).cpu()[keep]
                sumsq[i] = sumsq[i] + f.square().sum(0).numpy()
                stats[i].update(f, y[keep])
        if world > 1:
            all_counts = all_sum(all_counts.astype(np.float64)).round().astype(np.int64)
            for i, s in enumerate(stats):
                if s.dim is None:
                    s._allocate(W.shape[1])
                s.reduce()
                if np.ndim(sumsq[i]) == 0:
                    sumsq[i] = np.zeros(s.dim)
                sumsq[i] = all_sum(sumsq[i])
    if stats[0].dim is None or stats[0].num_samples == 0:
        raise ValueError("no target tokens: every position is padding or -100 (or data is empty)")
    # S: the classes with at least min_count targets
    if remap is None:
        seen = np.flatnonzero(stats[0].counts >= min_count)
        stats = [s.restrict(seen) for s in stats]
    else:
        seen = np.flatnonzero(remap >= 0)
    if seen.size < 2:
        raise ValueError(f"only {seen.size} distinct target token(s): collapse metrics need at least 2 classes")
    Ws = W[seen] if W.shape[1] == stats[0].dim else None
    classifier = _classifier_metrics(W, seen, all_counts, gnc2_margin, gnc2_options) if Ws is not None else {}

    per_layer: list[dict[str, float]] = []
    reasons: dict[int, str] = {}
    for i, (s, layer) in enumerate(zip(stats, chosen)):
        why = _undefined_reason(s, sumsq[i], rtol, view.dtype)
        m: dict[str, float] = {}
        if why is None:
            try:
                m = _layer_metrics(s, Ws, weightings, gnc2_options, gnc2_margin)
            except ValueError as e:  # degenerate geometry at this layer (e.g. a zero centered mean)
                why = str(e)
        if why is not None:
            reasons[layer] = why
            m = {}
        per_layer.append(m)
    keys = {k for m in per_layer for k in m}
    for m, layer in zip(per_layer, chosen):
        if layer in reasons:
            m.update({k: float("nan") for k in keys})
    if reasons:
        listing = "; ".join(f"layer {layer}: {why}" for layer, why in reasons.items())
        msg = f"token collapse metrics are undefined for {len(reasons)} layer(s): {listing}. They are NaN."
        if on_undefined == "raise":
            raise ValueError(msg)
        warnings.warn(msg, UndefinedCollapseWarning, stacklevel=3)
    return TokenCollapseReport(
        chosen, per_layer, classifier, stats[0].num_samples, K, "token", stats,
        features="head", undefined_layers=sorted(reasons), undefined_reasons=reasons,
        min_count=int(min_count), weightings=weightings, seen_classes=seen, class_counts=all_counts,
        num_tokens=int(all_counts.sum()),
    )
