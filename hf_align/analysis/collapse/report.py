"""The model-level report: collapse metrics of the features after every layer, through the layer view.

Features of layer l (0 = embedding output), one per labelled sample:

* ``features="head"`` (default for classifiers): the **head features** -- the input of the model's final
  linear classifier when its own head (final norm, pooling, pooler / dense) is applied to layer l's hidden
  state (:meth:`hf_align.LayerView.head_features`). At the last layer they are exactly what the classifier
  sees in the model's own forward, so NC3 / GNC3 compare W with class means in W's own space.
* ``features="hidden"`` (the only choice for head-less base models): the hidden state as the model's
  ``output_hidden_states`` returns it, pooled (``pooling``, default the family's own).

Every layer's features are cast to float64 before they are accumulated, whatever the model dtype. A layer
whose features are constant (no feature varies beyond its own rounding: per column j,
``Sigma_T[j, j] <= rtol^2 (E h_j^2 + median_k E h_k^2)`` with ``rtol = default_constant_rtol(model dtype)``,
:func:`~hf_align.analysis.similarity.feature_varies`; e.g. layer 0 at a fixed CLS token) or whose class means all coincide
has undefined metrics: it is listed in ``undefined_layers`` (with the reason), its metrics are NaN, and a
:class:`UndefinedCollapseWarning` names it -- never an exception, unless ``on_undefined="raise"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...data import (
    LABEL_KEYS,
    check_dataset_labels,
    check_labels,
    iter_batches,
    labelled,
    pad_token_id,
    rank_and_world,
    require_reiterable,
    split_labels,
    to_device,
)
from ...layers import eval_mode
from ..pooling import pool
from ..similarity import default_constant_rtol
from .nc import collapse_metrics, gnc3, nc3_papyan, nc3_zhu, ncc_predict
from .results import CollapseReport, UndefinedCollapseWarning, _undefined_reason
from .statistics import ClassStatistics
from .tokens import token_collapse_report

__all__ = ["CollapseReport", "UndefinedCollapseWarning", "collapse_report", "FEATURES"]

FEATURES = ("head", "hidden")
_CLASSIFIER_TASKS = ("sequence-classification", "image-classification")
_NC2_KEYS = ("equinorm", "equiangularity", "cosine_std", "max_cosine", "etf_distance")


def _default_pooling(view) -> str:
    from ..collect import default_pooling

    return default_pooling(view)


@torch.no_grad()
def collapse_report(
    model: Any,
    data: Any,
    *,
    features: str | None = None,
    labels_key: str | None = None,
    pooling: str | None = None,
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    num_classes: int | None = None,
    nc4: bool = True,
    gnc2_margin: bool = True,
    global_mean: str = "classes",
    collate_fn=None,
    constant_rtol: float | None = None,
    on_undefined: str = "warn",
    progress: bool = False,
    min_count: int | None = None,
    weightings: Sequence[str] | None = None,
    gnc2_options: dict[str, Any] | None = None,
) -> CollapseReport:
    """Neural collapse through depth: the features of every selected layer (see the module docstring) are
    streamed into one :class:`ClassStatistics` per layer (float64); then every metric of
    :func:`collapse_metrics` is computed per layer, with W = the weight of the model's final linear classifier
    (``LayerView.classifier``) when its width equals the feature width (always, for head features).

    Args:
        model: any model :class:`hf_align.LayerView` supports (classifiers, head-less base models, PEFT /
            sentence-transformers wrappers); eval mode while running, every module's mode restored after.
        data: anything :func:`hf_align.data.iter_batches` takes, with class labels under one of
            ``labels``/``label``/``label_ids`` (or ``labels_key``). Labels must lie in [0, num_classes).
        features: ``"head"`` (default when the model has a classification head and no ``pooling`` is
            given) or ``"hidden"`` (default for base models and LM heads, or when ``pooling`` is given).
        pooling: for ``features="hidden"``: ``"cls"``, ``"mean"`` or ``"last"``; default the family's own.
        num_classes: default ``config.num_labels``.
        nc4: also NC4, the rate at which the nearest-class-center rule on layer-l features disagrees with the
            model's own final prediction (Papyan et al.); a second pass over ``data``; needs a head.
        on_undefined: ``"warn"`` (default; undefined layers get NaN metrics and an
            :class:`UndefinedCollapseWarning`) or ``"raise"`` (ValueError).

    **Causal LMs** (``...ForCausalLM``, with no ``pooling`` / ``num_classes`` / ``labels_key``): the token-level
    report, :func:`~hf_align.analysis.collapse.token_collapse_report` -- every predicted position is a sample,
    the next token its class, the LM head's input its feature, W the LM head -- with its options ``min_count``,
    ``weightings`` and ``gnc2_options``. Pass ``pooling`` and ``num_classes`` for one pooled feature per labelled
    sequence instead.

    Multi-process (``torch.distributed`` initialised): batch i runs on rank ``i % world_size``; the class
    statistics and NC4 counts are summed over ranks, so every rank returns the single-process report.
    """
    from ...layers import LayerView

    view = model if isinstance(model, LayerView) else LayerView(model)
    token_options = {k: v for k, v in (("min_count", min_count), ("weightings", weightings),
                                       ("gnc2_options", gnc2_options)) if v is not None}
    if (view.task == "causal-lm" and features in (None, "head") and pooling is None and num_classes is None
            and labels_key is None):
        return token_collapse_report(
            view, data, layers=layers, batch_size=batch_size, gnc2_margin=gnc2_margin, collate_fn=collate_fn,
            constant_rtol=constant_rtol, on_undefined=on_undefined, progress=progress, **token_options,
        )
    if token_options:
        raise ValueError(f"{', '.join(sorted(token_options))}: for the token-level report of a causal LM only "
                         "(no pooling, num_classes or labels_key)")
    classifier_head = view.has_head and view.task in _CLASSIFIER_TASKS
    if features is None:  # an explicit pooling means pooled hidden states (what it always meant)
        features = "head" if classifier_head and pooling is None else "hidden"
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if features == "head" and not classifier_head:
        raise ValueError(
            f"features='head' needs a classification head; {type(view.hf_model).__name__} is a {view.task} model: "
            "use features='hidden'"
        )
    if features == "head" and pooling is not None:
        raise ValueError("pooling applies to features='hidden'; head features are pooled by the model's own head")
    if pooling is None:
        pooling = _default_pooling(view) if features == "hidden" else "head"
    elif pooling not in ("cls", "mean", "last"):
        raise ValueError(f"pooling must be 'cls', 'mean' or 'last' (one feature per labelled sample), got {pooling!r}")
    if on_undefined not in ("warn", "raise"):
        raise ValueError(f"on_undefined must be 'warn' or 'raise', got {on_undefined!r}")
    if labels_key is not None and not isinstance(labels_key, str):
        raise TypeError(f"labels_key must be a string, got {type(labels_key).__name__}")
    L = view.num_layers
    chosen = list(range(L + 1)) if layers is None else [int(x) for x in layers]
    for x in chosen:
        if not 0 <= x <= L:
            raise ValueError(f"layers must lie in [0, {L}] (0 = embeddings), got {x}")
    if num_classes is None:
        num_classes = getattr(view.hf_model.config, "num_labels", None) if classifier_head else None
        if num_classes is None:
            raise ValueError(
                f"pass num_classes= ({type(view.hf_model).__name__} has no classification head to read num_labels from)"
            )
    K = int(num_classes)
    if labels_key is None:
        check_dataset_labels(data, K, name="data")
    nc4 = bool(nc4) and classifier_head
    if nc4:
        require_reiterable(data, "nc4=True (NCC predictions need the class means first)")
    stats = [ClassStatistics(K) for _ in chosen]
    sumsq: list = [0.0] * len(chosen)  # per layer: per-column sums of squares of the raw features
    dev = view.device
    rtol = default_constant_rtol(view.dtype) if constant_rtol is None else float(constant_rtol)
    rank, world = rank_and_world()

    def batches(desc: str):
        it, total = iter_batches(data, batch_size, collate_fn=collate_fn, pad_token_id=pad_token_id(view.hf_model))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=total, desc=desc, disable=rank != 0)
        for batch in it:
            if labels_key is not None:
                if not isinstance(batch, dict) or labels_key not in batch:
                    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                    raise ValueError(f"each batch must hold the labels under {labels_key!r}; got {keys}")
                y = batch[labels_key]
                inputs = {k: v for k, v in batch.items() if k != labels_key and k not in LABEL_KEYS}
            else:
                inputs, y = split_labels(batch)
                if y is None:
                    raise ValueError(f"each batch must hold class labels under one of {LABEL_KEYS}; got {sorted(batch)}")
            y = torch.as_tensor(y).reshape(-1)
            check_labels(y, K)
            yield y, to_device(inputs, dev)

    def layer_features(inputs: dict[str, Any]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """float64 features (n, D) of every chosen layer, and the model's own predictions (or None)."""
        raw = view.hidden_states(**inputs)
        context = view.context(**inputs)
        if features == "hidden":
            # as the model's own output_hidden_states returns them (final norm on the last where it applies it)
            hs = (*raw[:-1], view.final_norm(raw[-1])) if view.family.final_norm_in_hidden_states else raw
            mask = inputs.get("attention_mask")
            feats = [pool(hs[l].to(torch.float64), mask, pooling) for l in chosen]
            pred = view.head(raw[-1], context).argmax(-1) if nc4 else None
            return feats, pred
        feats = [view.head_features(raw[l], context).to(torch.float64) for l in chosen]
        pred = view.classifier(view.head_features(raw[-1], context)).argmax(-1) if nc4 else None
        return feats, pred

    with eval_mode(view.model):
        for y, inputs in batches("collapse: statistics"):
            feats, _ = layer_features(inputs)
            keep = labelled(y)  # the one label rule: rows labelled -100 carry no class and are left out
            for i, (s, f) in enumerate(zip(stats, feats)):
                if f.shape[0] != y.shape[0]:
                    raise ValueError(f"got {f.shape[0]} features but {y.shape[0]} labels in a batch (one label per sample)")
                f = f.cpu()[keep]
                sumsq[i] = sumsq[i] + f.square().sum(0).numpy()
                s.update(f, y[keep])
        if world > 1:
            for s in stats:
                s.reduce()
            for i in range(len(sumsq)):
                if np.ndim(sumsq[i]) == 0 and stats[i].dim:  # this process saw no data
                    sumsq[i] = np.zeros(stats[i].dim)
                total = torch.as_tensor(sumsq[i], dtype=torch.float64).clone()
                torch.distributed.all_reduce(total)
                sumsq[i] = total.numpy()

        W = None
        try:
            W = view.classifier.weight.detach().double().cpu().numpy()
        except (ValueError, AttributeError):
            W = None
        D = stats[0].dim
        classifier: dict[str, float] = {}
        if W is not None and W.shape[0] == K and W.shape[1] == D:
            classifier = collapse_metrics(None, W, gnc2_margin=gnc2_margin)
        else:
            W = None

        per_layer: list[dict[str, float]] = []
        reasons: dict[int, str] = {}
        for i, (s, layer) in enumerate(zip(stats, chosen)):
            why = _undefined_reason(s, sumsq[i], rtol, view.dtype)
            if why is None:
                try:
                    m = collapse_metrics(s, None, global_mean=global_mean)
                    if W is not None:
                        Mc = s.centered_means(global_mean)
                        m.update(nc3_papyan=nc3_papyan(W, Mc), nc3_zhu=nc3_zhu(W, Mc), gnc3=gnc3(W, Mc))
                except ValueError as e:  # degenerate geometry at this layer (e.g. a zero class mean)
                    why, m = str(e), {}
            if why is not None:
                reasons[layer] = why
                m = {}
            per_layer.append(m)

        if nc4:
            means = [None if layer in reasons else s.means() for s, layer in zip(stats, chosen)]
            wrong = np.zeros(len(chosen))
            n = 0
            for y, inputs in batches("collapse: nc4"):
                feats, pred = layer_features(inputs)
                keep = labelled(y).numpy()  # the samples the class means were computed on
                pred = pred.cpu().numpy()[keep]
                for i, f in enumerate(feats):
                    if means[i] is not None:
                        wrong[i] += np.sum(ncc_predict(f.cpu().numpy()[keep], means[i]) != pred)
                n += pred.shape[0]
            if world > 1:
                counts = torch.from_numpy(np.append(wrong, n).astype(np.float64))
                torch.distributed.all_reduce(counts)
                wrong, n = counts[:-1].numpy(), float(counts[-1])
            for i, m in enumerate(per_layer):
                if means[i] is not None:
                    m["nc4"] = float(wrong[i] / n)

    keys = {"nc1", "nc1_papyan", *(f"nc2_means_{k}" for k in _NC2_KEYS)}
    keys |= {"nc3_papyan", "nc3_zhu", "gnc3"} if W is not None else set()
    keys |= {"nc4"} if nc4 else set()
    keys |= {k for m in per_layer for k in m}
    for m, layer in zip(per_layer, chosen):
        if layer in reasons:
            m.update({k: float("nan") for k in keys})
    if reasons:
        listing = "; ".join(f"layer {layer}: {why}" for layer, why in reasons.items())
        msg = (
            f"collapse metrics are undefined for {len(reasons)} layer(s) ({features} features): {listing}. Their "
            "metrics are NaN and they are listed in .undefined_layers."
        )
        if on_undefined == "raise":
            raise ValueError(msg)
        warnings.warn(msg, UndefinedCollapseWarning, stacklevel=3)  # 3: past torch.no_grad's wrapper, to the caller
    return CollapseReport(
        chosen, per_layer, classifier, stats[0].num_samples, K, pooling, stats,
        features=features, undefined_layers=sorted(reasons), undefined_reasons=reasons,
    )
