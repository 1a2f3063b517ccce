"""``layer_similarity``: run a model over a dataset once and stream the layer-by-layer similarity matrix."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .pooling import POOLINGS, pool
from .similarity import SimilarityUndefinedError
from .streaming import StreamingCKA, StreamingCosine, StreamingMean, StreamingMinibatchCKA, _dist

__all__ = ["LayerSimilarity", "UndefinedSimilarityWarning", "layer_similarity", "METRICS"]

METRICS = {
    "cosine": "cosine",
    "cka": "linear_cka",
    "linear_cka": "linear_cka",
    "debiased_cka": "debiased_cka",
    "debiased_linear_cka": "debiased_cka",
    "minibatch_cka": "minibatch_cka",
}

_PAD_KEYS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "special_tokens_mask"}


class UndefinedSimilarityWarning(UserWarning):
    """Some layers' similarity is undefined (constant features); their entries are NaN and flagged."""


@dataclass
class LayerSimilarity:
    """Result of :func:`layer_similarity`.

    ``matrix[k, l]`` is the similarity between layer ``layers[k]`` (of model A) and ``layers_b[l]`` (of model
    B, or A again); layer 0 is the embedding output, layer l the output of block l. ``undefined[k, l]`` is
    True (and ``matrix[k, l]`` NaN) exactly where the metric is undefined, listed in ``undefined_layers``.
    """

    matrix: np.ndarray
    metric: str
    pooling: str
    layers: list[int]
    layers_b: list[int]
    undefined: np.ndarray
    undefined_layers: list[str] = field(default_factory=list)
    num_samples: int = 0
    cross: bool = False

    def plot(self, path=None, title: str | None = None, ax=None):
        """Heatmap (see :func:`hf_align.analysis.plots.plot_similarity`); returns the Figure."""
        from .plots import plot_similarity

        cross = self.cross
        return plot_similarity(
            self.matrix,
            layers=self.layers,
            layers_b=self.layers_b,
            undefined=self.undefined,
            title=title or f"{self.metric} ({self.pooling} pooling, n={self.num_samples})",
            xlabel="layer (model B)" if cross else "layer",
            ylabel="layer (model A)" if cross else "layer",
            path=path,
            ax=ax,
        )

    def __repr__(self) -> str:
        return (
            f"LayerSimilarity(metric={self.metric!r}, pooling={self.pooling!r}, shape={self.matrix.shape}, "
            f"num_samples={self.num_samples}, undefined_layers={self.undefined_layers})"
        )


# ---------------------------------------------------------------------------------------------- data


def _is_batch(d: Mapping) -> bool:
    v = d.get("input_ids", d.get("pixel_values"))
    if isinstance(v, torch.Tensor):
        return v.ndim == (4 if "input_ids" not in d else 2)
    return False


