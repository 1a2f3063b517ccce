"""``layer_similarity``: run a model over a dataset once and stream the layer-by-layer similarity matrix."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import (
    collate,
    iter_batches,
    pad_token_id,
    rank_and_world,
    require_reiterable,
    split_labels,
    to_device,
)
from ..layers import eval_mode
from .pooling import POOLINGS, pool
from .similarity import SIMILARITY_METRICS, SimilarityUndefinedError, default_constant_rtol, similarity_metric
from .streaming import StreamingCKA, StreamingCosine, StreamingMean, StreamingMinibatchCKA

__all__ = ["LayerSimilarity", "UndefinedSimilarityWarning", "layer_similarity", "METRICS", "default_pooling"]

# every name layer_similarity accepts -> the metric's one name (see analysis.similarity.SIMILARITY_METRICS)
METRICS = {
    alias: m.name for m in SIMILARITY_METRICS.values() if m.streamed for alias in (m.name, *m.aliases)
}


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

# kept for code that imported the old private collate: the data layer's collate (labels are kept now)
_default_collate = collate


# ---------------------------------------------------------------------------------------------- main


def default_pooling(view) -> str:
    """The pooling of the model family's own classifier: ``"cls"`` (encoders, ViT) or ``"last"`` (decoders:
    the last non-padding token); for per-token LM heads, the pooling of the family's sequence classifier."""
    if view.pooling in ("cls", "last"):
        return view.pooling
    return next((p for p in view.family.pooling.values() if p in ("cls", "last")), "mean")


def _less_precise(dtypes) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)


