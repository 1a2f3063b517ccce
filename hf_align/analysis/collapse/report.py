"""The model-level report: collapse metrics of the features after every layer, through the layer view."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .nc import collapse_metrics, gnc3, nc3_papyan, nc3_zhu, ncc_predict
from .statistics import ClassStatistics


@dataclass
class CollapseReport:
    """Collapse metrics of the pooled features after every selected layer (0 = embeddings output).

    ``per_layer[i]`` holds the metrics of ``layers[i]`` (``nc1``, ``nc1_papyan``, ``nc2_means_*``, and with a
    classifier of matching width ``nc3_papyan``, ``nc3_zhu``, ``gnc3``; ``nc4`` with ``nc4=True``);
    ``classifier`` holds the metrics of the head's final linear weight W (``nc2_W_*``, ``tammes_max_cosine``,
    ``gnc2_margin``), which do not depend on the layer."""

    layers: list[int]
    per_layer: list[dict[str, float]]
    classifier: dict[str, float]
    num_samples: int
    num_classes: int
    pooling: str
    statistics: list[ClassStatistics] = field(repr=False, default_factory=list)

    def series(self, key: str) -> list[float]:
        return [m.get(key, float("nan")) for m in self.per_layer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "per_layer": self.per_layer,
            "classifier": self.classifier,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "pooling": self.pooling,
        }


def _iter_batches(data: Any, batch_size: int) -> Iterable[dict[str, Any]]:
    """Batches (dicts of tensors) from a DataLoader / iterable of dict batches, a ``datasets.Dataset`` or a
    list of example dicts."""
    from torch.utils.data import DataLoader, default_collate

    if isinstance(data, DataLoader):
        yield from data
        return
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            ds = data.with_format("torch")
            for s in range(0, len(ds), batch_size):
                yield ds[s : s + batch_size]
            return
    except ImportError:  # pragma: no cover
        pass
    if isinstance(data, Sequence) and len(data) and isinstance(data[0], dict):
        for s in range(0, len(data), batch_size):
            yield default_collate(list(data[s : s + batch_size]))
        return
    if isinstance(data, dict):
        raise TypeError("data must be a dataset, a list of examples or an iterable of batches, not one dict batch")
    yield from data


def _pool(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None) -> torch.Tensor:
    """One feature per labelled sample: the analysis poolings except ``"tokens"``."""
    from ..pooling import pool

    if pooling not in ("cls", "mean", "last"):
        raise ValueError(f"pooling must be 'cls', 'mean' or 'last' (one feature per labelled sample), got {pooling!r}")
    return pool(hidden, mask, pooling)


@torch.no_grad()
def collapse_report(
    model: Any,
    data: Any,
    *,
    labels_key: str = "labels",
    pooling: str = "cls",
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    num_classes: int | None = None,
    nc4: bool = True,
    gnc2_margin: bool = True,
    global_mean: str = "classes",
    progress: bool = False,
) -> CollapseReport:
    """Neural collapse through depth: features after each layer (pooled at the first/CLS token, or the mean
    over the attention mask) are streamed into one :class:`ClassStatistics` per layer; then every metric of
    :func:`collapse_metrics` is computed per layer, with W = the weight of the model's final linear classifier
    (``LayerView.classifier``) when its width equals the feature width.

    ``nc4=True`` makes a second pass over ``data`` (the class means must be known first): NC4 at layer l is
    the rate at which the nearest-class-center rule on layer-l features disagrees with the model's own final
    prediction (Papyan et al.'s definition, evaluated at every depth).

    Note: for heads with a pooler (BERT) or a dense layer before the classifier (RoBERTa), W lives in that
    layer's output space, not in the space of the hidden states; NC3/GNC3 then compare two different spaces.
    """
    from ...layers import LayerView

    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    view = model if isinstance(model, LayerView) else LayerView(model)
    L = view.num_layers
    chosen = list(range(L + 1)) if layers is None else [int(x) for x in layers]
    for x in chosen:
        if not 0 <= x <= L:
            raise ValueError(f"layers must lie in [0, {L}] (0 = embeddings), got {x}")
    if num_classes is None:
        num_classes = getattr(view.hf_model.config, "num_labels", None)
        if view.task == "causal-lm" or num_classes is None:
            raise ValueError("pass num_classes= (could not read config.num_labels)")
    K = int(num_classes)
    stats = [ClassStatistics(K) for _ in chosen]
    dev = view.device

    def run(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any], tuple[torch.Tensor, ...]]:
        if not isinstance(batch, dict) or labels_key not in batch:
            keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"each batch must be a dict with the labels under {labels_key!r}; got {keys}")
        batch = dict(batch)
        y = torch.as_tensor(batch.pop(labels_key))
        inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return y, inputs, view.hidden_states(**inputs)

    batches = _iter_batches(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="collapse: statistics")
    for batch in batches:
        y, inputs, hs = run(batch)
        mask = inputs.get("attention_mask")
        for s, l in zip(stats, chosen):
            s.update(_pool(hs[l], pooling, mask).double().cpu(), y)
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
    per_layer = []
    for s in stats:
        m = collapse_metrics(s, None, global_mean=global_mean)
        if W is not None:
            Mc = s.centered_means(global_mean)
            m.update(nc3_papyan=nc3_papyan(W, Mc), nc3_zhu=nc3_zhu(W, Mc), gnc3=gnc3(W, Mc))
        per_layer.append(m)
    if nc4:
        means = [s.means() for s in stats]
        wrong = np.zeros(len(chosen))
        n = 0
        for batch in _iter_batches(data, batch_size):
            _, inputs, hs = run(batch)
            pred = view.head(hs[-1], **inputs).argmax(-1).cpu().numpy()
            if pred.ndim != 1:
                raise ValueError("nc4 needs one prediction per sample (a classification head)")
            mask = inputs.get("attention_mask")
            for i, l in enumerate(chosen):
                feats = _pool(hs[l], pooling, mask).double().cpu().numpy()
                wrong[i] += np.sum(ncc_predict(feats, means[i]) != pred)
            n += pred.shape[0]
        for i, m in enumerate(per_layer):
            m["nc4"] = float(wrong[i] / n)
    return CollapseReport(chosen, per_layer, classifier, stats[0].num_samples, K, pooling, stats)
