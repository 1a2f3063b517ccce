"""Batches: user data -> model batches, rank sharding.

Every place in hf-align that iterates a dataset (layer similarity, neural collapse, calibration, early-exit
evaluation, the CLI, and the label check of :class:`~hf_align.AlignedTrainer`) goes through this module, so
they accept the same inputs and fail the same way:

* ``data`` is a ``datasets.Dataset`` or a list of example dicts (batched ``batch_size`` at a time by
  :func:`collate`, which pads token columns on the right and builds the ``attention_mask``), a list of
  ready batch dicts, one batch dict, a ``torch.utils.data.DataLoader`` or any iterable of batch dicts;
* batches keep their labels (the label rule is :mod:`hf_align.data.labels`);
* with ``torch.distributed`` initialised, batch i of the global batch sequence goes to rank ``i % world``
  (:func:`iter_batches`), so every process count sees the same batches.

Eval mode while iterating is :func:`hf_align.layers.eval_mode` (it lives with the layer view).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "collate",
    "iter_batches",
    "pad_token_id",
    "rank_and_world",
    "require_reiterable",
    "to_device",
]

# token-aligned columns that the default collate pads on the right (input_ids with the pad id, the rest with 0)
PAD_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "special_tokens_mask")


# ---------------------------------------------------------------------------------------------- batches


def pad_token_id(model: torch.nn.Module | None) -> int:
    """The pad id used by :func:`collate` for ``input_ids``: the model's (text) config ``pad_token_id``, else 0."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    pad = getattr(config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack a list of examples into one batch dict of tensors.

    Columns of equal shape are stacked; token columns (:data:`PAD_KEYS`) of different lengths are padded on
    the right (``input_ids`` with ``pad_token_id``, the others with 0) and an ``attention_mask`` is built when
    the examples had none. Text columns (strings) are dropped; labels are kept. Other ragged columns raise
    ``ValueError`` (pass a ``collate_fn``).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    first = examples[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"data items must be dicts of model inputs, got {type(first).__name__}")
    keys = [k for k, v in first.items() if v is not None and not isinstance(v, (str, bytes))]
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        values = []
        for example in examples:
            v = example[k]
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], (str, bytes)):
                break
            values.append(v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)))
        else:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                out[k] = torch.stack(values)
            elif k in PAD_KEYS and all(v.ndim == 1 for v in values):
                length = max(v.shape[0] for v in values)
                fill = pad_token_id if k == "input_ids" else 0
                out[k] = torch.stack([torch.cat([v, v.new_full((length - v.shape[0],), fill)]) for v in values])
                if k == "input_ids" and "attention_mask" not in first:
                    out["attention_mask"] = torch.stack(
                        [(torch.arange(length) < v.shape[0]).long() for v in values]
                    )
            else:
                raise ValueError(f"cannot batch column {k!r}: examples have shapes {sorted(shapes)}; pass a collate_fn")
    return out


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, ``(0, 1)`` otherwise."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_batch(d: Mapping) -> bool:
    """A dict whose model inputs already have a batch dimension (2-D ``input_ids`` / 4-D ``pixel_values``)."""
    v = d.get("input_ids", d.get("pixel_values"))
    if isinstance(v, torch.Tensor):
        return v.ndim == (4 if "input_ids" not in d else 2)
    return False


def _len(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def iter_batches(
    data: Any,
    batch_size: int = 32,
    *,
    collate_fn=None,
    pad_token_id: int = 0,
    shard: bool = True,
) -> tuple[Iterator[dict[str, Any]], int | None]:
    """This process's batches of ``data`` (see the module docstring) and their number (``None`` if unknown).

    With ``shard=True`` and an initialised multi-process group, batch i of the global batch sequence goes to
    rank ``i % world_size`` (a ``DataLoader`` with a ``DistributedSampler`` is taken as already sharded).
    Batches keep their labels; use :func:`split_labels`. Bad ``data`` or ``batch_size`` raise before any
    batch is made.
    """
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    rank, world = rank_and_world() if shard else (0, 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, DataLoader):
        n = _len(data)
        if isinstance(data.sampler, DistributedSampler) or world == 1:
            return iter(data), n
        return (b for i, b in enumerate(data) if i % world == rank), (None if n is None else len(range(rank, n, world)))
    if isinstance(data, Mapping):
        if not _is_batch(data):
            raise TypeError(
                "data is a single example dict: pass a list of examples, a datasets.Dataset, a DataLoader or a "
                "batch dict whose input_ids are 2-D / pixel_values 4-D"
            )
        data = [data]
    if isinstance(data, (str, bytes)) or not (isinstance(data, Iterable) or hasattr(data, "__getitem__")):
        raise TypeError(
            f"data must be a datasets.Dataset, a torch DataLoader, a list of example dicts or an iterable of batch "
            f"dicts, got {type(data).__name__}"
        )
    n = _len(data)
    collate_examples = collate_fn or (lambda examples: collate(examples, pad_token_id))
    if n is None or not hasattr(data, "__getitem__"):  # a stream: of ready batches, or of examples to batch
        return _stream_batches(data, batch_size, collate_examples, rank, world), None
    if n == 0:
        raise ValueError("data is empty")
    first = data[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"data items must be dicts of model inputs, got {type(first).__name__}")
    if _is_batch(first):  # a list of ready batches
        return (data[i] for i in range(rank, n, world)), len(range(rank, n, world))
    starts = list(range(0, n, batch_size))[rank::world]
    is_hf_dataset = hasattr(data, "column_names")

    def generate():
        for s in starts:
            index = list(range(s, min(s + batch_size, n)))
            if is_hf_dataset:
                columns = data[index]  # dict of columns
                examples = [{k: columns[k][j] for k in columns} for j in range(len(index))]
            else:
                examples = [data[i] for i in index]
            yield collate_examples(examples)

    return generate(), len(starts)


def _stream_batches(data: Iterable, batch_size: int, collate_examples, rank: int, world: int) -> Iterator[dict]:
    """Batches of a stream (a generator, a ``datasets.IterableDataset``): items that are already batches pass
    through; single examples are grouped ``batch_size`` at a time and collated. Batch i goes to rank i % world."""
    index = 0
    pending: list[Mapping] = []
    for item in data:
        if isinstance(item, Mapping) and not _is_batch(item):
            pending.append(item)
            if len(pending) < batch_size:
                continue
            item, pending = collate_examples(pending), []
        if index % world == rank:
            yield item
        index += 1
    if pending and index % world == rank:
        yield collate_examples(pending)


def require_reiterable(data: Any, why: str) -> None:
    """A ValueError, before any work, when ``data`` is a one-shot iterator (a generator) but ``why`` needs a
    second pass over it."""
    if isinstance(data, Iterator):
        raise ValueError(f"{why} needs a second pass over the data, but data is a one-shot iterator "
                         f"({type(data).__name__}): pass a list, a datasets.Dataset or a DataLoader")


def to_device(inputs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a dict of model inputs to ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