def _default_collate(examples: list[Mapping], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack a list of examples; pad token sequences on the right (input_ids with ``pad_token_id``, the rest
    with 0) and build an ``attention_mask`` if padding was needed. Non-numeric columns (text) are dropped."""
    keys = [k for k, v in examples[0].items() if not isinstance(v, (str, bytes)) and v is not None]
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        vals = []
        for ex in examples:
            v = ex[k]
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], (str, bytes)):
                break
            vals.append(torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v)
        else:
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) == 1:
                out[k] = torch.stack(vals)
            elif k in _PAD_KEYS and all(v.ndim == 1 for v in vals):
                T = max(v.shape[0] for v in vals)
                fill = pad_token_id if k == "input_ids" else 0
                out[k] = torch.stack([torch.cat([v, v.new_full((T - v.shape[0],), fill)]) for v in vals])
                if k == "input_ids" and "attention_mask" not in examples[0]:
                    out["attention_mask"] = torch.stack(
                        [torch.cat([torch.ones(v.shape[0], dtype=torch.long), torch.zeros(T - v.shape[0], dtype=torch.long)]) for v in vals]
                    )
            else:
                raise ValueError(f"cannot batch column {k!r}: examples have shapes {sorted(shapes)}; pass a collate_fn")
    for k in ("label", "labels"):
        out.pop(k, None)
    return out


def _batches(data, batch_size: int, collate_fn, pad_token_id: int, rank: int, world: int):
    """Yield this process's batches: the global batch sequence dealt round-robin (batch i -> rank i % world),
    so every process count sees the same batches. Returns (iterator, number of batches for this rank)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if isinstance(data, DataLoader):
        if isinstance(data.sampler, DistributedSampler) or world == 1:
            return iter(data), _len(data)
        n = _len(data)
        return (b for i, b in enumerate(data) if i % world == rank), (None if n is None else len(range(rank, n, world)))
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, Sequence) and not hasattr(data, "__getitem__"):
        raise TypeError(
            f"data must be a datasets.Dataset, a torch DataLoader or a list of input dicts, got {type(data).__name__}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(data)
    if n == 0:
        raise ValueError("data is empty")
    first = data[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"data items must be dicts of model inputs, got {type(first).__name__}")
    if _is_batch(first):  # a list of ready batches
        return (data[i] for i in range(rank, n, world)), len(range(rank, n, world))
    collate = collate_fn or (lambda ex: _default_collate(ex, pad_token_id))
    starts = list(range(0, n, batch_size))[rank::world]

    def gen():
        for s in starts:
            idx = list(range(s, min(s + batch_size, n)))
            try:
                examples = data[idx] if hasattr(data, "column_names") else [data[i] for i in idx]
            except TypeError:
                examples = [data[i] for i in idx]
            if isinstance(examples, Mapping):  # datasets.Dataset returns a dict of columns
                examples = [{k: examples[k][j] for k in examples} for j in range(len(idx))]
            yield collate(examples)

    return gen(), len(starts)


def _len(x):
    try:
        return len(x)
    except TypeError:
        return None


def _to_device(batch: Mapping, device) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"each batch must be a dict of model inputs (input_ids=..., attention_mask=...), got {type(batch).__name__}")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k not in ("labels", "label")}


# ---------------------------------------------------------------------------------------------- main


