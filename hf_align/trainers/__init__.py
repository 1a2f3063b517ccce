"""hf_align.trainers: AlignedTrainer (aligned loss through the shared head) and DREAMTrainer (imported on use)."""

from __future__ import annotations

from .._lazy import lazy_exports
from .aligned_config import AlignedTrainingArguments, layer_weights
from .aligned_trainer import AlignedTrainer

_LAZY = {"DREAMTrainer": ".dream_trainer", "DREAMTrainingArguments": ".dream_config"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = ["AlignedTrainer", "AlignedTrainingArguments", "DREAMTrainer", "DREAMTrainingArguments", "layer_weights"]
