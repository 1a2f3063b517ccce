"""Moved to :mod:`hf_align.data` (batches, labels) and :func:`hf_align.layers.eval_mode`; this path warns once and
goes in hf-align 0.3."""

from .._deprecated import moved

__getattr__, _ = moved(__name__, "hf_align.data.batches", "hf_align.data.labels", "hf_align.layers")
__all__ = ["LABEL_KEYS", "check_dataset_labels", "check_labels", "collate", "dataset_labels", "eval_mode", "iter_batches", "pad_token_id", "rank_and_world", "require_reiterable", "split_labels", "to_device"]  # noqa: F822 (served by __getattr__)