def layer_similarity(
    model,
    data,
    metric: str = "cka",
    pooling: str = "cls",
    batch_size: int = 32,
    model_b=None,
    *,
    center: bool = False,
    collate_fn=None,
    progress: bool = True,
    on_undefined: str = "warn",
    constant_rtol: float | None = None,
) -> LayerSimilarity:
    """Similarity between every pair of layers of ``model`` (or layers of ``model`` vs layers of ``model_b``)
    over ``data``, streamed: one forward per batch under ``torch.no_grad``, memory independent of the data size.

    Args:
        model: any model :class:`hf_align.LayerView` supports (it is wrapped, not copied; eval mode while
            running, restored after).
        data: a ``datasets.Dataset`` or a list of example dicts (batched by ``batch_size``, padded on the right
            by the default collate, or by ``collate_fn``), a list of ready batch dicts, or a ``DataLoader``
            yielding dicts of model inputs.
        metric: ``"cka"`` (= ``"linear_cka"``, exact), ``"debiased_cka"`` (exact, U-centred HSIC),
            ``"cosine"`` (the paper's sample-wise cosine; ``center=True`` subtracts the dataset mean of each
            layer, which needs a second pass over the data), ``"minibatch_cka"`` (Nguyen et al.; each batch
            is one minibatch, so every batch needs >= 4 samples).
        pooling: ``"cls"``, ``"mean"`` (mask-aware), ``"last"`` (last non-padding token) or ``"tokens"``
            (every non-padding token is a sample).
        model_b: a second model run on the same batches; the matrix is then (L_A+1) x (L_B+1).
        on_undefined: ``"warn"`` (default): layers whose similarity is undefined (constant features, e.g.
            BERT's embedding output at CLS) get NaN entries, ``undefined`` True and a
            :class:`UndefinedSimilarityWarning` naming them; ``"raise"``: raise
            :class:`~hf_align.analysis.similarity.SimilarityUndefinedError` instead.

    Multi-process: when ``torch.distributed`` is initialised (``torchrun``, or ``accelerate launch`` after
    ``Accelerator()``), batch i runs on rank ``i % world_size`` and the float64 sums are all-reduced, so
    every rank returns exactly the single-process matrix.
    """
    from ..layers import LayerView

    if metric not in METRICS:
        hint = " (RBF CKA needs all n^2 sample pairs: use hf_align.analysis.rbf_cka on features)" if "rbf" in str(metric) else ""
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}{hint}")
    metric = METRICS[metric]
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if on_undefined not in ("warn", "raise"):
        raise ValueError(f"on_undefined must be 'warn' or 'raise', got {on_undefined!r}")
    if center and metric != "cosine":
        raise ValueError("center=True applies to metric='cosine' (CKA always centres)")

    views = [LayerView(model)] + ([LayerView(model_b)] if model_b is not None else [])
    ka = views[0].num_layers + 1
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    cfg = getattr(views[0].hf_model, "config", None)
    pad_id = getattr(cfg, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    device = views[0].device

    def run_pass(acc, desc):
        from tqdm.auto import tqdm

        it, total = _batches(data, batch_size, collate_fn, pad_id, rank, world)
        for batch in tqdm(it, total=total, desc=desc, disable=not progress or rank != 0):
            batch = _to_device(batch, device)
            mask = batch.get("attention_mask")
            blocks = []
            for view in views:
                hs = view.hidden_states(**batch)
                blocks.extend(pool(h, mask, pooling) for h in hs)
            acc.update(blocks)
        return acc.reduce()

    modes = [(v.model, v.model.training) for v in views]
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            if metric in ("linear_cka", "debiased_cka"):
                acc = run_pass(StreamingCKA(constant_rtol=constant_rtol, device="cpu"), f"layer {metric}")
                res = acc.linear_cka() if metric == "linear_cka" else acc.debiased_cka()
            elif metric == "minibatch_cka":
                res = run_pass(StreamingMinibatchCKA(constant_rtol=constant_rtol), "layer minibatch_cka").minibatch_cka()
            else:
                means = run_pass(StreamingMean(), "layer means (pass 1/2)").means() if center else None
                res = run_pass(StreamingCosine(center=means, constant_rtol=constant_rtol), "layer cosine").cosine()
    finally:
        for m, training in modes:
            m.train(training)

    K = res.values.shape[0]
    names = [f"layer {k}" for k in range(ka)] if model_b is None else [f"A:layer {k}" for k in range(ka)] + [f"B:layer {k}" for k in range(K - ka)]
    if model_b is None:
        vals, und = res.values, res.undefined
        layers_b = list(range(ka))
    else:
        vals, und = res.values[:ka, ka:], res.undefined[:ka, ka:]
        layers_b = list(range(K - ka))
    bad = [names[i] for i in res.undefined_blocks]
    if bad:
        why = "zero-norm samples" if metric == "cosine" else "constant (zero-variance) features"
        msg = (
            f"{metric} is undefined for {', '.join(bad)}: {why} across the {res.n} samples "
            f"({pooling} pooling). Those rows/columns are NaN in .matrix and True in .undefined."
        )
        if on_undefined == "raise":
            raise SimilarityUndefinedError(msg)
        warnings.warn(msg, UndefinedSimilarityWarning, stacklevel=2)
    return LayerSimilarity(
        matrix=np.array(vals, dtype=np.float64),
        metric=metric,
        pooling=pooling,
        layers=list(range(ka)),
        layers_b=layers_b,
        undefined=np.array(und, dtype=bool),
        undefined_layers=bad,
        num_samples=res.n,
        cross=model_b is not None,
    )
