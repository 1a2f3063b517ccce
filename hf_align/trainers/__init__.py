"""hf_align.trainers: AlignedTrainer (aligned loss through the shared head) and DREAMTrainer (imported on use)."""

from __future__ import annotations

import importlib

from .aligned_config import AlignedTrainingArguments, layer_weights
from .aligned_trainer import AlignedTrainer

_LAZY = {"DREAMTrainer": ".dream_trainer", "DREAMTrainingArguments": ".dream_config"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AlignedTrainer", "AlignedTrainingArguments", "DREAMTrainer", "DREAMTrainingArguments", "layer_weights"]