def layer_similarity(
    model,
    data,
    metric: str = "cka",
    pooling: str | None = None,
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

    Layer l's features are the model's hidden states as its own ``output_hidden_states=True`` returns them
    (:meth:`hf_align.LayerView.output_hidden_states`; 0 = embedding output), pooled, then accumulated in
    float64 whatever the model's dtype.

    Args:
        model: any model :class:`hf_align.LayerView` supports, head-less base models (``AutoModel``) and PEFT /
            sentence-transformers wrappers included (it is wrapped, not copied; eval mode while running,
            every module's mode restored after).
        data: anything :func:`hf_align.data.iter_batches` takes: a ``datasets.Dataset`` or a list of
            example dicts (batched by ``batch_size``, token columns padded on the right, or by ``collate_fn``), a
            list of ready batch dicts, a ``DataLoader`` or an iterable of batch dicts. Labels are ignored.
        metric: a name of :data:`hf_align.analysis.similarity.SIMILARITY_METRICS` (one name per metric, also
            used by the functions and the ``evaluate`` module): ``"linear_cka"`` (alias ``"cka"``, exact),
            ``"debiased_linear_cka"`` (alias ``"debiased_cka"``, exact, U-centred HSIC), ``"cosine"`` (the
            paper's sample-wise cosine; ``center=True`` subtracts the dataset mean of each layer, which needs a
            second pass over the data), ``"minibatch_cka"`` (Nguyen et al.; each batch is one minibatch, so every
            batch needs >= 4 samples).
        pooling: ``"cls"``, ``"mean"`` (mask-aware), ``"last"`` (last non-padding token) or ``"tokens"``
            (every non-padding token is a sample). Default: the model family's own pooling (``"cls"`` for
            encoders and ViT, ``"last"`` for decoders), see :func:`default_pooling`.
        model_b: a second model run on the same batches; the matrix is then (L_A+1) x (L_B+1).
        on_undefined: ``"warn"`` (default): layers whose similarity is undefined (constant features, e.g.
            BERT's embedding output at CLS) get NaN entries, ``undefined`` True and a
            :class:`UndefinedSimilarityWarning` naming them; ``"raise"``: raise
            :class:`~hf_align.analysis.similarity.SimilarityUndefinedError` instead.
        constant_rtol: a layer is constant when none of its features varies beyond its own rounding: every
            column satisfies ``||x~_j|| <= constant_rtol * sqrt(||x_j||^2 + median_k ||x_k||^2)``
            (:func:`hf_align.analysis.similarity.feature_varies`); default ``default_constant_rtol(model dtype)``,
            i.e. relative to the resolution of the dtype the model computes in.

    Multi-process: when ``torch.distributed`` is initialised (``torchrun``, or ``accelerate launch`` after
    ``Accelerator()``), batch i runs on rank ``i % world_size`` and the float64 sums are all-reduced, so
    every rank returns exactly the single-process matrix.
    """
    from ..layers import LayerView

    if metric not in METRICS:
        try:
            known = similarity_metric(metric)
        except ValueError:
            known = None
        hint = f" ({known.name} needs all n^2 sample pairs: use hf_align.analysis.{known.name} on features)" if known else ""
        raise ValueError(f"unknown metric {metric!r} for layer_similarity; expected one of {sorted(METRICS)}{hint}")
    metric = METRICS[metric]
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if on_undefined not in ("warn", "raise"):
        raise ValueError(f"on_undefined must be 'warn' or 'raise', got {on_undefined!r}")
    if center and metric != "cosine":
        raise ValueError("center=True applies to metric='cosine' (CKA always centres)")
    if center:
        require_reiterable(data, "center=True (the layer means come from a first pass)")

    views = [LayerView(model)] + ([LayerView(model_b)] if model_b is not None else [])
    poolings = [pooling or default_pooling(v) for v in views]
    pooling_name = poolings[0] if len(set(poolings)) == 1 else f"A:{poolings[0]}, B:{poolings[1]}"
    ka = views[0].num_layers + 1
    rank, _ = rank_and_world()
    device = views[0].device
    dtype = _less_precise([v.dtype for v in views])
    rtol = default_constant_rtol(dtype) if constant_rtol is None else float(constant_rtol)

    def run_pass(acc, desc):
        from tqdm.auto import tqdm

        it, total = iter_batches(data, batch_size, collate_fn=collate_fn, pad_token_id=pad_token_id(views[0].hf_model))
        for batch in tqdm(it, total=total, desc=desc, disable=not progress or rank != 0):
            inputs, _ = split_labels(batch)
            inputs = to_device(inputs, device)
            mask = inputs.get("attention_mask")
            blocks = []
            for view, how in zip(views, poolings):
                # float64 before pooling: means over tokens of half-precision states are exact sums too
                blocks.extend(pool(h.to(torch.float64), mask, how) for h in view.output_hidden_states(**inputs))
            acc.update(blocks)
        return acc.reduce()

    with eval_mode(*(v.model for v in views)), torch.no_grad():
        if metric in ("linear_cka", "debiased_linear_cka"):
            acc = run_pass(StreamingCKA(constant_rtol=rtol, device="cpu"), f"layer {metric}")
            res = acc.linear_cka() if metric == "linear_cka" else acc.debiased_cka()
        elif metric == "minibatch_cka":
            res = run_pass(StreamingMinibatchCKA(constant_rtol=rtol), "layer minibatch_cka").minibatch_cka()
        else:
            means = run_pass(StreamingMean(), "layer means (pass 1/2)").means() if center else None
            res = run_pass(StreamingCosine(center=means, constant_rtol=rtol), "layer cosine").cosine()

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
        if metric == "cosine" and not center:
            why = "zero-norm samples"
        else:
            why = (
                f"constant features: their centred part is within the resolution of {str(dtype).replace('torch.', '')} "
                f"(no feature varies by more than {rtol:.3g} of its own magnitude)"
            )
        msg = (
            f"{metric} is undefined for {', '.join(bad)}: {why} across the {res.n} samples "
            f"({pooling_name} pooling). Those rows/columns are NaN in .matrix and True in .undefined."
        )
        if on_undefined == "raise":
            raise SimilarityUndefinedError(msg)
        warnings.warn(msg, UndefinedSimilarityWarning, stacklevel=2)
    return LayerSimilarity(
        matrix=np.array(vals, dtype=np.float64),
        metric=metric,
        pooling=pooling_name,
        layers=list(range(ka)),
        layers_b=layers_b,
        undefined=np.array(und, dtype=bool),
        undefined_layers=bad,
        num_samples=res.n,
        cross=model_b is not None,
    )
