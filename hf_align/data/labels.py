"""The one label rule: where labels travel in a batch, which values are class ids, and which are ignored.

* labels travel under one of :data:`LABEL_KEYS` and are split from the model inputs by :func:`split_labels`;
* class labels are integers in ``[0, num_labels)``; :data:`IGNORE_INDEX` (``-100``, as everywhere in the HF stack:
  ``CrossEntropyLoss``, data collators) marks a sample or token without a target. It is ignored everywhere in
  hf-align: no loss, not counted in accuracies, exit curves, calibration or collapse statistics (:func:`labelled`);
* :func:`check_labels` validates labels against the model's ``num_labels`` before any work;
  :func:`check_dataset_labels` does it for a whole dataset (before any training step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "LABEL_KEYS", "check_dataset_labels", "check_labels", "dataset_labels", "labelled",
           "split_labels"]

LABEL_KEYS = ("labels", "label", "label_ids")
IGNORE_INDEX = -100  # a label without a target (transformers' / torch's ignore_index)


def labelled(labels: Any) -> Any:
    """The rows that carry a target: ``labels != IGNORE_INDEX`` (a bool tensor for a tensor, else a numpy array)."""
    if isinstance(labels, torch.Tensor):
        return labels != IGNORE_INDEX
    return np.asarray(labels) != IGNORE_INDEX


def split_labels(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(model inputs, labels or None)``: the labels are the first of :data:`LABEL_KEYS` present; every
    label key is removed from the inputs."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"each batch must be a dict of model inputs (input_ids=..., attention_mask=..., labels=...), got "
            f"{type(batch).__name__}"
        )
    labels = next((batch[k] for k in LABEL_KEYS if k in batch and batch[k] is not None), None)
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, labels


def check_labels(labels: Any, num_labels: int, *, what: str = "labels") -> None:
    """Class labels must be integers in ``[0, num_labels)`` (``-100``, the ignore index, is allowed).

    Raises ``ValueError`` naming the first offending value (or ``TypeError`` for non-integer labels).
    """
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if a.size == 0:
        return
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{what} must be integer class ids in [0, {num_labels}), got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
            raise TypeError(f"{what} must be integer class ids in [0, {num_labels}), got non-integer values")
    bad = (a != IGNORE_INDEX) & ((a < 0) | (a >= num_labels))
    if bad.any():
        value = a[bad].flat[0]
        raise ValueError(
            f"{what} must lie in [0, {num_labels - 1}] (the model has num_labels={num_labels}; -100 is ignored), "
            f"got {value.item() if hasattr(value, 'item') else value} ({int(bad.sum())} of {a.size} out of range)"
        )


def dataset_labels(dataset: Any) -> np.ndarray | None:
    """All class labels of a dataset as one array, or ``None`` when they cannot be read cheaply (iterable
    datasets, image datasets without a label column, multi-label / float targets)."""
    if dataset is None:
        return None
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and not isinstance(column_names, dict):  # datasets.Dataset: read the column
        key = next((k for k in LABEL_KEYS if k in column_names), None)
        if key is None:
            return None
        values = dataset.with_format(None)[key] if hasattr(dataset, "with_format") else dataset[key]
    elif isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        values = []
        for example in dataset:
            if not isinstance(example, Mapping):
                return None
            _, y = split_labels(example)
            if y is None:
                return None
            values.append(y.tolist() if isinstance(y, torch.Tensor) else y)
    else:
        return None
    try:
        a = np.asarray(values)
    except ValueError:  # ragged (token labels): not class labels
        return None
    if a.dtype == object or a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        return None
    return a


def check_dataset_labels(dataset: Any, num_labels: int, *, name: str = "dataset") -> None:
    """:func:`check_labels` on every label of ``dataset`` (when they can be read cheaply, see
    :func:`dataset_labels`); call it before any training step."""
    labels = dataset_labels(dataset)
    if labels is not None:
        check_labels(labels, num_labels, what=f"{name} labels")
