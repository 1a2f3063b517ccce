"""hf_align.trainers: AlignedTrainer (aligned loss through the shared head) and DREAMTrainer."""

from .aligned_config import AlignedTrainingArguments, layer_weights
from .aligned_trainer import AlignedTrainer

__all__ = ["AlignedTrainer", "AlignedTrainingArguments", "layer_weights"]
